"""lowbit's ops, declared once with torch.library (so they trace under torch.compile).

Each op has a reference implementation (lowbit.reference, any device) and a Triton one
(lowbit.kernels, CUDA); `_backend.use_triton` picks per call from the input's device. The
functions here take plain tensors and ints: the public, validated API lives in quant4bit.py,
autograd.py and nn.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._backend import kernels, use_triton


@torch.library.custom_op("lowbit::quantize_4bit", mutates_args=())
def quantize_4bit_codes(flat: Tensor, blocksize: int, bounds: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(flat):
        return kernels().quant4bit.quantize_4bit(flat, blocksize, bounds, order)
    return reference.quantize_4bit(flat, blocksize, bounds, order)


@quantize_4bit_codes.register_fake
def _(flat, blocksize, bounds, order):
    n = flat.numel()
    return flat.new_empty((n + 1) // 2, dtype=torch.uint8), flat.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("lowbit::dequantize_4bit", mutates_args=())
def dequantize_4bit_flat(
    codes: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
) -> Tensor:
    if use_triton(codes):
        return kernels().quant4bit.dequantize_4bit(
            codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize
        )
    scales = reference.block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(codes, scales, code, blocksize, numel, dtype)


@dequantize_4bit_flat.register_fake
def _(codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize):
    return codes.new_empty(numel, dtype=dtype)


def _kernel_ok(k: int, blocksize: int) -> bool:
    # The fused kernels index W by rows, which needs whole blocks per row.
    return k % blocksize == 0


def _matmul_4bit_impl(
    x: Tensor,
    codes: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    n: int,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
    bias: Optional[Tensor],
) -> Tensor:
    """y = x @ W^T + bias for x [M, K], W [n, K] stored as 4-bit codes."""
    k = x.shape[1]
    if use_triton(x) and _kernel_ok(k, blocksize) and x.shape[0] > 0:
        return kernels().matmul4bit.matmul_4bit(
            x.contiguous(), codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset,
            nested_blocksize, bias,
        )
    w = dequantize_4bit_flat(
        codes, absmax, code, blocksize, n * k, torch.float32, nested_absmax, nested_code, offset, nested_blocksize
    ).view(n, k)
    return reference.matmul_dequantized(x, w, bias)


# Eager callers (autograd.py) call the _impl functions directly: custom-op dispatch costs tens of
# microseconds per call, as much as a whole decode-sized kernel. Under torch.compile they go
# through the registered op.
matmul_4bit_2d = torch.library.custom_op("lowbit::matmul_4bit", mutates_args=())(_matmul_4bit_impl)


@matmul_4bit_2d.register_fake
def _(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize, bias):
    return x.new_empty((x.shape[0], n))


def _matmul_4bit_grad_x_impl(
    g: Tensor,
    codes: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    k: int,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
) -> Tensor:
    """gx = g @ W for g [M, n], W [n, k] stored as 4-bit codes."""
    n = g.shape[1]
    if use_triton(g) and _kernel_ok(k, blocksize) and g.shape[0] > 0:
        return kernels().matmul4bit.matmul_4bit_grad_x(
            g.contiguous(), codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset, nested_blocksize
        )
    w = dequantize_4bit_flat(
        codes, absmax, code, blocksize, n * k, torch.float32, nested_absmax, nested_code, offset, nested_blocksize
    ).view(n, k)
    return (g.float() @ w).to(g.dtype)


matmul_4bit_grad_x_2d = torch.library.custom_op("lowbit::matmul_4bit_grad_x", mutates_args=())(
    _matmul_4bit_grad_x_impl
)


@matmul_4bit_grad_x_2d.register_fake
def _(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset, nested_blocksize):
    return g.new_empty((g.shape[0], k))
