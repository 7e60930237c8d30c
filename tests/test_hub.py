"""Weights from the hub (``--weight hf://...``), against a local stand-in for
the Hugging Face Hub (``HF_ENDPOINT``) serving a gzip tar archive shaped like
the released one: the checkpoint (random weights, the LAM-A2E layout) at
upstream's path among other files. The real huggingface_hub client does
the downloading, in the server's own process, as a user's would."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from a2e.archive import ArchiveRefused, unpack
from a2e.hub import DEFAULT_FILE, HubError, HubRef, fetch, parse
from tests.hub_standin import COMMIT, StandInHub
from tests.test_end_to_end import free_port, start, stop

ROOT = Path(__file__).resolve().parent.parent
REPO = "test-org/LAM_audio2exp"
URI = f"hf://{REPO}"


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def released_archive(checkpoint) -> bytes:
    """Like upstream's LAM_audio2exp_streaming.tar: the checkpoint under pretrained_models/,
    beside a checkpoint of another layout (a2e-lite) and a text file."""
    return tar_gz({
        "LAM_audio2exp/README.md": b"# weights\n",
        "LAM_audio2exp/pretrained_models/a2e-lite.safetensors": (ROOT / "pretrained_models" / "a2e-lite.safetensors").read_bytes(),
        "LAM_audio2exp/pretrained_models/lam_audio2exp_streaming.tar": checkpoint.read_bytes(),
    })  # fmt: skip


def hub_env(hub: StandInHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return dict(env, HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", A2E_LOG_LEVEL="info", **extra)


def fetch_cli(env: dict[str, str], config_file: Path, uri: str = URI) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "a2e.hub", "fetch", uri, "--config-file", str(config_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


# -- addresses ------------------------------------------------------------------------------------------
def test_hf_addresses():
    assert parse("hf://3DAIGC/LAM_audio2exp") == HubRef("3DAIGC/LAM_audio2exp", "main", DEFAULT_FILE)
    assert parse("hf://a/b@v1.0/sub/x.tar") == HubRef("a/b", "v1.0", "sub/x.tar")
    assert parse(f"hf://a/b@{COMMIT}") == HubRef("a/b", COMMIT, DEFAULT_FILE)
    for bad in ("hf://", "hf://onlyowner", "hf://a/b/../x", "hf://a b/c", "s3://a/b"):
        with pytest.raises(HubError):
            parse(bad)


# -- unpacking ---------------------------------------------------------------------------------------------
def test_unpacking_writes_regular_files_inside_the_target(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(tar_gz({"a/b/c.bin": b"123", "top.txt": b"x"}))
    files = unpack(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["a/b/c.bin", "top.txt"]
    assert (tmp_path / "out" / "a" / "b" / "c.bin").read_bytes() == b"123"


@pytest.mark.parametrize(
    "members, links, why",
    [
        ({"../escape.txt": b"x"}, None, "outside"),
        ({"/etc/escape.txt": b"x"}, None, "outside"),
        ({"ok.txt": b"x"}, {"link": "/etc/passwd"}, "link"),
    ],
    ids=["dot-dot", "absolute", "symlink"],
)
def test_unpacking_refuses_escapes_and_links(tmp_path, members, links, why):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(members, links))
    with pytest.raises(ArchiveRefused, match=why):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_unpacking_is_bounded_and_refuses_a_truncated_archive(tmp_path):
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(tar_gz({"a.bin": b"\0" * 5000, "b.bin": b"\0" * 5000}))
    with pytest.raises(ArchiveRefused, match="more than"):
        unpack(archive, tmp_path / "out", max_bytes=8000)
    data = tar_gz({"a.bin": os.urandom(50_000)})
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveRefused, match="truncated or damaged"):
        unpack(archive, tmp_path / "out2")


# -- the whole way: download, verify, find, convert, cache, serve ---------------------------------------------
def test_first_start_downloads_and_serves_lam_second_start_downloads_nothing(tmp_path, released_archive, config_file):
    with StandInHub({REPO: {DEFAULT_FILE: released_archive}}) as hub:
        env = hub_env(hub, tmp_path / "hf")
        args = ["app.py", "--weight", URI, "--config-file", str(config_file), "--model", "lam"]
        for run in ("first", "second"):
            port = free_port()
            proc = start(args, port, env)
            try:
                health = requests.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()
                assert health["model"]["name"] == "lam-a2e", health
                assert health["model"]["weights"].endswith(".safetensors")
            finally:
                stop(proc)
            log = proc.stdout.read()
            if run == "first":
                assert len(hub.gets()) == 1, hub.requests  # one download of the archive
                assert "pretrained_models/lam_audio2exp_streaming.tar" in log  # found by content, among others
                assert "downloading" in log and "100 %" in log  # progress lines in the log
            else:
                assert len(hub.gets()) == 1, hub.requests  # no second download
                assert "from the cache" in log
    converted = list((tmp_path / "hf" / "lam-a2e").rglob("*.safetensors"))
    assert [p.parent.name for p in converted] == [COMMIT]  # keyed by the repository's commit
    record = json.loads(converted[0].with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(converted[0].read_bytes()).hexdigest()
    assert record["file_sha256"] == hashlib.sha256(released_archive).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """HF_HOME for in-process fetches (a2e.hub reads it, and offline mode, at each call)."""
    for name in [k for k in os.environ if k.startswith("HF_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_offline_uses_the_cache_and_without_it_the_server_names_the_repo_and_the_manual_steps(
    tmp_path, home, monkeypatch, released_archive, dims, config_file
):
    with StandInHub({REPO: {DEFAULT_FILE: released_archive}}) as hub:
        first = fetch(URI, dims, endpoint=hub.url)
        asked = len(hub.requests)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert fetch(URI, dims, endpoint=hub.url) == first
        assert len(hub.requests) == asked  # offline: not a single request
        # Offline with an empty cache: the server does not start, and says why and what to do.
        empty = subprocess.run(
            [sys.executable, "app.py", "--weight", URI, "--config-file", str(config_file), "--port", str(free_port())],
            cwd=ROOT, env=hub_env(hub, tmp_path / "empty", HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert empty.returncode == 2
    assert REPO in empty.stderr and "HF_HUB_OFFLINE" in empty.stderr and "hf download" in empty.stderr
    assert "tar -xzf" in empty.stderr


def test_an_unreachable_hub_names_the_repo_and_the_manual_steps(home, dims):
    with pytest.raises(HubError, match="cannot reach the hub") as failure:
        fetch(URI, dims, endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert REPO in str(failure.value) and "hf download" in str(failure.value)


def test_a_tampered_download_is_refused_and_removed(home, released_archive, dims):
    with StandInHub({REPO: {DEFAULT_FILE: released_archive}}) as hub:
        forged = bytearray(released_archive)
        forged[len(forged) // 2] ^= 0xFF  # same length, one byte changed
        hub.tampered[DEFAULT_FILE] = bytes(forged)
        with pytest.raises(HubError, match="SHA-256.*tampered"):
            fetch(URI, dims, endpoint=hub.url)
        left = [p for p in home.rglob("*") if p.is_file()]
        assert not left  # nothing converted, and the bad download is gone: the next try downloads it afresh
        hub.tampered.clear()
        assert fetch(URI, dims, endpoint=hub.url).is_file()
        assert len(hub.gets()) == 2


def test_a_truncated_archive_and_an_archive_without_the_checkpoint_are_refused(home, released_archive, dims):
    truncated = released_archive[: len(released_archive) // 2]  # as published: its checksum matches
    elsewhere = tar_gz({"README.md": b"no weights here"})
    with StandInHub({REPO: {DEFAULT_FILE: truncated, "other.tar": elsewhere}}) as hub:
        with pytest.raises(ArchiveRefused, match="truncated or damaged"):
            fetch(URI, dims, endpoint=hub.url)
        with pytest.raises(HubError, match="tensors of the LAM-A2E layout in README.md"):
            fetch(f"{URI}/other.tar", dims, endpoint=hub.url)
        with pytest.raises(HubError, match="no revision 'v9'"):
            fetch(f"{URI}@v9", dims, endpoint=hub.url)
        with pytest.raises(HubError, match="no such repository"):
            fetch("hf://test-org/elsewhere", dims, endpoint=hub.url)
    assert not list(home.rglob("*.safetensors"))


def test_an_interrupted_download_resumes_where_it_stopped(home, released_archive, dims):
    """What a stopped download leaves (Ctrl-C, a node going away) is the
    first part of the file; the next run asks only for the rest."""
    with StandInHub({REPO: {DEFAULT_FILE: released_archive}}) as hub:
        cut = len(released_archive) // 3
        part = home / "lam-a2e" / "test-org--LAM_audio2exp" / COMMIT / (DEFAULT_FILE + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(released_archive[:cut])
        path = fetch(URI, dims, endpoint=hub.url)
        ranges = [r for method, _, r in hub.requests if method == "GET"]
    assert ranges == [f"bytes={cut}-"], hub.requests
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["file_sha256"] == hashlib.sha256(released_archive).hexdigest()  # the two parts make the whole
    assert not list(home.rglob("*.part")) and not list(home.rglob("*.tar"))  # the archive is not kept


def test_the_fetch_command_prints_the_converted_file(tmp_path, released_archive, config_file):
    with StandInHub({REPO: {DEFAULT_FILE: released_archive}}) as hub:
        out = fetch_cli(hub_env(hub, tmp_path / "hf"), config_file)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_file() and path.suffix == ".safetensors" and path.is_relative_to(tmp_path / "hf" / "lam-a2e")
    assert "checkpoint found" in out.stderr and "downloading" in out.stderr
