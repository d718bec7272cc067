"""Every torch.library op of every format family, declared once.

Each op has one implementation function: it runs the Triton kernel (lowbit.kernels.<family>)
when `_backend.use_triton` says so for the input's device (CUDA, or CPU under the interpreter in
tests), the CPU backend (lowbit._cpu: C kernels built once per machine, LOWBIT_CPU_BACKEND=fast,
the default) on CPU tensors, and the family's reference (lowbit.formats.<family>) otherwise: the
reference serves every device and is the spec the other two are tested against. The ops take plain tensors
and ints; the validated public API sits above, in functional.py, autograd.py and lowbit.nn. A family added
later declares its ops with `Op` in its own module (lowbit._blockfp), and REGISTRY lists them all.

`Op` pairs the registered custom op with its implementation: eager callers skip the custom-op
dispatcher (tens of microseconds per call, as much as a decode-sized kernel), traced callers
(torch.compile) go through the registered op. Every op gets the same treatment.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _cpu
from ._backend import kernels, use_triton
from .formats import intq as intq_ref
from .formats import nf4 as nf4_ref
from .formats import sz as sz_ref


REGISTRY: dict[str, "Op"] = {}  # every Op by name, this module's and the families' own (lowbit._blockfp)


class Op:
    """A registered custom op (`.op`, for torch.compile and opcheck) and its eager implementation. Every Op is
    recorded in REGISTRY (a second Op of the same name is refused), so a family declares its ops in its own
    module and tests/test_ops.py still sees all of them."""

    def __init__(self, name: str, impl: Callable, fake: Callable) -> None:
        if name in REGISTRY:
            raise ValueError(f"lowbit op {name!r} is declared twice")
        REGISTRY[name] = self
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(f"lowbit::{name}", mutates_args=())(impl)
        self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.impl(*args)

    def __repr__(self) -> str:
        return f"lowbit op {self.name}"


# ----------------------------------------------------------------------------------------------
# 4-bit LUT family (nf4 / fp4 / optimal)
# ----------------------------------------------------------------------------------------------


def _quantize_4bit(flat: Tensor, blocksize: int, bounds: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(flat):
        return kernels().nf4.quantize_4bit(flat, blocksize, bounds, order)
    if _cpu.enabled(flat):
        return _cpu.quantize_4bit(flat, blocksize, bounds, order)
    return nf4_ref.quantize_flat(flat, blocksize, bounds, order)


def _quantize_4bit_fake(flat, blocksize, bounds, order):
    n = flat.numel()
    return flat.new_empty((n + 1) // 2, dtype=torch.uint8), flat.new_empty(-(-n // blocksize), dtype=torch.float32)


def _dequantize_4bit(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int, dtype: torch.dtype,
                     nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                     nested_blocksize: int) -> Tensor:
    if use_triton(codes):
        return kernels().nf4.dequantize_4bit(codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code,
                                             offset, nested_blocksize)
    if _cpu.enabled(codes):
        return _cpu.dequantize_4bit(codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset,
                                    nested_blocksize)
    scales = nf4_ref.block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return nf4_ref.dequantize_flat(codes, scales, code, blocksize, numel, dtype)


def _dequantize_4bit_fake(codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset,
                          nested_blocksize):
    return codes.new_empty(numel, dtype=dtype)


def _rows_ok(k: int, blocksize: int) -> bool:
    # The fused kernels index W by rows, which needs whole blocks per row.
    return k % blocksize == 0


def _matmul_4bit(x: Tensor, codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int, n: int,
                 nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                 nested_blocksize: int, bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias for x [M, K], W [n, K] stored as 4-bit codes."""
    k = x.shape[1]
    if use_triton(x) and _rows_ok(k, blocksize) and x.shape[0] > 0:
        return kernels().nf4.matmul_4bit(x.contiguous(), codes, absmax, code, blocksize, n, nested_absmax,
                                         nested_code, offset, nested_blocksize, bias)
    if _cpu.enabled(x):
        return _cpu.matmul_4bit(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset,
                                nested_blocksize, bias)
    w = _dequantize_4bit(codes, absmax, code, blocksize, n * k, torch.float32, nested_absmax, nested_code, offset,
                         nested_blocksize).view(n, k)
    return nf4_ref.matmul_dequantized(x, w, bias)


def _matmul_4bit_fake(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
                      bias):
    return x.new_empty((x.shape[0], n))


def _matmul_4bit_grad_x(g: Tensor, codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int, k: int,
                        nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                        nested_blocksize: int) -> Tensor:
    """gx = g @ W for g [M, n], W [n, k] stored as 4-bit codes."""
    n = g.shape[1]
    if use_triton(g) and _rows_ok(k, blocksize) and g.shape[0] > 0:
        return kernels().nf4.matmul_4bit_grad_x(g.contiguous(), codes, absmax, code, blocksize, k, nested_absmax,
                                                nested_code, offset, nested_blocksize)
    if _cpu.enabled(g):
        return _cpu.matmul_4bit_grad_x(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset,
                                       nested_blocksize)
    w = _dequantize_4bit(codes, absmax, code, blocksize, n * k, torch.float32, nested_absmax, nested_code, offset,
                         nested_blocksize).view(n, k)
    return (g.float() @ w).to(g.dtype)


def _matmul_4bit_grad_x_fake(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset,
                             nested_blocksize):
    return g.new_empty((g.shape[0], k))


quantize_4bit = Op("quantize_4bit", _quantize_4bit, _quantize_4bit_fake)
dequantize_4bit = Op("dequantize_4bit", _dequantize_4bit, _dequantize_4bit_fake)
matmul_4bit = Op("matmul_4bit", _matmul_4bit, _matmul_4bit_fake)
matmul_4bit_grad_x = Op("matmul_4bit_grad_x", _matmul_4bit_grad_x, _matmul_4bit_grad_x_fake)


# ----------------------------------------------------------------------------------------------
# Integer family (int2 / int3 / int4 rows); scale may be any float dtype, read as fp32
# ----------------------------------------------------------------------------------------------


def _int_dequantize(codes: Tensor, scale: Tensor, zeros: Tensor, bits: int, group_len: int, n: int, k: int,
                    dtype: torch.dtype) -> Tensor:
    # No Triton kernel: dequantizing is a training-time/export path, and the reference is one fused expression.
    if _cpu.enabled(codes):
        return _cpu.int_dequantize(codes, scale, zeros, bits, group_len, n, k, dtype)
    return intq_ref.reference_weight(codes, scale, zeros, bits, group_len, n, k).to(dtype)


def _int_dequantize_fake(codes, scale, zeros, bits, group_len, n, k, dtype):
    return codes.new_empty((n, k), dtype=dtype)


def _int_matmul(x: Tensor, codes: Tensor, scale: Tensor, zeros: Tensor, bits: int, group_len: int, n: int,
                bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias for x [M, K], W [n, K] stored as bits-bit integers."""
    if use_triton(x) and x.shape[0] > 0:
        return kernels().intq.matmul_int(x.contiguous(), codes, scale.contiguous(), zeros, bits, group_len, n, bias)
    if _cpu.enabled(x):
        return _cpu.int_matmul(x, codes, scale, zeros, bits, group_len, n, bias)
    return intq_ref.reference_matmul(x, codes, scale, zeros, bits, group_len, n, bias)


def _int_matmul_fake(x, codes, scale, zeros, bits, group_len, n, bias):
    return x.new_empty((x.shape[0], n))


def _int_matmul_grad_x(g: Tensor, codes: Tensor, scale: Tensor, zeros: Tensor, bits: int, group_len: int,
                       k: int) -> Tensor:
    """gx = g @ W for g [M, n]."""
    n = g.shape[1]
    if use_triton(g) and g.shape[0] > 0:
        return kernels().intq.matmul_int_grad_x(g.contiguous(), codes, scale.contiguous(), zeros, bits, group_len, k)
    if _cpu.enabled(g):
        return _cpu.int_matmul_grad_x(g, codes, scale, zeros, bits, group_len, k)
    w = intq_ref.reference_weight(codes, scale, zeros, bits, group_len, n, k)
    return (g.float() @ w).to(g.dtype)


def _int_matmul_grad_x_fake(g, codes, scale, zeros, bits, group_len, k):
    return g.new_empty((g.shape[0], k))


def _int_matmul_grad_scale(g: Tensor, x: Tensor, codes: Tensor, zeros: Tensor, bits: int, group_len: int) -> Tensor:
    """dL/ds fp32 [n, ceil(K/group_len)] for y = x @ W^T, g = dL/dy [M, n], x [M, K] (the last group of a row
    ragged when group_len does not divide K)."""
    m, n = g.shape
    k = x.shape[1]
    if m == 0:
        return torch.zeros((n, intq_ref.n_groups(k, group_len)), dtype=torch.float32, device=g.device)
    if use_triton(g):
        return kernels().intq.matmul_int_grad_scale(g.contiguous(), x.contiguous(), codes, zeros, bits, group_len)
    if _cpu.enabled(g):
        return _cpu.int_matmul_grad_scale(g, x, codes, zeros, bits, group_len)
    return intq_ref.reference_grad_scale(g, x, codes, zeros, bits, group_len, n, k)


def _int_matmul_grad_scale_fake(g, x, codes, zeros, bits, group_len):
    return g.new_empty((g.shape[1], intq_ref.n_groups(x.shape[1], group_len)), dtype=torch.float32)


int_dequantize = Op("int_dequantize", _int_dequantize, _int_dequantize_fake)
int_matmul = Op("int_matmul", _int_matmul, _int_matmul_fake)
int_matmul_grad_x = Op("int_matmul_grad_x", _int_matmul_grad_x, _int_matmul_grad_x_fake)
int_matmul_grad_scale = Op("int_matmul_grad_scale", _int_matmul_grad_scale, _int_matmul_grad_scale_fake)


# ----------------------------------------------------------------------------------------------
# SZ family
# ----------------------------------------------------------------------------------------------


def _sz_decode(payload: Tensor, lane_start: Tensor, table: Tensor, step: Tensor, outlier_idx: Tensor,
               outlier_val: Tensor, numel: int, chunk_size: int, max_len: int, radius: int,
               dtype: torch.dtype, check: bool = False) -> Tensor:
    """Decode an SZ stream (version 2, as SZTensor.decoder_args) to `numel` values in `dtype`.
    check: the kernel also verifies every lane's length (one device sync; the CPU decoder always does)."""
    if use_triton(payload):
        return kernels().sz.sz_decode(payload, lane_start, table, step, outlier_idx, outlier_val, numel, chunk_size,
                                      max_len, radius, dtype, check)
    if _cpu.enabled(payload):
        out = _cpu.sz_decode(payload, lane_start, table, step, outlier_idx, outlier_val, numel, chunk_size, max_len,
                             radius, dtype, check)
        if out is not None:  # None: a dtype or table the C decoder does not take
            return out
    return sz_ref.decode_vectorized(payload, lane_start, table, step, outlier_idx, outlier_val, numel, chunk_size,
                                    max_len, radius, dtype)


def _sz_decode_fake(payload, lane_start, table, step, outlier_idx, outlier_val, numel, chunk_size, max_len, radius,
                    dtype, check=False):
    return payload.new_empty(numel, dtype=dtype)


def _sz_matmul(x: Tensor, payload: Tensor, lane_start: Tensor, table: Tensor, step: Tensor, outlier_idx: Tensor,
               outlier_val: Tensor, n: int, chunk_size: int, max_len: int, radius: int,
               bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias for x [M, K] and W [n, K] an SZ stream: the fused decode-GEMV (M <= 16, a
    row-aligned layout, Triton), else W decoded in x's dtype and F.linear (the reference)."""
    k = x.shape[1]
    if use_triton(x) and kernels().sz.gemv_fits(x.shape[0], k, n * k, chunk_size, lane_start.numel() - 1):
        return kernels().sz.sz_gemv(x.contiguous(), payload, lane_start, table, step, outlier_idx, outlier_val, n,
                                    chunk_size, max_len, radius, bias)
    w = _sz_decode(payload, lane_start, table, step, outlier_idx, outlier_val, n * k, chunk_size, max_len, radius,
                   x.dtype)
    return torch.nn.functional.linear(x, w.view(n, k), bias)


def _sz_matmul_fake(x, payload, lane_start, table, step, outlier_idx, outlier_val, n, chunk_size, max_len, radius,
                    bias):
    return x.new_empty((x.shape[0], n))


sz_decode = Op("sz_decode", _sz_decode, _sz_decode_fake)
sz_matmul = Op("sz_matmul", _sz_matmul, _sz_matmul_fake)

# The ops declared here (the three original families); `REGISTRY` also holds those families declare elsewhere.
ALL_OPS = (quantize_4bit, dequantize_4bit, matmul_4bit, matmul_4bit_grad_x, int_dequantize, int_matmul,
           int_matmul_grad_x, int_matmul_grad_scale, sz_decode, sz_matmul)
