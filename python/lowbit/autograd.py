"""Autograd for the fused 4-bit matmul: gradients for the input and the bias, none for W."""

from __future__ import annotations

import torch

from . import ops
from ._validate import check_matmul_args, check_same_device
from .quant4bit import Quant4bit


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nbs):
        ctx.w = (codes, absmax, code, blocksize, x2d.shape[1], nested_absmax, nested_code, offset, nbs)
        ctx.has_bias = bias is not None
        fwd = ops.matmul_4bit_2d if torch.compiler.is_compiling() else ops._matmul_4bit_impl
        return fwd(x2d, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nbs, bias)

    @staticmethod
    def backward(ctx, gy):
        codes, absmax, code, blocksize, k, nabs, ncode, off, nbs = ctx.w
        gx = gb = None
        if ctx.needs_input_grad[0]:
            bwd = ops.matmul_4bit_grad_x_2d if torch.compiler.is_compiling() else ops._matmul_4bit_grad_x_impl
            gx = bwd(gy.contiguous(), codes, absmax, code, blocksize, k, nabs, ncode, off, nbs)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = gy.float().sum(0)
        return gx, gb, None, None, None, None, None, None, None, None, None


def matmul_4bit(x: torch.Tensor, q: Quant4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias where W [out, in] is `q`; any leading batch dims on x.

    x: fp16/bf16/fp32 with last dim `in`. On CUDA this runs the fused Triton kernels (fp32 x uses
    tf32 dots); elsewhere the reference. The result has x's dtype.
    """
    if not isinstance(q, Quant4bit):
        raise TypeError(f"q must be a lowbit.Quant4bit, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must hold a 2-D weight [out_features, in_features], got shape {tuple(q.shape)}")
    n, k = q.shape
    bias = check_matmul_args(x, n, k, bias)
    check_same_device(x=x, codes=q.codes, bias=bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    absmax, nabs, ncode, off = q.scale_tensors()
    y = _Matmul4bit.apply(x2d, bias, q.codes, absmax, q.code, q.blocksize, n, nabs, ncode, off, q.nested_blocksize)
    return y.reshape(*lead, n)
