"""The network against the spec, and strict checkpoint loading (both namings,
with and without ``module.``), including the full released layout."""

import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from a2e.checkpoint import convert_to_safetensors, load_model, normalise_keys, read_state_dict, save_checkpoint
from a2e.errors import CheckpointError
from a2e.model import Audio2Expression, ModelDims
from tests.conftest import make_model, tiny_dims


def spec_released_keys() -> set[str]:
    """The 249 keys of spec section 2.3, written out from the spec, not from the model."""
    enc = "audio_encoder."
    keys = {enc + "masked_spec_embed"}
    keys |= {f"{enc}feature_extractor.conv_layers.{i}.conv.weight" for i in range(7)}
    keys |= {f"{enc}feature_extractor.conv_layers.0.layer_norm.{p}" for p in ("weight", "bias")}
    keys |= {f"{enc}feature_projection.{m}.{p}" for m in ("layer_norm", "projection") for p in ("weight", "bias")}
    keys |= {f"{enc}encoder.pos_conv_embed.conv.bias"}
    keys |= {f"{enc}encoder.pos_conv_embed.conv.parametrizations.weight.original{i}" for i in (0, 1)}
    keys |= {f"{enc}encoder.layer_norm.{p}" for p in ("weight", "bias")}
    for i in range(12):
        layer = f"{enc}encoder.layers.{i}."
        keys |= {f"{layer}attention.{q}_proj.{p}" for q in "qkv" for p in ("weight", "bias")}
        keys |= {f"{layer}attention.out_proj.{p}" for p in ("weight", "bias")}
        keys |= {f"{layer}{m}.{p}" for m in ("layer_norm", "final_layer_norm") for p in ("weight", "bias")}
        keys |= {f"{layer}feed_forward.{m}.{p}" for m in ("intermediate_dense", "output_dense") for p in ("weight", "bias")}
    keys |= {f"{enc}lm_head.{p}" for p in ("weight", "bias")}
    keys |= {f"feature_projection.{p}" for p in ("weight", "bias")}
    keys |= {f"identity_encoder.id_mlp.{p}" for p in ("weight", "bias")}
    for i in range(3):
        keys |= {f"identity_encoder.first_net.conv_layers.{i}.{m}.{p}" for m in ("conv", "norm") for p in ("weight", "bias")}
        keys |= {f"decoder.0.{i}.{m}.{p}" for m in ("conv", "norm") for p in ("weight", "bias")}
    keys |= {f"identity_encoder.first_net.conv_layers.0.residual_layer.0.{p}" for p in ("weight", "bias")}
    keys |= {f"identity_encoder.grus.{p}" for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
    keys |= {f"output_proj.{p}" for p in ("weight", "bias")}
    return keys


# -- the full released layout (the only tests that build 100 M parameters) ----


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    model = Audio2Expression(ModelDims.released()).eval()
    d = tmp_path_factory.mktemp("released")
    new, old = d / "new.tar", d / "old_ddp.tar"
    save_checkpoint(model, new)
    save_checkpoint(model, old, weight_norm_naming="weight_g", ddp_prefix=True)
    return model, new, old


@pytest.mark.slow
def test_released_layout_has_the_spec_keys_and_shapes(released):
    model, new, old = released
    sd = model.state_dict()
    assert len(sd) == 249
    assert set(sd) == spec_released_keys()
    assert sd["audio_encoder.encoder.pos_conv_embed.conv.parametrizations.weight.original0"].shape == (1, 1, 128)
    assert sd["audio_encoder.encoder.pos_conv_embed.conv.parametrizations.weight.original1"].shape == (768, 48, 128)
    assert sd["identity_encoder.id_mlp.weight"].shape == (64, 12, 1)
    assert sd["audio_encoder.lm_head.weight"].shape == (32, 1024)
    assert 100e6 < sum(v.numel() for v in sd.values()) < 103e6
    on_disk = read_state_dict(new)
    assert all(k.startswith("backbone.") for k in on_disk) and len(on_disk) == 249
    old_keys = read_state_dict(old)
    assert any(k.endswith("pos_conv_embed.conv.weight_g") for k in old_keys)
    assert all(k.startswith("module.backbone.") for k in old_keys)


@pytest.mark.slow
def test_released_layout_loads_strictly_in_both_namings(released):
    model, new, old = released
    x = torch.randn(1, 34133) * 0.1
    ident = F.one_hot(torch.tensor([5]), 12).float()
    with torch.inference_mode():
        want = model(x, ident)
        assert want.shape == (1, 64, 52)
        for path in (new, old):
            got = load_model(path, ModelDims.released())(x, ident)
            assert torch.equal(got, want)


# -- the network against the spec, on a small model ------------------------------


def _conv_norm_relu(block, x, residual):
    out = F.conv1d(x, block.conv.weight, block.conv.bias, padding=1)
    out = F.layer_norm(out.transpose(1, 2), (out.shape[1],), block.norm.weight, block.norm.bias).transpose(1, 2)
    if residual is not None:
        out = out + residual
    return F.relu(out)


def spec_forward(model, audio, identity):
    """Spec section 2, step by step."""
    T = math.ceil(audio.shape[1] / 16000 * 30)
    enc = model.audio_encoder
    feats = enc.feature_extractor(audio)  # [B, C, L]
    feats = F.interpolate(feats, size=T, mode="linear", align_corners=True)
    hidden = enc.feature_projection(feats.transpose(1, 2))[0]
    hidden = enc.encoder(hidden).last_hidden_state
    x = model.feature_projection(hidden).transpose(1, 2)
    ie = model.identity_encoder
    ident = F.conv1d(identity[:, :, None].repeat(1, 1, T), ie.id_mlp.weight, ie.id_mlp.bias)
    x = torch.cat([x, ident], 1)
    blocks = ie.first_net.conv_layers
    res0 = F.conv1d(x, blocks[0].residual_layer[0].weight, blocks[0].residual_layer[0].bias, padding=1)
    x = _conv_norm_relu(blocks[0], x, res0)
    x = _conv_norm_relu(blocks[1], x, x)
    x = _conv_norm_relu(blocks[2], x, x)
    for block in model.decoder[0]:
        x = _conv_norm_relu(block, x, None)
    return torch.sigmoid(F.linear(x.transpose(1, 2), model.output_proj.weight, model.output_proj.bias))


@pytest.mark.parametrize("n", [34133, 16000, 4801])
def test_forward_follows_the_spec(model, n):
    audio = torch.randn(2, n) * 0.1
    ident = F.one_hot(torch.tensor([0, 7]), 12).float()
    with torch.inference_mode():
        got = model(audio, ident)
        want = spec_forward(model, audio, ident)
    assert got.shape == (2, math.ceil(n / 16000 * 30), 52)
    assert torch.allclose(got, want, atol=1e-6)
    assert float(got.min()) > 0 and float(got.max()) < 1


def test_identity_changes_output(model):
    audio = torch.randn(1, 34133) * 0.1
    with torch.inference_mode():
        a = model(audio, F.one_hot(torch.tensor([0]), 12).float())
        b = model(audio, F.one_hot(torch.tensor([11]), 12).float())
    assert (a - b).abs().max() > 1e-3


def test_transformer_variant_round_trip(tmp_path):
    dims = tiny_dims(use_transformer=True, num_identity_classes=20, num_attention_heads=4, num_transformer_layers=2)
    model = make_model(dims)
    assert any(k.startswith("identity_encoder.transformer_encoder.layers.1.") for k in model.state_dict())
    path = tmp_path / "t.tar"
    save_checkpoint(model, path, ddp_prefix=True)
    loaded = load_model(path, dims)
    audio = torch.randn(1, 20000) * 0.1
    ident = F.one_hot(torch.tensor([19]), 20).float()
    with torch.inference_mode():
        assert torch.equal(loaded(audio, ident), model(audio, ident))


# -- strict loading and clear errors ------------------------------------------------


def test_weight_g_naming_and_safetensors(tmp_path, model, dims):
    audio = torch.randn(1, 34133) * 0.1
    ident = F.one_hot(torch.tensor([3]), 12).float()
    with torch.inference_mode():
        want = model(audio, ident)
    for kwargs in ({"weight_norm_naming": "weight_g"}, {"fmt": "safetensors"}, {"ddp_prefix": True, "fmt": "safetensors"}):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        save_checkpoint(model, path, **kwargs)
        with torch.inference_mode():
            assert torch.equal(load_model(path, dims)(audio, ident), want)


def _save_state(path, state):
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)


def test_missing_extra_and_mismatched_tensors_are_named(tmp_path, model, dims):
    sd = {"backbone." + k: v for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing["backbone.output_proj.bias"]
    _save_state(tmp_path / "missing.tar", missing)
    with pytest.raises(CheckpointError, match=r"1 missing tensor.*output_proj\.bias"):
        load_model(tmp_path / "missing.tar", dims)
    extra = dict(sd, **{"backbone.decoder.1.weight": torch.zeros(3)})
    _save_state(tmp_path / "extra.tar", extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*decoder\.1\.weight"):
        load_model(tmp_path / "extra.tar", dims)
    shape = dict(sd, **{"backbone.output_proj.weight": torch.zeros(51, dims.hidden_dim)})
    _save_state(tmp_path / "shape.tar", shape)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*output_proj\.weight: file \(51, 32\)"):
        load_model(tmp_path / "shape.tar", dims)


def test_identity_count_mismatch_hints_at_config(tmp_path, dims):
    other = make_model(tiny_dims(num_identity_classes=5))
    save_checkpoint(other, tmp_path / "five.tar")
    with pytest.raises(CheckpointError, match="5 identities, the config 12"):
        load_model(tmp_path / "five.tar", dims)


def test_unreadable_files(tmp_path, checkpoint, dims):
    (tmp_path / "text.tar").write_text("this is not a checkpoint at all")
    (tmp_path / "empty.tar").write_bytes(b"")
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], tmp_path / "list.tar")
    cases = {
        "text.tar": "not a readable torch checkpoint",
        "empty.tar": "is empty",
        "truncated.tar": "truncated",
        "list.tar": "no state_dict",
        "nope.tar": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / name, dims)


class Opaque:
    """A pickled object that weights_only loading must refuse."""

    def __init__(self):
        self.note = "trusted training state"


def test_pickled_objects_are_refused_with_a_conversion_command(tmp_path, model, dims):
    path = tmp_path / "objects.tar"
    sd = {"backbone." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "extra": Opaque()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, dims)
    message = str(info.value)
    assert "weights_only" in message
    assert re.search(r"python -m a2e\.checkpoint convert --trust \S+objects\.tar \S+objects\.safetensors", message)
    out = tmp_path / "objects.safetensors"
    assert convert_to_safetensors(path, out) == len(sd)
    audio = torch.randn(1, 34133) * 0.1
    ident = F.one_hot(torch.tensor([1]), 12).float()
    with torch.inference_mode():
        assert torch.equal(load_model(out, dims)(audio, ident), model(audio, ident))


def test_normalise_keys_rejects_duplicates():
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="twice"):
        normalise_keys({"backbone.a.weight": t, "module.backbone.a.weight": t})
    assert set(normalise_keys({"module.backbone.x.weight_g": t})) == {"x.parametrizations.weight.original0"}


def test_pickle_is_never_executed(tmp_path, dims):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.tar"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Boom()}, f)
    with pytest.raises(CheckpointError):
        load_model(path, dims)
    assert not (tmp_path / "pwned").exists()
