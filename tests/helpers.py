"""Shared test helpers: error metrics, poisoning, the interpreter routing switch."""

from __future__ import annotations

import contextlib
import os

import torch

# METHOD.md tolerances for ||out - ref|| / ||ref|| against a float64 reference.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TOL_TF32 = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN/Inf anywhere gives inf so that it never passes."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-300))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t full of NaN (floats) or 0xAB (ints): unwritten outputs show up."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, 0xAB)


@contextlib.contextmanager
def triton_on_cpu():
    """Route lowbit ops on CPU tensors through the Triton kernels (interpreter)."""
    old = os.environ.get("LOWBIT_CPU_BACKEND")
    os.environ["LOWBIT_CPU_BACKEND"] = "triton"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWBIT_CPU_BACKEND"]
        else:
            os.environ["LOWBIT_CPU_BACKEND"] = old
