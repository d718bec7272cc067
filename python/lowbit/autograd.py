"""The autograd Functions of every family and the public matmuls built on them.

  matmul_4bit(x, q, bias)          y = x @ W^T + bias, W a Quant4bit: grads for x and bias
  matmul_int(x, q, scale, bias)    W = scale * (Q - z): grads for x, scale (PEQA) and bias
  (SZ layers decode W and call F.linear, whose autograd already covers x and bias.)

The Functions call lowbit._ops only; the weight's codes are never differentiated.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._validate import check_matmul_args, check_same_device
from .formats.intq import QuantInt
from .formats.nf4 import Quant4bit
from .functional import check_int_scale


class Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nbs):
        ctx.w = (codes, absmax, code, blocksize, x2d.shape[1], nested_absmax, nested_code, offset, nbs)
        ctx.has_bias = bias is not None
        return _ops.matmul_4bit(x2d, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nbs, bias)

    @staticmethod
    def backward(ctx, gy):
        codes, absmax, code, blocksize, k, nabs, ncode, off, nbs = ctx.w
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = _ops.matmul_4bit_grad_x(gy.contiguous(), codes, absmax, code, blocksize, k, nabs, ncode, off, nbs)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = gy.float().sum(0)
        return gx, gb, None, None, None, None, None, None, None, None, None


def matmul_4bit(x: Tensor, q: Quant4bit, bias: Optional[Tensor] = None) -> Tensor:
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
    absmax, nabs, ncode, off = q.scale_tensors()
    return matmul_4bit_unchecked(x, q.codes, absmax, q.code, q.blocksize, n, k, nabs, ncode, off, q.nested_blocksize,
                                 bias)


def matmul_4bit_unchecked(x, codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                          nested_blocksize, bias) -> Tensor:
    """matmul_4bit on arguments already checked (Linear4bit's own buffers): the decode-time path,
    where each microsecond of Python is a sizeable part of the call. Without a gradient to compute
    it calls the op directly (an autograd.Function costs ~5 us even under no_grad)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    args = (codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = Matmul4bit.apply(x2d, bias, *args)
    else:
        y = _ops.matmul_4bit(x2d, *args, bias)
    # 2-D x: return the op's output itself, not a view of it (FSDP2 warns on views)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


class MatmulInt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, scale, bias, codes, zeros, bits, group_len, n):
        ctx.meta = (bits, group_len, n, x2d.shape[1], scale.shape, scale.dtype)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, scale, codes, zeros)
        return _ops.int_matmul(x2d, codes, scale, zeros, bits, group_len, n, bias)

    @staticmethod
    def backward(ctx, gy):
        bits, group_len, n, k, s_shape, s_dtype = ctx.meta
        x2d, scale, codes, zeros = ctx.saved_tensors
        gy = gy.contiguous()
        gx = gs = gb = None
        if ctx.needs_input_grad[0]:
            gx = _ops.int_matmul_grad_x(gy, codes, scale, zeros, bits, group_len, k)
        if ctx.needs_input_grad[1]:
            gs = _ops.int_matmul_grad_scale(gy, x2d, codes, zeros, bits, group_len).reshape(s_shape).to(s_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.float().sum(0)
        return gx, gs, gb, None, None, None, None, None


def matmul_int(x: Tensor, q: QuantInt, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T + bias with W = scale * (Q - z) from `q`; any leading batch dims on x.

    scale: the (trainable) scales, shape [out] or [out, in/group_size] like q.scale; default
    q.scale. Gradients flow to x, scale and bias; the codes and zero points are frozen. On CUDA
    this runs the fused Triton kernels (fp32 x uses tf32 dots); elsewhere the reference.
    """
    if not isinstance(q, QuantInt):
        raise TypeError(f"q must be a lowbit.QuantInt, got {type(q).__name__}")
    scale = q.scale if scale is None else check_int_scale(scale, q)
    n, k = q.shape
    bias = check_matmul_args(x, n, k, bias)
    check_same_device(x=x, codes=q.codes, scale=scale, bias=bias)
    return matmul_int_unchecked(x, scale, bias, q.codes, q.zeros, q.bits, q.group_len, n, k)


def matmul_int_unchecked(x, scale, bias, codes, zeros, bits, group_len, n, k) -> Tensor:
    """matmul_int on arguments already checked (IntLinear's own buffers): the decode-time path. Without
    a gradient to compute (no_grad, or nothing that needs one) it calls the op directly."""
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = MatmulInt.apply(x2d, scale, bias, codes, zeros, bits, group_len, n)
    else:
        y = _ops.int_matmul(x2d, codes, scale, zeros, bits, group_len, n, bias)
    # 2-D x: return the op's output itself, not a view of it (FSDP2 warns on views)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


__all__ = ["Matmul4bit", "MatmulInt", "matmul_4bit", "matmul_int"]
