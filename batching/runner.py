"""How a batch runs on the device: eager PyTorch, or replays of CUDA graphs
captured once per bucket size (1, 2, 4, 8 ... max) with static buffers.

The runner knows nothing of sessions, queues or HTTP: it takes ``[n, 34133]``
windows with identities and returns ``[n, 64, 52]``; on CUDA it pads ``n`` up
to the next captured size. It implements ``a2e.backend.Backend``.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from a2e.backend import TorchBackend
from a2e.constants import NUM_BLENDSHAPES, WINDOW_FRAMES, WINDOW_SAMPLES
from a2e.model import Audio2Expression, fold_weight_norm

from . import metrics
from .errors import Cancelled

log = logging.getLogger("a2e.runner")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


class ModelRunner(TorchBackend):
    """Batched execution of one model on one device (eager, or CUDA graphs)."""

    def __init__(
        self,
        model: Audio2Expression,
        device: str | torch.device = "cpu",
        *,
        dtype: str = "fp32",
        max_batch: int = 8,
        cuda_graphs: bool = True,
        compile: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        # Weight norm recomputes the weight on every call and cannot be captured
        # as-is; folding it gives the same outputs.
        fold_weight_norm(model)
        super().__init__(model, device, DTYPES[dtype])
        self.dtype_name = dtype
        self.max_batch = max_batch
        self.buckets = default_buckets(max_batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.mode = "eager"
        if compile:
            try:
                self._forward = torch.compile(self.model, mode="max-autotune-no-cudagraphs", dynamic=False)
                self.mode = "compile"
            except Exception:  # compile is an optimisation, never a reason not to serve
                log.exception("torch.compile failed; running eager")
        if self.device.type == "cuda" and cuda_graphs:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        try:
            pool = None
            for b in reversed(self.buckets):  # largest first, so smaller ones reuse its pool
                x = torch.zeros(b, WINDOW_SAMPLES, device=self.device, dtype=self.dtype)
                ident = torch.zeros(b, self.num_identities, device=self.device, dtype=self.dtype)
                ident[:, 0] = 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side), torch.inference_mode():
                    for _ in range(3):  # warm-up: cuDNN autotuning, compile
                        self._forward(x, ident)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                    out = self._forward(x, ident)
                pool = graph.pool()
                self.graphs[b] = (graph, x, ident, out)
            torch.cuda.synchronize(self.device)
        except Exception:
            log.exception("CUDA graph capture failed; falling back to eager batches")
            self.graphs.clear()
            return
        self.mode = "cuda_graphs" if self.mode == "eager" else "compile+cuda_graphs"
        log.info(
            "captured %d CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.buckets,
            time.perf_counter() - t0,
        )

    interruptible = True  # run_clip takes ``stop``

    def run_clip(self, audio: np.ndarray, identity: int, stop: threading.Event | None = None) -> np.ndarray:
        """One pass over a whole clip; once ``stop`` is set (its request went
        away), the pass ends before the next module with Cancelled, instead
        of running on for seconds for an answer nobody reads."""
        if stop is None:
            return super().run_clip(audio, identity)

        def check(module: torch.nn.Module, args: tuple) -> None:
            if stop.is_set():
                raise Cancelled("the request was cancelled")

        hooks = [m.register_forward_pre_hook(check) for m in self.model.modules()]
        try:
            return super().run_clip(audio, identity)
        finally:
            for hook in hooks:
                hook.remove()

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return self.buckets[-1]

    @torch.inference_mode()
    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows, dtype=np.float32)
        identities = np.asarray(identities, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES:
            raise ValueError(f"windows must be [B, {WINDOW_SAMPLES}], got {windows.shape}")
        if identities.min(initial=0) < 0 or identities.max(initial=0) >= self.num_identities:
            raise ValueError(f"identity out of range 0..{self.num_identities - 1}")
        if not self.graphs:
            # Eager (CPU or fallback): one pass over the whole batch, no padding.
            return super().run_windows(windows, identities)
        result = np.empty((len(windows), WINDOW_FRAMES, NUM_BLENDSHAPES), dtype=np.float32)
        for start in range(0, len(windows), self.buckets[-1]):
            n = min(self.buckets[-1], len(windows) - start)
            b = self.bucket_for(n)
            graph, x, ident, out = self.graphs[b]
            x[:n].copy_(torch.from_numpy(windows[start : start + n]))
            x[n:].zero_()
            ident.copy_(F.one_hot(torch.as_tensor(np.pad(identities[start : start + n], (0, b - n))), self.num_identities))
            graph.replay()
            result[start : start + n] = out[:n].float().cpu().numpy()
            metrics.child(metrics.GRAPH_REPLAYS).inc()
            metrics.child(metrics.PADDED_ROWS).inc(b - n)
        return result
