"""Triton kernels: fused 4-bit dequant-matmul (forward GEMM, decode GEMV, grad_x GEMM).

W is [N, K] in the bitsandbytes layout (see lowbit.quant4bit) with K % blocksize == 0, so row n
of W is bytes [n * K/2, (n+1) * K/2) and its scales are absmax[n * K/bs + k // bs]. Tiles of W
are dequantized in registers (code table gather, scale multiply, double-quantized scales decoded
on the fly) and fed to tl.dot with fp32 accumulation; W never exists in memory at full width.

  forward  y[M, N]  = x[M, K] @ W^T    tile of W: rows n (output), cols k (reduction)
  grad_x   gx[M, K] = gy[M, N] @ W     tile of W: rows n (reduction), cols k (output)

SPLIT_K > 1 writes fp32 partial sums [SPLIT_K, M, out] that the launcher reduces (deterministic,
unlike atomics); the launcher also adds the bias and casts in that case.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import alloc_output, grouped_tile, store_output
from .quant4bit import _block_scale


@triton.jit
def _select16(q, code_ptr):
    """table[q] for 4-bit q as a tree of 15 selects on 16 scalars: no per-element memory access."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    a0 = tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
    a1 = tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
    a2 = tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
    a3 = tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
    a4 = tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
    a5 = tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
    a6 = tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
    a7 = tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
    c0 = tl.where(b1, a1, a0)
    c1 = tl.where(b1, a3, a2)
    c2 = tl.where(b1, a5, a4)
    c3 = tl.where(b1, a7, a6)
    d0 = tl.where(b2, c1, c0)
    d1 = tl.where(b2, c3, c2)
    return tl.where(b3, d1, d0)


@triton.jit
def _lookup(q, code_ptr, DECODE: tl.constexpr):
    """Table value of each 4-bit code q (fp32).

    DECODE 0: gather from the 16-entry table in global memory (L1-resident, one address per
    element); 1: a select tree (ALU only); 2: tl.gather from a register copy of the table.
    """
    if DECODE == 0:
        v = tl.load(code_ptr + q)
    elif DECODE == 1:
        v = _select16(q, code_ptr)
    else:
        table = tl.load(code_ptr + tl.arange(0, 16))
        v = tl.reshape(tl.gather(table, tl.reshape(q, (q.numel,)), 0), q.shape)
    return v


@triton.jit
def _load_halves(codes_ptr, code_ptr, rows, row_mask, col_start, stride_wn, HALF: tl.constexpr, DECODE: tl.constexpr):
    """Unscaled table values of W[rows, col_start : col_start + 2*HALF], split by parity.

    Byte j of a row holds column 2j (high nibble) and 2j+1 (low nibble). Loading the bytes as one
    contiguous [R, HALF] tile keeps the loads vectorized; instead of interleaving the two nibbles
    back into W's column order (a register shuffle), the callers split x (or the output) by
    parity: x @ W^T = x_even @ hi^T + x_odd @ lo^T.
    """
    byte = tl.load(codes_ptr + rows[:, None] * stride_wn + (col_start // 2 + tl.arange(0, HALF))[None, :],
                   mask=row_mask[:, None], other=0).to(tl.int32)
    return _lookup(byte >> 4, code_ptr, DECODE), _lookup(byte & 0xF, code_ptr, DECODE)


@triton.jit
def _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, row_mask, col_start, K,
                 COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr):
    """Scales of a tile W[rows, col_start : col_start + COLS].

    [R] when the tile's columns sit in one quantization block (COLS <= BLOCKSIZE); otherwise
    ([R, COLS/2] for the even columns, [R, COLS/2] for the odd ones).
    """
    if COLS <= BLOCKSIZE:
        blk = rows * (K // BLOCKSIZE) + col_start // BLOCKSIZE
        s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, row_mask,
                         DOUBLE_QUANT, NESTED_BLOCKSIZE)
        return s, s
    else:
        # consecutive (even, odd) columns 2j, 2j+1 always share a block (BLOCKSIZE is even)
        cols = col_start + 2 * tl.arange(0, COLS // 2)
        blk = rows[:, None] * (K // BLOCKSIZE) + (cols // BLOCKSIZE)[None, :]
        s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, row_mask[:, None],
                         DOUBLE_QUANT, NESTED_BLOCKSIZE)
        return s, s


@triton.jit
def _dequant_halves(
    codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
    rows, row_mask, col_start, K, stride_wn,
    COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, DOT_DTYPE: tl.constexpr, DECODE: tl.constexpr,
):
    """(even columns, odd columns) of W[rows, col_start : col_start + COLS], scaled, in DOT_DTYPE."""
    hi, lo = _load_halves(codes_ptr, code_ptr, rows, row_mask, col_start, stride_wn, COLS // 2, DECODE)
    s, _ = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, row_mask, col_start, K,
                        COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    if COLS <= BLOCKSIZE:
        hi = hi * s[:, None]
        lo = lo * s[:, None]
    else:
        hi = hi * s
        lo = lo * s
    return hi.to(DOT_DTYPE), lo.to(DOT_DTYPE)


@triton.jit
def _load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """x[offs_m, k0 : k0 + BLOCK_K] as (even columns, odd columns), each [BM, BLOCK_K/2]."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
    BM: tl.constexpr = offs_m.shape[0]
    xe, xo = tl.split(tl.reshape(x.to(DTYPE), (BM, BLOCK_K // 2, 2)))
    return xe, xo


@triton.jit
def matmul_4bit_kernel(
    x_ptr, codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, bias_ptr, y_ptr,
    M, N, K, stride_wn,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DECODE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_len = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_len, BLOCK_K):
        k0 = pid_k * k_len + kk
        xe, xo = _load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K, DOT_DTYPE)
        we, wo = _dequant_halves(codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                                 offs_n, n_mask, k0, K, stride_wn, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE,
                                 DOUBLE_QUANT, DOT_DTYPE, DECODE)
        acc = tl.dot(xe, tl.trans(we), acc, input_precision=PRECISION)
        acc = tl.dot(xo, tl.trans(wo), acc, input_precision=PRECISION)
    store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def gemv_4bit_kernel(
    x_ptr, codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, bias_ptr, y_ptr,
    M, N, K, stride_wn,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DECODE: tl.constexpr,
):
    """Decode path (M <= BLOCK_M <= 4): no tensor cores, a broadcast multiply and a row reduction.

    Bandwidth-bound by design: each program streams BLOCK_N rows of W once for all M rows of x;
    when a step stays inside one quantization block the scale multiplies the reduced [M, N]
    partial sum, not every weight.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_len = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_len, BLOCK_K):
        k0 = pid_k * k_len + kk
        xe, xo = _load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K, tl.float32)
        hi, lo = _load_halves(codes_ptr, code_ptr, offs_n, n_mask, k0, stride_wn, BLOCK_K // 2, DECODE)
        s, _ = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, offs_n, n_mask, k0, K,
                            BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        if BLOCK_K <= BLOCKSIZE:
            part = tl.sum(xe[:, None, :] * hi[None, :, :] + xo[:, None, :] * lo[None, :, :], axis=2)
            acc += part * s[None, :]
        else:
            acc += tl.sum(xe[:, None, :] * (hi * s)[None, :, :] + xo[:, None, :] * (lo * s)[None, :, :], axis=2)
    store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def matmul_4bit_grad_x_kernel(
    g_ptr, codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, gx_ptr,
    M, N, K, stride_wn,
    stride_gm, stride_gn, stride_s, stride_om, stride_ok,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DECODE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_k = grouped_tile(pid, tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k0 = pid_k * BLOCK_K
    n_len = tl.cdiv(tl.cdiv(N, SPLIT_N), BLOCK_N) * BLOCK_N
    acc_e = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for nn in range(0, n_len, BLOCK_N):
        offs_n = pid_s * n_len + nn + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
        we, wo = _dequant_halves(codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                                 offs_n, n_mask, k0, K, stride_wn, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE,
                                 DOUBLE_QUANT, DOT_DTYPE, DECODE)
        acc_e = tl.dot(g, we, acc_e, input_precision=PRECISION)
        acc_o = tl.dot(g, wo, acc_o, input_precision=PRECISION)
    # Re-interleave the even and odd output columns once per tile, at the store.
    acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = gx_ptr + pid_s * stride_s + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers and configs
# ----------------------------------------------------------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402

from lowbit._backend import interpreter_enabled  # noqa: E402

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, DECODE), by M bucket. The first entry
# of each bucket is the default; with autotuning on (LOWBIT_AUTOTUNE, default 1 on CUDA) every
# candidate of the bucket, and dequantize+cuBLAS, is timed once per (M bucket, N, K, dtype) and the
# fastest kept. Chosen from benchmarks/results/2026-11-26-h100-sweep.log (H100): DECODE=2
# (tl.gather from a register table) beat the global-memory gather and the select tree everywhere,
# and BLOCK_K=64 beat 128/256.
FORWARD_CONFIGS = {
    1: [("gemv", 1, 32, 64, 4, 4, 3, 2), ("gemv", 1, 64, 64, 2, 4, 3, 2), ("gemv", 1, 32, 64, 8, 4, 3, 2),
        ("gemv", 1, 64, 64, 4, 4, 3, 2), ("gemv", 1, 128, 64, 2, 4, 3, 2),
        # untimed guesses that extend the sweep's trend (smaller BLOCK_K was faster); the tuner decides
        ("gemv", 1, 64, 32, 4, 4, 3, 2), ("gemv", 1, 128, 32, 4, 4, 3, 2)],
    4: [("gemv", 4, 32, 64, 4, 4, 3, 2), ("dot", 16, 128, 64, 2, 4, 3, 2), ("dot", 16, 128, 64, 4, 4, 3, 2)],
    16: [("dot", 16, 128, 64, 2, 4, 3, 2), ("dot", 16, 256, 64, 2, 8, 3, 2), ("dot", 16, 128, 64, 4, 4, 3, 2),
         ("dot", 16, 64, 64, 4, 4, 4, 2)],
    64: [("dot", 64, 128, 64, 1, 4, 3, 2), ("dot", 32, 128, 64, 2, 4, 3, 2), ("dot", 64, 256, 64, 1, 8, 3, 2)],
    1 << 30: [("dot", 128, 256, 64, 1, 8, 3, 2), ("dot", 64, 128, 64, 1, 4, 4, 2)],
}
# (BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_N, num_warps, num_stages, DECODE)
GRAD_X_CONFIGS = {
    16: [(16, 64, 128, 4, 4, 3, 2), (16, 128, 64, 2, 4, 3, 2)],
    1 << 30: [(128, 64, 64, 1, 4, 4, 2), (64, 64, 128, 1, 4, 3, 2)],
}
# Small tiles for the interpreter; together they cover every DECODE method and both GEMV and dot.
INTERPRETER_FORWARD = [("gemv", 1, 32, 64, 2, 4, 1, 2), ("dot", 16, 32, 32, 2, 4, 1, 2), ("dot", 32, 32, 64, 1, 4, 1, 0),
                       ("gemv", 4, 16, 64, 1, 4, 1, 1), ("dot", 16, 16, 128, 1, 4, 1, 1)]
INTERPRETER_GRAD_X = [(16, 32, 32, 2, 4, 1, 2), (32, 64, 32, 1, 4, 1, 1), (16, 128, 16, 1, 4, 1, 0)]

# Not fused: dequantize W once into a scratch tensor in the activation dtype, then cuBLAS. Kept as
# a measured candidate because the fused kernels above lose to it at large M on an H100 today
# (docs/benchmarks.md); the tuner takes whichever is faster for the shape.
DEQUANT_CONFIG = ("dequant", 0, 0, 0, 1, 0, 0, 0)

_tuned: dict[tuple, tuple] = {}


def _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize, dtype):
    from .quant4bit import dequantize_4bit

    return dequantize_4bit(codes, absmax, code, blocksize, n * k, dtype, nested_absmax, nested_code, offset,
                           nested_blocksize).view(n, k)


def _bucket(table: dict, m: int) -> int:
    return next(b for b in sorted(table) if m <= b)


def tune_m(m: int) -> int:
    """M as the tuner keys it: the next power of two (capped at 8192). Config-table buckets are
    too coarse for this: a choice timed at M=512 was reused at M=4096, where it ran 4x slower
    than the alternative (H100, 2026-11-26)."""
    return min(1 << max(m - 1, 0).bit_length(), 8192)


def _fits_forward(cfg: tuple, m: int, k: int) -> bool:
    kind, bm, _, bk, split = cfg[:5]
    return kind != "dequant" and (kind != "gemv" or m <= bm) and k % (bk * split) == 0


def _fits_grad_x(cfg: tuple, k: int) -> bool:
    return cfg[0] != "dequant" and k % cfg[1] == 0


def _autotune_enabled() -> bool:
    return os.environ.get("LOWBIT_AUTOTUNE", "1") == "1"


def _pick(key: tuple, candidates: list, run) -> tuple:
    if key in _tuned:
        return _tuned[key]
    if len(candidates) == 1 or not _autotune_enabled():
        _tuned[key] = candidates[0]
        return candidates[0]
    from triton.testing import do_bench

    best, best_t = candidates[0], float("inf")
    for cfg in candidates:
        try:
            t = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # e.g. OutOfResources on a smaller card: that candidate is out
            continue
        if t < best_t:
            best, best_t = cfg, t
    _tuned[key] = best
    return best


def _precision(dot_dtype) -> str:
    # fp32 activations run their dots in tf32 on the GPU (the 10x-slower ieee path is never taken
    # silently); the interpreter computes exactly.
    return "ieee" if (dot_dtype != tl.float32 or interpreter_enabled()) else "tf32"


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    # The interpreter has no bf16 arithmetic: the launcher upcasts bf16 to fp32 there.
    if device.type == "cpu" and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPE[dtype]


def _scale_args(absmax, nested_absmax, nested_code, offset):
    dq = nested_absmax is not None
    return (absmax, nested_absmax if dq else absmax, nested_code if dq else absmax, offset if dq else absmax), dq


def matmul_4bit(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
                bias, config=None):
    """y[M, n] = x[M, K] @ W^T (+ bias). x: 2-D, fp16/bf16/fp32, K % blocksize == 0."""
    m, k = x.shape
    out_dtype = x.dtype
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        x = x.float()
    dot_dtype = _dot_dtype(x.dtype, x.device)
    scales, dq = _scale_args(absmax, nested_absmax, nested_code, offset)

    def run(cfg):
        kind, bm, bn, bk, split, warps, stages, decode = cfg
        if kind == "dequant":
            w = _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                                 nested_blocksize, x.dtype)
            return torch.nn.functional.linear(x, w, bias).to(out_dtype)
        store_dtype = torch.float32 if (split > 1 or x.dtype == torch.float32) else x.dtype
        y = alloc_output((split, m, n), store_dtype, x.device)
        kern = gemv_4bit_kernel if kind == "gemv" else matmul_4bit_kernel
        grid = (triton.cdiv(n, bn), split) if kind == "gemv" else (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        kern[grid](
            x, codes, *scales, code, bias if bias is not None else x, y,
            m, n, k, k // 2, x.stride(0), x.stride(1), y.stride(0), y.stride(1), y.stride(2),
            BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=dq, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8, DOT_DTYPE=dot_dtype,
            PRECISION=_precision(dot_dtype), DECODE=decode, num_warps=warps, num_stages=stages,
        )
        if split == 1 and y.dtype == out_dtype:
            return y[0]
        out = y.sum(0) if split > 1 else y[0]
        if bias is not None and split > 1:
            out = out + bias.float()
        return out.to(out_dtype)

    if config is None:
        if x.device.type == "cpu":
            cands = [c for c in INTERPRETER_FORWARD if _fits_forward(c, m, k) and (m == 1 or c[0] == "dot")]
            config = cands[0] if cands else ("dot", 16, 32, 32, 1, 4, 1, 1)
        else:
            cands = [c for c in FORWARD_CONFIGS[_bucket(FORWARD_CONFIGS, m)] if _fits_forward(c, m, k)]
            if not cands:
                cands = [("dot", 16 if m <= 16 else 64, 64, 32, 1, 4, 3, 1)]
            cands.append(DEQUANT_CONFIG)
            key = ("fwd", tune_m(m), n, k, x.dtype, dq, blocksize)
            config = _pick(key, cands, run)
    return run(config)


def matmul_4bit_grad_x(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset,
                       nested_blocksize, config=None):
    """gx[M, k] = g[M, N] @ W. g: 2-D, fp16/bf16/fp32."""
    m, n = g.shape
    out_dtype = g.dtype
    if g.device.type == "cpu" and g.dtype == torch.bfloat16:
        g = g.float()
    dot_dtype = _dot_dtype(g.dtype, g.device)
    scales, dq = _scale_args(absmax, nested_absmax, nested_code, offset)

    def run(cfg):
        if cfg == DEQUANT_CONFIG:
            w = _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                                 nested_blocksize, g.dtype)
            return (g @ w).to(out_dtype)
        bm, bk, bn, split, warps, stages, decode = cfg
        store_dtype = torch.float32 if (split > 1 or g.dtype == torch.float32) else g.dtype
        gx = alloc_output((split, m, k), store_dtype, g.device)
        grid = (triton.cdiv(m, bm) * (k // bk), split)
        matmul_4bit_grad_x_kernel[grid](
            g, codes, *scales, code, gx,
            m, n, k, k // 2, g.stride(0), g.stride(1), gx.stride(0), gx.stride(1), gx.stride(2),
            BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=dq,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=split, GROUP_M=8, DOT_DTYPE=dot_dtype,
            PRECISION=_precision(dot_dtype), DECODE=decode, num_warps=warps, num_stages=stages,
        )
        out = gx.sum(0) if split > 1 else gx[0]
        return out.to(out_dtype)

    if config is None:
        if g.device.type == "cpu":
            config = next((c for c in INTERPRETER_GRAD_X if _fits_grad_x(c, k)), (16, 32, 32, 1, 4, 1, 1))
        else:
            cands = [c for c in GRAD_X_CONFIGS[_bucket(GRAD_X_CONFIGS, m)] if _fits_grad_x(c, k)]
            if not cands:
                cands = [(64, 32, 64, 1, 4, 3, 1)]
            cands.append(DEQUANT_CONFIG)
            key = ("gx", tune_m(m), n, k, g.dtype, dq, blocksize)
            config = _pick(key, cands, run)
    return run(config)


_SIG_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _w_sig(dq: bool) -> dict:
    return {"codes_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "nested_absmax_ptr": "*fp32",
            "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32"}


def aot_specs() -> list[dict]:
    """Every config of the tables, in bf16 with double quant; fp16, fp32 and plain scales once each."""
    specs = []
    variants = [(torch.bfloat16, True)]
    fwd = [c for b in sorted(FORWARD_CONFIGS) for c in FORWARD_CONFIGS[b]]
    for i, cfg in enumerate(dict.fromkeys(fwd)):
        vs = variants + ([(torch.float16, True), (torch.float32, True), (torch.bfloat16, False)] if i == 0 else [])
        for dt, dq in vs:
            kind, bm, bn, bk, split, warps, stages, decode = cfg
            t = _SIG_DT[dt]
            out_t = "fp32" if (split > 1 or dt == torch.float32) else t
            specs.append({
                "name": f"{kind}_4bit[{t},dq={dq},{bm}x{bn}x{bk},split={split},w={warps},s={stages},dec={decode}]",
                "fn": gemv_4bit_kernel if kind == "gemv" else matmul_4bit_kernel,
                "signature": {"x_ptr": f"*{t}", **_w_sig(dq), "bias_ptr": f"*{t}", "y_ptr": f"*{out_t}",
                              "M": "i32", "N": "i32", "K": "i32", "stride_wn": "i32", "stride_xm": "i32", "stride_xk": "i32",
                              "stride_ys": "i32", "stride_ym": "i32", "stride_yn": "i32"},
                "constexprs": {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": dq, "HAS_BIAS": True,
                               "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 8,
                               "DOT_DTYPE": _TL_DTYPE[dt], "PRECISION": "tf32" if dt == torch.float32 else "ieee",
                               "DECODE": decode},
                "num_warps": warps, "num_stages": stages,
            })
    gx = [c for b in sorted(GRAD_X_CONFIGS) for c in GRAD_X_CONFIGS[b]]
    for i, cfg in enumerate(dict.fromkeys(gx)):
        vs = variants + ([(torch.float16, True), (torch.float32, False)] if i == 0 else [])
        for dt, dq in vs:
            bm, bk, bn, split, warps, stages, decode = cfg
            t = _SIG_DT[dt]
            out_t = "fp32" if (split > 1 or dt == torch.float32) else t
            specs.append({
                "name": f"grad_x_4bit[{t},dq={dq},{bm}x{bk}x{bn},split={split},w={warps},s={stages},dec={decode}]",
                "fn": matmul_4bit_grad_x_kernel,
                "signature": {"g_ptr": f"*{t}", **_w_sig(dq), "gx_ptr": f"*{out_t}", "M": "i32", "N": "i32",
                              "K": "i32", "stride_wn": "i32", "stride_gm": "i32", "stride_gn": "i32", "stride_s": "i32",
                              "stride_om": "i32", "stride_ok": "i32"},
                "constexprs": {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": dq, "BLOCK_M": bm,
                               "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT_N": split, "GROUP_M": 8,
                               "DOT_DTYPE": _TL_DTYPE[dt], "PRECISION": "tf32" if dt == torch.float32 else "ieee",
                               "DECODE": decode},
                "num_warps": warps, "num_stages": stages,
            })
    return specs
