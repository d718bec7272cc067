"""The block floating-point family's CPU launchers (MXFP4 / NVFP4): the C kernels of csrc/blockfp.c for CPU tensors.

Called by the family's ops (lowbit._blockfp) when `enabled(t)`; the arguments are the ops' (formats.blockfp's
layout): `packed` uint8 [n, k/2] (element 2j in the LOW nibble of byte j), `scales` uint8 [n, k/block] (one byte per
`block` = 32 (mxfp4) or 16 (nvfp4) elements of a row), `scale_table` fp32 [256] (the factor of every scale byte,
formats.blockfp.scale_table). W[n, j] = E2M1[code] * scale_table[scales[n, j // block]].

* dequantize: `lb_blockfp_dequantize`, bit-identical to formats.blockfp.dequantize_blockfp in fp32 / bf16 / fp16;
* matmul, M <= FUSED_M[x.dtype]: the fused decode-GEMV `lb_blockfp_gemv` (x read in its own dtype, fp32
  accumulation, the bias added in fp32, y rounded once to x's dtype); larger M: the weight dequantized in chunks,
  each one BLAS call (lowbit._cpu._matmul_chunked: fp32 GEMM, bf16 GEMM for bf16 activations);
* grad_x: dequantize-based (lowbit._cpu._grad_x_chunked), for every M.

`_clib.CALLS` counts the paths that ran: "blockfp.gemv", "blockfp.dequant_gemm", "blockfp.grad_x_gemm",
"blockfp.dequantize". Outputs that the C kernels write are allocated NaN-filled under LOWBIT_POISON=1 (the tests),
so an element a kernel failed to write can not pass a comparison.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _clib, _cpu
from ._clib import CALLS, I64, INT, P, kernel

# Rows of x up to which the fused GEMV runs (beyond: dequantize + BLAS). benchmarks/bench_blockfp_cpu.py.
FUSED_M = {torch.bfloat16: 8, torch.float16: 16, torch.float32: 16}
BLOCKS = (16, 32)

_clib.bind(
    kernel("lb_blockfp_dequantize", packed=P, scales=P, table=P, block=I64, K=I64, n0=I64, nr=I64, k0=I64, kc=I64,
           out=P, dt=INT, nt=INT),
    kernel("lb_blockfp_gemv", x=P, dt=INT, M=I64, K=I64, packed=P, scales=P, table=P, block=I64, N=I64, bias=P, y=P,
           nt=INT),
)

_DT = _cpu._DT
_p, _need, _threads = _cpu._p, _cpu._need, _cpu._threads


def enabled(t: Tensor) -> bool:
    """Whether the C kernels run an op on `t`: a CPU tensor, LOWBIT_CPU_BACKEND=fast, the kernels built."""
    return _cpu.enabled(t)


def _out(shape, dtype: torch.dtype) -> Tensor:
    """torch.empty, or NaN-filled under LOWBIT_POISON=1 (as lowbit.kernels' alloc_output)."""
    if os.environ.get("LOWBIT_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


class _WB:
    """A block-FP weight [n, k] as the kernels take it (n, k and rect() as lowbit._cpu's chunked paths use)."""

    def __init__(self, packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, n: int, k: int):
        _need(block in BLOCKS, f"block must be 16 (nvfp4) or 32 (mxfp4), got {block}")
        _need(n >= 0 and k >= 0 and k % block == 0, f"k = {k} must be a multiple of the block ({block})")
        self.packed, self.scales = packed.contiguous(), scales.contiguous()
        self.table = scale_table.float().contiguous()
        _need(self.packed.dtype == torch.uint8 and self.packed.numel() == n * k // 2,
              f"packed must be uint8 with n * k / 2 = {n * k // 2} bytes")
        _need(self.scales.dtype == torch.uint8 and self.scales.numel() == n * (k // block),
              f"scales must be uint8 with n * k / block = {n * (k // block)} bytes")
        _need(self.table.numel() == 256, "scale_table must have 256 values")
        self.block, self.n, self.k = block, n, k

    def rect(self, n0: int, nr: int, k0: int, kc: int, out: Tensor) -> None:
        """out[nr, kc] = W[n0:n0+nr, k0:k0+kc] in out's dtype, bit-identical to the reference."""
        _clib.library().lb_blockfp_dequantize(_p(self.packed), _p(self.scales), _p(self.table), self.block, self.k,
                                              n0, nr, k0, kc, _p(out), _DT[out.dtype], _threads(nr * kc))


def dequantize(packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, n: int, k: int,
               dtype: torch.dtype) -> Tensor:
    """W [n, k] in dtype (fp32 / bf16 / fp16): formats.blockfp.dequantize_blockfp, bit for bit."""
    _need(dtype in _DT, f"dtype must be float32, bfloat16 or float16, got {dtype}")
    w = _WB(packed, scales, scale_table, block, n, k)
    out = _out((n, k), dtype)
    if n * k:
        w.rect(0, n, 0, k, out)
    CALLS["blockfp.dequantize"] += 1
    return out


def matmul(x: Tensor, packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, n: int,
           bias: Optional[Tensor]) -> Tensor:
    """y [M, n] = x @ W^T (+ bias) in x's dtype; x [M, K] fp32 / bf16 / fp16 (any strides), bias [n] or None."""
    _need(x.dim() == 2 and x.dtype in _DT, "x must be 2-D float32, bfloat16 or float16")
    m, k = x.shape
    w = _WB(packed, scales, scale_table, block, n, k)
    _need(bias is None or bias.numel() == n, f"bias must have {n} values")
    if m == 0 or n == 0 or k == 0:
        y = x.new_zeros((m, n))
        return y if bias is None or m == 0 else (y.float() + bias.float()).to(x.dtype)
    if m > FUSED_M[x.dtype]:
        CALLS["blockfp.dequant_gemm"] += 1
        return _cpu._matmul_chunked(x, w, bias)
    xc = x.contiguous()
    b = None if bias is None else bias.reshape(-1).float().contiguous()
    y = _out((m, n), x.dtype)
    _clib.library().lb_blockfp_gemv(_p(xc), _DT[x.dtype], m, k, _p(w.packed), _p(w.scales), _p(w.table), block, n,
                                    _p(b), _p(y), _threads(n * k))
    CALLS["blockfp.gemv"] += 1
    return y


def grad_x(g: Tensor, packed: Tensor, scales: Tensor, scale_table: Tensor, block: int, k: int) -> Tensor:
    """gx [M, k] = g @ W in g's dtype (g [M, n]): W dequantized in column chunks, each one BLAS call."""
    _need(g.dim() == 2 and g.dtype in _DT, "g must be 2-D float32, bfloat16 or float16")
    m, n = g.shape
    w = _WB(packed, scales, scale_table, block, n, k)
    if m == 0 or n == 0 or k == 0:
        return g.new_zeros((m, k))
    CALLS["blockfp.grad_x_gemm"] += 1
    return _cpu._grad_x_chunked(g, w)
