"""Reduced precision (bf16, fp16) where a device's kernels get it wrong.

Some CPU builds compute certain convolutions in bf16 plainly wrongly: torch
2.13.0's oneDNN path on a CPU with AMX gives a grouped 1-D convolution with
few channels per group (8 or fewer; kernel 128, as in wav2vec 2.0's
positional convolution of a small model) a relative error near 1 instead of
bf16's usual ~0.003, so every output frame is wrong. (The released model's
48 channels per group come out right.) Rather than keep a list of such
builds and shapes, each convolution of a reduced-precision model is tried
once on its device when the model is placed there, and one that disagrees
with float32 is computed in float32 from then on (its input and output stay
in the model's dtype). Correct kernels are left alone.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
import torch.nn.functional as F

log = logging.getLogger("a2e.precision")

# Mean relative error of a trial convolution above which its kernel is taken
# as broken: rounding to bf16 gives about 0.003, the broken kernel about 1.
MAX_RELATIVE_ERROR = 0.05
TRIAL_FRAMES = 64


class Float32Conv1d(nn.Module):
    """A Conv1d computed in float32 inside a model of another dtype."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float()).to(x.dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # A later model.to(dtype) must not take the convolution out of float32.
        super()._apply(fn, recurse)
        self.conv.float()
        return self


def conv_error(conv: nn.Conv1d, dtype: torch.dtype) -> float:
    """Mean relative error of ``conv`` computed in ``dtype`` against float32,
    on its device and with its own weights (random input, fixed seed)."""
    weight = conv.weight.detach().float()
    bias = None if conv.bias is None else conv.bias.detach().float()
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, conv.in_channels, TRIAL_FRAMES * conv.stride[0], generator=generator, device=weight.device)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.inference_mode():
        want = F.conv1d(x, weight, bias, *args)
        got = F.conv1d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *args).float()
    return float((got - want).abs().mean() / want.abs().mean().clamp_min(1e-12))


def keep_float32_where_inexact(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace each Conv1d of ``model`` (already in ``dtype`` on its device)
    whose ``dtype`` kernel is broken there by a ``Float32Conv1d``; returns
    the replaced layers' names."""
    if dtype == torch.float32:
        return []
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Conv1d or conv_error(module, dtype) <= MAX_RELATIVE_ERROR:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, Float32Conv1d(module))
        replaced.append(name)
    if replaced:
        log.warning(
            "this device computes %d convolution(s) wrongly in %s (%s): they run in float32",
            len(replaced), str(dtype).removeprefix("torch."), ", ".join(replaced),
        )  # fmt: skip
    return replaced
