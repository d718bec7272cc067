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


@triton.jit
def store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the forward kernels: add the bias (only when not split: the launcher adds it
    after reducing split-K partials) and store the [BM, BN] tile of split `pid_k`."""
    if HAS_BIAS:
        if SPLIT_K == 1:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
