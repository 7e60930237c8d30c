"""Config files are parsed, never executed; settings map flags, env and file onto one object."""

import pytest

from a2e.config import model_dims, read_config
from a2e.errors import ConfigError
from runtime.settings import ROOT, Settings, load_settings


def test_shipped_configs():
    streaming = read_config(ROOT / "configs/lam_audio2exp_config_streaming.py")
    assert streaming["weight"] == "pretrained_models/lam_audio2exp_streaming.tar"
    dims = model_dims(streaming, ROOT)
    assert dims.num_identity_classes == 12 and not dims.use_transformer and dims.hidden_dim == 512
    assert dims.wav2vec2["hidden_size"] == 768 and dims.wav2vec2["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    full = model_dims(read_config(ROOT / "configs/lam_audio2exp_config.py"), ROOT)
    assert full.use_transformer and full.num_identity_classes == 5016


def test_literals_dicts_lists(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('"""doc"""\na = 1\nb = -2.5\nc = [1, "x", (2, 3)]\nd = dict(k=dict(v=None), n=True)\ne = {"z": [1]}\n')
    assert read_config(path) == {"a": 1, "b": -2.5, "c": [1, "x", (2, 3)], "d": {"k": {"v": None}, "n": True}, "e": {"z": [1]}}


@pytest.mark.parametrize(
    "source",
    [
        "import os\nx = 1\n",
        "x = __import__('os').system('touch pwned')\n",
        "x = open('/etc/passwd').read()\n",
        "x = 1 + 2\n",
        "def f():\n    pass\n",
        "x = dict(**{'a': 1})\n",
        "x, y = 1, 2\n",
        "x = [i for i in range(3)]\n",
        "if True:\n    x = 1\n",
    ],
)
def test_anything_that_could_run_code_is_refused(tmp_path, source):
    path = tmp_path / "evil.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match="evil.py"):
        read_config(path)
    assert not (tmp_path / "pwned").exists()


def test_syntax_error_and_missing_file(tmp_path):
    (tmp_path / "bad.py").write_text("x = (\n")
    with pytest.raises(ConfigError, match="not valid Python"):
        read_config(tmp_path / "bad.py")
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path / "absent.py")


def test_unsupported_norm(tmp_path):
    with pytest.raises(ConfigError, match="norm_type"):
        model_dims({"model": {"backbone": {"norm_type": "bn"}}})


def test_settings_precedence(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("weight = 'from_file.tar'\nmax_sessions = 7\nport = 9100\nmax_batch = 4\n")
    s = load_settings(["--config-file", str(cfg)], environ={})
    assert (s.weight, s.max_sessions, s.port, s.max_batch) == ("from_file.tar", 7, 9100, 4)
    env = {"A2E_MAX_SESSIONS": "9", "A2E_CUDA_GRAPHS": "off", "A2E_PORT": "9200"}
    s = load_settings(["--config-file", str(cfg)], environ=env)
    assert (s.max_sessions, s.cuda_graphs, s.port) == (9, False, 9200)
    s = load_settings(["--config-file", str(cfg), "--port", "9300", "--weight", "flag.tar", "--cuda-graphs"], environ=env)
    assert (s.port, s.weight, s.cuda_graphs, s.max_sessions) == (9300, "flag.tar", True, 9)


def test_document_flags_and_defaults():
    s = load_settings([], environ={})
    assert (s.host, s.port, s.config_file, s.log_level) == ("0.0.0.0", 8000, "configs/lam_audio2exp_config_streaming.py", "info")
    assert s.weight == "pretrained_models/lam_audio2exp_streaming.tar"  # from the shipped config
    assert s.model == "auto"  # the config's model = dict(...) describes the network, not this choice
    s = load_settings(["--host", "127.0.0.1", "--port", "9000", "--log-level", "debug", "--weight", "w.tar"], environ={})
    assert (s.host, s.port, s.log_level, s.weight) == ("127.0.0.1", 9000, "debug", "w.tar")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--port", "eighty"], "port"),
        (["--context-mode", "sideways"], "context_mode"),
        (["--dtype", "int4"], "dtype"),
        (["--max-batch", "0"], "max_batch"),
        (["--log-level", "loud"], "log level"),
        (["--config-file", "/nonexistent/config.py"], "does not exist"),
    ],
)
def test_bad_settings_are_explained(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(argv, environ={})


def test_bad_environment_value():
    with pytest.raises(ConfigError, match="cuda_graphs"):
        load_settings([], environ={"A2E_CUDA_GRAPHS": "perhaps"})
    assert Settings().validate().max_upload_bytes == 50 * 1024 * 1024


def test_readme_documents_every_flag():
    from pathlib import Path

    from runtime.settings import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert [f for f in flags if f"`{f}`" not in readme] == []


def test_an_empty_variable_leaves_an_optional_setting_unset():
    """An image's unset build argument ends up as A2E_WEIGHT= : no weights given, not a missing file."""
    settings = load_settings([], {"A2E_WEIGHT": ""})
    assert settings.weight is None and not settings.weight_is_explicit
    assert load_settings([], {"A2E_WEIGHT": "hf://3DAIGC/LAM_audio2exp"}).weight_is_explicit


def test_a_redis_cluster_address_is_refused_until_its_keys_share_a_slot():
    from engine.redis_connect import check_address

    with pytest.raises(ConfigError, match="Redis Cluster is not supported yet") as refused:
        check_address("redis+cluster://:secret@127.0.0.1:1,127.0.0.1:2")
    assert "secret" not in str(refused.value)  # the address is named, its password is not
