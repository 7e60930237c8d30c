"""Reduced precision where a device's kernels are wrong (a2e.precision): a
convolution whose bf16 kernel disagrees with float32 runs in float32."""

import torch
from torch import nn

from a2e import precision


def grouped_conv(seed: int = 0) -> nn.Conv1d:
    torch.manual_seed(seed)
    return nn.Conv1d(64, 64, kernel_size=128, padding=64, groups=16)


def test_a_sound_bf16_convolution_errs_by_rounding_only():
    # An ungrouped convolution is computed correctly in bf16 everywhere we know of.
    conv = nn.Conv1d(32, 32, kernel_size=3, padding=1)
    assert 0 < precision.conv_error(conv, torch.bfloat16) < precision.MAX_RELATIVE_ERROR


def test_a_broken_kernel_is_replaced_and_computes_in_float32(monkeypatch):
    model = nn.Sequential(grouped_conv(), nn.GELU(), nn.Conv1d(64, 8, 1))
    x = torch.randn(2, 64, 100)
    with torch.inference_mode():
        want = model(x)
    low = nn.Sequential(grouped_conv(), nn.GELU(), nn.Conv1d(64, 8, 1))
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16)
    # Stand in for a broken device: every convolution "disagrees" here.
    monkeypatch.setattr(precision, "MAX_RELATIVE_ERROR", -1.0)
    assert precision.keep_float32_where_inexact(low, torch.bfloat16) == ["0", "2"]
    assert isinstance(low[0], precision.Float32Conv1d) and low[0].conv.weight.dtype == torch.float32
    low = low.to(torch.bfloat16)  # a later cast keeps the replaced layers in float32
    assert low[0].conv.weight.dtype == torch.float32
    with torch.inference_mode():
        got = low(x.bfloat16())
    assert got.dtype == torch.bfloat16
    # Only the bf16 weights, the GELU and the dtype changes between layers round now.
    assert float((got.float() - want).abs().mean() / want.abs().mean()) < 0.02


def test_float32_models_are_never_touched(monkeypatch):
    monkeypatch.setattr(precision, "MAX_RELATIVE_ERROR", -1.0)
    model = nn.Sequential(grouped_conv())
    assert precision.keep_float32_where_inexact(model, torch.float32) == []
    assert type(model[0]) is nn.Conv1d


def test_this_machines_bf16_grouped_convolution_is_caught_or_correct():
    # Whatever this CPU's kernel does, a model placed in bf16 ends up with a
    # positional-convolution-shaped layer that is within bf16 rounding.
    model = nn.Sequential(grouped_conv(3)).to(torch.bfloat16)
    precision.keep_float32_where_inexact(model, torch.bfloat16)
    layer = model[0]
    conv = layer.conv if isinstance(layer, precision.Float32Conv1d) else layer
    x = torch.randn(2, 64, 200)
    with torch.inference_mode():
        want = nn.functional.conv1d(x, conv.weight.float(), conv.bias.float(), padding=64, groups=16)
        got = model(x.bfloat16()).float()
    assert float((got - want).abs().mean() / want.abs().mean()) < 0.02
