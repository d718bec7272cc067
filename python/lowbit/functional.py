"""The public quantize / dequantize functions of every family, validated, calling the ops.

    q = quantize_4bit(w)            # Quant4bit: bitsandbytes' bytes
    w = dequantize_4bit(q)
    q = quantize_int(w, bits=3)     # QuantInt (pure torch, in formats.intq)
    w = dequantize_int(q)
    c = sz_compress(w, 1e-3)        # SZTensor (CPU encoder, in formats.sz)
    w = sz_decompress(c, device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._validate import (
    check_choice,
    check_device,
    check_dtype,
    check_finite,
    check_float_tensor,
    check_has_values,
    check_power_of_two,
)
from .formats import codebooks
from .formats import nf4 as nf4_fmt
from .formats.intq import QuantInt, quantize_int
from .formats.nf4 import NESTED_BLOCKSIZE, QUANT_TYPES, Quant4bit
from .formats.sz import SZTensor, sz_compress

# ----------------------------------------------------------------------------------------------
# 4-bit LUT family
# ----------------------------------------------------------------------------------------------


def _quantize_with_table(flat: Tensor, blocksize: int, code: Tensor) -> tuple[Tensor, Tensor]:
    bounds, order = codebooks.quantize_bounds(code)
    return _ops.quantize_4bit(flat, blocksize, bounds.to(flat.device), order.to(flat.device))


def _double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    offset = absmax.mean()
    nested_code = codebooks.dynamic_map().to(absmax.device)
    qabs, nested_absmax = nf4_fmt.quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return qabs, nested_absmax, nested_code, offset


def _reconstruction_sse(flat: Tensor, q: Quant4bit) -> float:
    deq = dequantize_4bit(q, dtype=torch.float32).reshape(-1)
    return float(((deq.double() - flat.double()) ** 2).sum())


def quantize_4bit(w: Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True) -> Quant4bit:
    """Quantize `w` (any shape; fp32/fp16/bf16, finite) to 4 bits with blockwise absmax scales.

    quant_type: "nf4" or "fp4" (bitsandbytes' tables, byte-identical to
    `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type, compress_statistics=double_quant)`),
    or "optimal" (a 16-level table fitted to this tensor and stored with it; never worse than NF4).
    """
    check_float_tensor("w", w)
    check_has_values("w", w)
    check_power_of_two("blocksize", blocksize, 32, 4096)
    check_choice("quant_type", quant_type, QUANT_TYPES)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    check_finite("w", w)
    flat = w.detach().contiguous().reshape(-1)

    def build(code: Tensor, qt: str) -> Quant4bit:
        packed, absmax = _quantize_with_table(flat, blocksize, code.to(flat.device))
        q = Quant4bit(packed, absmax, w.shape, w.dtype, blocksize, qt, code.to(flat.device))
        if double_quant:
            qabs, nabs, ncode, off = _double_quantize(absmax)
            q = replace(q, absmax=qabs, nested_absmax=nabs, nested_code=ncode, offset=off)
        return q

    if quant_type != "optimal":
        return build(codebooks.code_table(quant_type), quant_type)
    nf4 = build(codebooks.code_table("nf4"), "optimal")
    table = nf4_fmt.fit_optimal_table(flat, nf4_fmt.blockwise_absmax(flat, blocksize), blocksize)
    fitted = build(table, "optimal")
    return fitted if _reconstruction_sse(flat, fitted) <= _reconstruction_sse(flat, nf4) else nf4


def dequantize_4bit(q: Quant4bit, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Back to a dense tensor of `q.shape` in `dtype` (default: the dtype that was quantized)."""
    if not isinstance(q, Quant4bit):
        raise TypeError(f"q must be a lowbit.Quant4bit, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else check_dtype("dtype", dtype)
    q.validate()
    absmax, nabs, ncode, off = q.scale_tensors()
    flat = _ops.dequantize_4bit(q.codes, absmax, q.code, q.blocksize, q.numel, dtype, nabs, ncode, off,
                                q.nested_blocksize)
    return flat.view(q.shape)


# ----------------------------------------------------------------------------------------------
# Integer family
# ----------------------------------------------------------------------------------------------


def check_int_scale(scale, q: QuantInt) -> Tensor:
    check_float_tensor("scale", scale)
    if scale.shape != q.scale.shape:
        raise ValueError(f"scale must have shape {tuple(q.scale.shape)} (like q.scale), got {tuple(scale.shape)}")
    return scale


def dequantize_int(q: QuantInt, dtype: Optional[torch.dtype] = None, scale: Optional[Tensor] = None) -> Tensor:
    """W [out, in] = s * (Q - z) computed in fp32, returned in `dtype` (default: the original dtype).

    scale: optional replacement for q.scale (e.g. fine-tuned scales), same shape.
    """
    if not isinstance(q, QuantInt):
        raise TypeError(f"q must be a lowbit.QuantInt, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else check_dtype("dtype", dtype)
    scale = q.scale if scale is None else check_int_scale(scale, q)
    n, k = q.shape
    return _ops.int_dequantize(q.codes, scale.detach(), q.zeros, q.bits, q.group_len, n, k, dtype)


# ----------------------------------------------------------------------------------------------
# SZ family
# ----------------------------------------------------------------------------------------------


def check_sz_dtype(c: SZTensor, dtype: torch.dtype, allow_unbounded: bool) -> None:
    """Refuse an output dtype that cannot hold every value within the bound (e.g. fp16 for values
    past 65504, which would come out as inf), unless the caller opts in."""
    if not allow_unbounded and not c.bound_holds(dtype):
        name = str(dtype).replace("torch.", "")
        raise ValueError(
            f"dtype={name} cannot hold this tensor within its error bound {c.bound:g} (values out of {name}'s "
            f"range or finer than its precision); decode to {str(c.dtype).replace('torch.', '')}, or pass "
            "allow_unbounded=True to accept values rounded to the dtype"
        )


def sz_decompress(c: SZTensor, device=None, dtype: Optional[torch.dtype] = None, *,
                  allow_unbounded: bool = False) -> Tensor:
    """Dense tensor of c.shape in `dtype` (default: the compressed dtype) on `device` (default CPU).
    CUDA devices decode with the Triton kernel, CPU with the C decoder (csrc/sz_decode.c; the vectorized numpy decoder when the C kernels cannot be built). A dtype in
    which the bound cannot hold raises ValueError unless `allow_unbounded=True`."""
    if not isinstance(c, SZTensor):
        raise TypeError(f"c must be a lowbit.SZTensor, got {type(c).__name__}")
    dtype = c.dtype if dtype is None else check_dtype("dtype", dtype)
    device = check_device("device", device)
    check_sz_dtype(c, dtype, allow_unbounded)
    c.validate()
    # check: a stream whose lane lengths were tampered with raises instead of decoding wrong values
    flat = _ops.sz_decode(*c.decoder_args(device), c.numel, c.chunk_size, c.max_len, c.radius, dtype, True)
    return flat.view(c.shape)


__all__ = ["dequantize_4bit", "dequantize_int", "quantize_4bit", "quantize_int", "sz_compress", "sz_decompress"]
