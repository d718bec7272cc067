"""Machinery shared by the kernel files: output allocation and the grouped tile order."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def alloc_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, except under LOWBIT_POISON=1 (the tests): NaN (0xAB for bytes) everywhere, so
    an element a kernel failed to write cannot pass a comparison."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if os.environ.get("LOWBIT_POISON") == "1":
        fill = float("nan") if dtype.is_floating_point else 0xAB
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row-tiles in a row share each
    column-tile of the weight while it is hot in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n
