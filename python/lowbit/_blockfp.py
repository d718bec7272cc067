"""The block-FP4 family's ops (MXFP4 / NVFP4) and its autograd Function, in the family's own file.

  dequantize_blockfp(packed, scales, scale_table, block, n, k, dtype)  W [n, k] in dtype
  matmul_blockfp(x, packed, scales, scale_table, block, n, bias)       y [M, n] = x @ W^T (+ bias), x's dtype
  matmul_blockfp_grad_x(g, packed, scales, scale_table, block, k)      gx [M, k] = g @ W, g's dtype

Arguments as lowbit.formats.blockfp lays them out: `packed` uint8 [n, k/2] (element 2j in the low nibble),
`scales` uint8 [n, k/block] (one byte per block of `block` = 32 (mxfp4) or 16 (nvfp4) elements of a row) and
`scale_table` fp32 [256], the factor of every scale byte (`formats.blockfp.scale_table_of`: 2^(byte-127) for
mxfp4, fp32(e4m3(byte) / global_scale) for nvfp4). With the table the kernels need no quant type: W[n, j] =
E2M1[code] * scale_table[scales[n, j // block]], for both formats.

Each op is an `_ops.Op` (a torch.library custom op with its fake, plus the eager fast path), so it is
registered, opchecked (tests/test_blockfp_ops.py) and compiled like every other family's. Each runs the Triton
kernels (lowbit.kernels.blockfp) where `_backend.use_triton` says so, the C kernels (lowbit._blockfp_cpu) on
CPU tensors with the fast backend, and the reference below (the spec's arithmetic) otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _blockfp_cpu
from ._backend import kernels, use_triton
from ._ops import Op
from .formats import blockfp as bfp

# ----------------------------------------------------------------------------------------------
# The reference (the spec's arithmetic on the op's arguments)
# ----------------------------------------------------------------------------------------------


def reference_weight(packed: Tensor, scales: Tensor, table: Tensor, block: int, n: int, k: int) -> Tensor:
    """W [n, k] fp32: E2M1 value times its block's factor, one fp32 product per element (as dequantize_blockfp)."""
    values = bfp.e2m1_decode(bfp.unpack_e2m1(packed.view(n, k // 2))).view(n, k // block, block)
    return (values * table[scales.view(n, k // block).long()][..., None]).view(n, k)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def _dequantize(packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, n: int, k: int,
                dtype: torch.dtype) -> Tensor:
    if _blockfp_cpu.enabled(packed):
        return _blockfp_cpu.dequantize(packed, scales, scale_table, block, n, k, dtype)
    return reference_weight(packed, scales, scale_table, block, n, k).to(dtype)


def _dequantize_fake(packed, scales, scale_table, block, n, k, dtype):
    return packed.new_empty((n, k), dtype=dtype)


def _matmul(x: Tensor, packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, n: int,
            bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias for x [M, K], W [n, K]."""
    if use_triton(x) and x.shape[0] > 0:
        return kernels().blockfp.matmul_blockfp(x.contiguous(), packed, scales, scale_table, block, n, bias)
    if _blockfp_cpu.enabled(x):
        return _blockfp_cpu.matmul(x, packed, scales, scale_table, block, n, bias)
    w = reference_weight(packed, scales, scale_table, block, n, x.shape[1])
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _matmul_fake(x, packed, scales, scale_table, block, n, bias):
    return x.new_empty((x.shape[0], n))


def _matmul_grad_x(g: Tensor, packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, k: int) -> Tensor:
    """gx = g @ W for g [M, n]."""
    if use_triton(g) and g.shape[0] > 0:
        return kernels().blockfp.matmul_blockfp_grad_x(g.contiguous(), packed, scales, scale_table, block, k)
    if _blockfp_cpu.enabled(g):
        return _blockfp_cpu.grad_x(g, packed, scales, scale_table, block, k)
    w = reference_weight(packed, scales, scale_table, block, g.shape[1], k)
    return (g.float() @ w).to(g.dtype)


def _matmul_grad_x_fake(g, packed, scales, scale_table, block, k):
    return g.new_empty((g.shape[0], k))


dequantize_blockfp = Op("dequantize_blockfp", _dequantize, _dequantize_fake)
matmul_blockfp = Op("matmul_blockfp", _matmul, _matmul_fake)
matmul_blockfp_grad_x = Op("matmul_blockfp_grad_x", _matmul_grad_x, _matmul_grad_x_fake)
OPS = (dequantize_blockfp, matmul_blockfp, matmul_blockfp_grad_x)


# ----------------------------------------------------------------------------------------------
# Autograd: gradients reach x and the bias; the codes and scales are frozen (LoRA trains on top)
# ----------------------------------------------------------------------------------------------


class MatmulBlockFP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, packed, scales, table, block, n):
        ctx.w = (packed, scales, table, block, x2d.shape[1])
        ctx.has_bias = bias is not None
        return matmul_blockfp(x2d, packed, scales, table, block, n, bias)

    @staticmethod
    def backward(ctx, gy):
        packed, scales, table, block, k = ctx.w
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = matmul_blockfp_grad_x(gy.contiguous(), packed, scales, table, block, k)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = gy.float().sum(0)
        return gx, gb, None, None, None, None, None


def matmul_blockfp_unchecked(x: Tensor, packed: Tensor, scales: Tensor, table: Tensor, block: int, n: int,
                             bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias on arguments already checked (a layer's own buffers); any leading dims on x. Without a
    gradient to compute it calls the op directly (an autograd.Function costs microseconds even under no_grad)."""
    k = packed.shape[-1] * 2 if packed.dim() == 2 else x.shape[-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = MatmulBlockFP.apply(x2d, bias, packed, scales, table, block, n)
    else:
        y = matmul_blockfp(x2d, packed, scales, table, block, n, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


__all__ = ["MatmulBlockFP", "OPS", "dequantize_blockfp", "matmul_blockfp", "matmul_blockfp_grad_x",
           "matmul_blockfp_unchecked", "reference_weight"]
