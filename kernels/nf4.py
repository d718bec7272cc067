"""Triton kernels of the 4-bit LUT family (nf4, fp4, optimal): quantize, dequantize, and the fused
dequant-matmuls (forward GEMM, decode GEMV, grad_x GEMM).

One file per family (the house plan), read top to bottom: device helpers, kernels, configs,
launchers, compile specs and cost goals. What a launch does besides picking a config (allocate,
launch, reduce split-K) is shared with intq in kernels/_launch.py. It is over 500 lines because
the three matmul kernels share the decode helpers above them; splitting them would put one
algorithm in two files.

Byte layout (lowbit.formats.nf4 documents it): W [N, K] flattened row-major, byte i holds
element 2i in its high nibble and 2i+1 in its low one; block scales absmax[b] for blocks of
BLOCKSIZE consecutive elements (fp32, or uint8 codes into a 256-value map times a nested fp32
scale per 256 blocks plus an offset with double quantization). With K % BLOCKSIZE == 0, row n of W
is bytes [n * K/2, (n+1) * K/2) and its scales are absmax[n * K/bs + k // bs].

Quantize/dequantize are bit-identical to the reference: the quantizer multiplies by a correctly
rounded reciprocal (div_rn) and the dequantizer runs with fp-fusion off, so `code * scale +
offset` rounds twice exactly as torch does. Under TRITON_INTERPRET=1 (CPU) bf16 results are
produced in fp32 and rounded by torch, because the interpreter truncates fp32->bf16 casts.

Matmuls: tiles of W are dequantized in registers (code table gather, scale multiply,
double-quantized scales decoded on the fly) and fed to tl.dot with fp32 accumulation; W never
exists in memory at full width.

  forward  y[M, N]  = x[M, K] @ W^T    tile of W: rows n (output), cols k (reduction)
  grad_x   gx[M, K] = gy[M, N] @ W     tile of W: rows n (reduction), cols k (output)

SPLIT_K > 1 writes fp32 partial sums [SPLIT_K, M, out] that the launcher reduces (deterministic,
unlike atomics); the launcher also adds the bias and casts in that case. Offsets that scale with
M (activation rows) or with N * K (weight bytes) are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DEQUANT,
    GradXConfig,
    MatmulConfig,
    alloc_output,
    bucket,
    count_launch,
    dot_dtype,
    fma_x_pair,
    grouped_tile,
    interpreting,
    load_x_halves,
    pick,
    store_output,
    table_value,
    tune_m,
    with_dequant,
    words_accumulate,
    words_epilogue,
)
from ._launch import SIG_DT, buckets, cpu_operand, grad_x_matmul, tiled_matmul, words_codes, words_gemv
from ._spec import CostBudget, launch_spec, meta

# ----------------------------------------------------------------------------------------------
# Quantize / dequantize kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def quantize_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    bounds_ptr,
    order_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # element offsets pass 2**31 for tensors of 2G+ elements
    blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    nblocks = tl.cdiv(n, BLOCKSIZE)
    # As the reference (bnb): whole blocks multiply by a correctly rounded 1/absmax, the short
    # last block divides; a zero block scales to 0 (its values take the code of 0). bnb stores
    # the short block's divisor max(absmax, 1e-38) as its scale, whole blocks' absmax as it is.
    denom = tl.maximum(absmax, 1e-38)
    tl.store(absmax_ptr + blk, tl.where((blk + 1) * BLOCKSIZE > n, denom, absmax), mask=blk < nblocks)
    recip = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), denom), 0.0)
    tail = (blk[:, None] + 1) * BLOCKSIZE > n
    quot = tl.math.div_rn(x, tl.broadcast_to(denom[:, None], x.shape))
    scaled = tl.where(tail & (absmax[:, None] > 0), quot, x * recip[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    # Nearest table value = number of decision bounds strictly below the value (bucketize).
    idx = tl.zeros(scaled.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        idx += (tl.load(bounds_ptr + i) < scaled).to(tl.int32)
    q = tl.load(order_ptr + idx).to(tl.uint8)
    hi, lo = tl.split(tl.reshape(q, (BLOCKS_PER_PROG, BLOCKSIZE // 2, 2)))
    packed = (hi << 4) | lo
    poffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + poffs, packed, mask=poffs < (n + 1) // 2)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of 4-bit block `blk`, decoding the 8-bit nested scale when DOUBLE_QUANT."""
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        s = s + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    boffs = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    byte = tl.load(packed_ptr + boffs, mask=boffs < (n + 1) // 2, other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK,))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, offs // BLOCKSIZE, mask,
                     DOUBLE_QUANT, NESTED_BLOCKSIZE)
    v = tl.load(code_ptr + q) * s
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)



# ----------------------------------------------------------------------------------------------
# Matmul kernels
# ----------------------------------------------------------------------------------------------


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
    byte = tl.load(codes_ptr + rows.to(tl.int64)[:, None] * stride_wn + (col_start // 2 + tl.arange(0, HALF))[None, :],
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
        blk = rows.to(tl.int64) * (K // BLOCKSIZE) + col_start // BLOCKSIZE
        s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, row_mask,
                         DOUBLE_QUANT, NESTED_BLOCKSIZE)
        return s, s
    else:
        # consecutive (even, odd) columns 2j, 2j+1 always share a block (BLOCKSIZE is even)
        cols = col_start + 2 * tl.arange(0, COLS // 2)
        blk = rows.to(tl.int64)[:, None] * (K // BLOCKSIZE) + (cols // BLOCKSIZE)[None, :]
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
        xe, xo = load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K, DOT_DTYPE)
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
        xe, xo = load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K, tl.float32)
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
def gemv_4bit_words_kernel(
    x_ptr, words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, bias_ptr, y_ptr,
    ws_ptr, count_ptr,
    N, K, stride_wn,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PAIRS: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W^T (+ bias) for M <= 4, in one launch, without tensor cores.

    Loop shape (each choice removes instructions the SASS of the previous GEMV spent; the cost
    report, python -m lowbit.kernels.cost, counts them):
    - W is read as int32 words of 8 codes, [BLOCK_N, 4] tiles (32 codes) of which a step of BLOCK_K
      takes BLOCK_K / 32: one 128-bit load per tile, row and thread, each thread owning whole rows of
      the step (a wider tile would split a row's columns over threads: shuffles), so every
      sum below stays inside a thread (no shuffles) and every tensor keeps the word tile's layout
      (no conversion through shared memory, no barriers);
    - the 8 codes of a word are decoded one shift at a time by an L1-resident table gather
      (`_common.table_value`), multiplied by the matching x element and summed in fp32 registers; the
      step's per-row partial is scaled once (BLOCK_K <= BLOCKSIZE: one block per step; BLOCK_K = 64
      halves the scale loads and decodes of BLOCK_K = 32);
    - the rows of x share every decoded weight (M accumulators); bf16 x is read as int32 pairs
      (kernels._common.fma_x_pair);
    - split-K writes fp32 partials to a workspace and the last program of each row tile (a
      counter per tile, reset by that program) sums them in split order, adds the bias, casts
      and stores: one launch, deterministic, no memset.
    Byte b of a word holds elements 2b (high nibble) and 2b+1 (low nibble): element j is at shift
    8 * (j // 2) + 4 * (1 - j % 2).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N)[:, None]
    WORDS: tl.constexpr = 4
    cols = tl.arange(0, WORDS)[None, :]
    rows64 = offs_n.to(tl.int64)[:, None]
    table_base = code_ptr.to(tl.int64, bitcast=True)
    k_len = K // SPLIT_K
    acc0 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for kk in range(0, k_len, BLOCK_K):
        k0 = pid_k * k_len + kk
        p0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for t in tl.static_range(BLOCK_K // 32):
            w = tl.load(words_ptr + rows64 * stride_wn + (tl.multiple_of((k0 + 32 * t) // 8, WORDS) + cols),
                        mask=n_mask, other=0, eviction_policy="evict_first")
            for pair in tl.static_range(4):  # byte `pair`: element 2 pair (high nibble), then 2 pair + 1
                v0 = table_value(w, table_base, 8 * pair + 4)
                v1 = table_value(w, table_base, 8 * pair)
                kp = k0 // 2 + 16 * t + 4 * cols + pair  # pair index, [1, WORDS]: in the tile's layout
                p0, p1, p2, p3 = fma_x_pair(p0, p1, p2, p3, v0, v1, x_ptr, kp, K, M, PAIRS)
        s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         rows64 * (K // BLOCKSIZE) + k0 // BLOCKSIZE, n_mask, DOUBLE_QUANT, NESTED_BLOCKSIZE)
        acc0, acc1, acc2, acc3 = words_accumulate(acc0, acc1, acc2, acc3, p0, p1, p2, p3, s, M)
    words_epilogue(y_ptr, ws_ptr, count_ptr, bias_ptr, acc0, acc1, acc2, acc3, pid_n, pid_k, offs_n, n_mask, N,
                   M, HAS_BIAS, SPLIT_K)


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
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
        we, wo = _dequant_halves(codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                                 offs_n, n_mask, k0, K, stride_wn, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE,
                                 DOUBLE_QUANT, DOT_DTYPE, DECODE)
        acc_e = tl.dot(g, we, acc_e, input_precision=PRECISION)
        acc_o = tl.dot(g, wo, acc_o, input_precision=PRECISION)
    # Re-interleave the even and odd output columns once per tile, at the store.
    acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = gx_ptr + pid_s.to(tl.int64) * stride_s + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])



# ----------------------------------------------------------------------------------------------
# Configs and launchers
# ----------------------------------------------------------------------------------------------


C = MatmulConfig
G = GradXConfig
# Forward configs by M bucket (the largest M each serves). The first entry of each bucket is the
# default (no table, no timing at run time); with autotuning on (LOWBIT_AUTOTUNE=1, opt-in) every candidate of the bucket,
# and dequantize+cuBLAS, is timed once per (M, N, K, dtype) and the fastest kept. Chosen from
# benchmarks/results/2026-11-26-h100-sweep.log (H100): decode=2 (tl.gather from a register
# table) beat the global-memory gather and the select tree everywhere, and BLOCK_K=64 beat 128/256.
FORWARD_CONFIGS: dict[int, list[MatmulConfig]] = {
    # "words" (gemv_4bit_words_kernel): 5.8 SASS instructions per weight on sm_90 at 4 rows per
    # thread and steps of 64 codes, 0 barriers, 0 shuffles, 128-bit code loads, against 12.4-15.2 for
    # the "gemv" configs (python -m lowbit.kernels.cost, 2026-11-27; never timed on a GPU yet). The
    # default runs 2 warps of 128 rows: with 1 warp ptxas keeps 96 registers and spills 8 B without
    # double quant (sm_90). Split 4 serves K = 11008 (Llama's MLP); the 32-code steps serve K that
    # 64 * split does not divide. Fewer rows per thread (32 per warp) cost 8.1 instructions per weight
    # but put more warps in flight at small N.
    1: [C("words", 1, 256, 64, 16, 2, 1), C("words", 1, 256, 64, 4, 2, 1), C("words", 1, 128, 32, 16, 1, 1),
        C("words", 1, 128, 32, 8, 1, 1), C("words", 1, 32, 32, 16, 1, 1), C("words", 1, 256, 32, 8, 2, 1),
        C("gemv", 1, 32, 64, 4, 4, 3), C("gemv", 1, 64, 64, 2, 4, 3), C("gemv", 1, 32, 64, 8, 4, 3),
        C("gemv", 1, 64, 64, 4, 4, 3), C("gemv", 1, 128, 64, 2, 4, 3),
        # untimed guesses that extend the sweep's trend (smaller BLOCK_K was faster); the tuner decides
        C("gemv", 1, 64, 32, 4, 4, 3), C("gemv", 1, 128, 32, 4, 4, 3)],
    # dot first: 9.4 instructions per weight against 33.8 for the M<=4 "gemv" (cost report)
    4: [C("dot", 16, 128, 64, 2, 4, 3), C("words", 4, 64, 64, 8, 1, 1), C("gemv", 4, 32, 64, 4, 4, 3),
        C("dot", 16, 128, 64, 4, 4, 3)],
    16: [C("dot", 16, 128, 64, 2, 4, 3), C("dot", 16, 256, 64, 2, 8, 3), C("dot", 16, 128, 64, 4, 4, 3),
         C("dot", 16, 64, 64, 4, 4, 4)],
    # 64x256 and 128x256 tiles take BLOCK_K 32: with BLOCK_K 64 they spill (sm_90: 255 registers and
    # an 8 B (64x256) / 24 B (128x256) stack; sm_80 128x256: 32 registers, 3.5 KB stack), and the
    # compile tier fails on any stack frame (AOT compile, Triton 3.9, 2026-11-27).
    64: [C("dot", 64, 128, 64, 1, 4, 3), C("dot", 32, 128, 64, 2, 4, 3), C("dot", 64, 256, 32, 1, 8, 3)],
    1 << 30: [C("dot", 128, 256, 32, 1, 8, 3), C("dot", 64, 128, 64, 1, 4, 4)],
}
GRAD_X_CONFIGS: dict[int, list[GradXConfig]] = {
    16: [G(16, 64, 128, 4, 4, 3), G(16, 128, 64, 2, 4, 3)],
    1 << 30: [G(128, 64, 64, 1, 4, 4), G(64, 64, 128, 1, 4, 3)],
}
# Small tiles for the interpreter; together they cover every decode method and both GEMV and dot.
INTERPRETER_FORWARD = [C("words", 1, 32, 32, 2, 1, 1), C("gemv", 1, 32, 64, 2, 4, 1, 2), C("dot", 16, 32, 32, 2, 4, 1, 2),
                       C("dot", 32, 32, 64, 1, 4, 1, 0), C("gemv", 4, 16, 64, 1, 4, 1, 1),
                       C("dot", 16, 16, 128, 1, 4, 1, 1)]
INTERPRETER_GRAD_X = [G(16, 32, 32, 2, 4, 1, 2), G(32, 64, 32, 1, 4, 1, 1), G(16, 128, 16, 1, 4, 1, 0)]
FALLBACK_FORWARD = C("dot", 16, 32, 32, 1, 4, 1, 1)
FALLBACK_GRAD_X = G(16, 32, 32, 1, 4, 1, 1)
# DEQUANT (from _common): not fused, dequantize W once into a scratch tensor in the activation
# dtype, then cuBLAS. Kept as a measured candidate because the fused kernels lose to it at large
# M on an H100 today (docs/benchmarks.md); the tuner takes whichever is faster for the shape.


def _fits_forward(cfg: MatmulConfig, m: int, k: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> bool:
    # "words" with fp32 activations spills 8 B on sm_90 (ptxas keeps 80 registers): fp16/bf16 only,
    # except under the interpreter, which runs everything in fp32.
    # A words step lies inside one scale block.
    if cfg.kind == "words" and ((dtype == torch.float32 and not interpreting())
                                or blocksize % cfg.block_k or cfg.block_k % 32):
        return False
    return (cfg.kind != "dequant" and (cfg.kind not in ("gemv", "words") or m <= cfg.block_m)
            and k % (cfg.block_k * cfg.split_k) == 0)


def _fits_grad_x(cfg: GradXConfig, k: int) -> bool:
    return k % cfg.block_k == 0


def _dense_tables(code, nested_code):
    """The kernels index the 16-entry code table and the 256-entry nested map with stride 1."""
    return code.contiguous(), None if nested_code is None else nested_code.contiguous()


def _scale_args(absmax, nested_absmax, nested_code, offset):
    dq = nested_absmax is not None
    return (absmax, nested_absmax if dq else absmax, nested_code if dq else absmax, offset if dq else absmax), dq


def _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize, dtype):
    return dequantize_4bit(codes, absmax, code, blocksize, n * k, dtype, nested_absmax, nested_code, offset,
                           nested_blocksize).view(n, k)


def matmul_4bit(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
                bias, config: MatmulConfig | None = None):
    """y[M, n] = x[M, K] @ W^T (+ bias). x: 2-D, fp16/bf16/fp32, K % blocksize == 0."""
    code, nested_code = _dense_tables(code, nested_code)
    m, k = x.shape
    x_in, out_dtype = x, x.dtype
    x = cpu_operand(x)
    dot_dt = dot_dtype(x.dtype, x.device)
    scales, dq = _scale_args(absmax, nested_absmax, nested_code, offset)
    fmt = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": nested_blocksize, "DOUBLE_QUANT": dq}

    def run(cfg: MatmulConfig):
        if cfg.kind == "dequant":
            w = _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                                 nested_blocksize, x.dtype)
            return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype)).to(out_dtype)
        if cfg.kind == "words":  # integer work only: x_in (bf16 stays bf16 under the interpreter too)
            # table_value ORs offsets into the table's address: it must be 64-byte aligned
            table = code if code.data_ptr() % 64 == 0 else code.clone()
            return words_gemv("nf4", gemv_4bit_words_kernel, x_in.contiguous(), (words_codes(codes), *scales, table),
                              (n, k, k // 8), n, bias, cfg, out_dtype, **fmt, BLOCK_K=cfg.block_k)
        return tiled_matmul("nf4", gemv_4bit_kernel, matmul_4bit_kernel, x, (codes, *scales, code), k // 2, n, bias,
                            cfg, out_dtype, dot_dt, **fmt, DECODE=cfg.decode)

    if config is not None and config.kind != "dequant" and not _fits_forward(config, m, k, x.dtype, blocksize):
        raise ValueError(f"config {config} does not serve M={m}, K={k}, blocksize={blocksize}, {x.dtype} "
                         "(an explicit config must fit the call: see _fits_forward)")
    if config is None:
        if x.device.type == "cpu":
            cands = [c for c in INTERPRETER_FORWARD if _fits_forward(c, m, k, blocksize=blocksize)
                     and (m == 1 or c.kind == "dot")]
            config = cands[0] if cands else FALLBACK_FORWARD
        else:
            cands = [c for c in FORWARD_CONFIGS[bucket(FORWARD_CONFIGS, m)]
                     if _fits_forward(c, m, k, x.dtype, blocksize)]
            if not cands:
                cands = [C("dot", 16 if m <= 16 else 64, 64, 32, 1, 4, 3, 1)]
            config = pick(("fwd", tune_m(m), n, k, x.dtype, dq, blocksize), with_dequant(cands, m), run)
    return run(config)


def matmul_4bit_grad_x(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset,
                       nested_blocksize, config: GradXConfig | MatmulConfig | None = None):
    """gx[M, k] = g[M, N] @ W. g: 2-D, fp16/bf16/fp32."""
    code, nested_code = _dense_tables(code, nested_code)
    m, n = g.shape
    out_dtype = g.dtype
    g = cpu_operand(g)
    dot_dt = dot_dtype(g.dtype, g.device)
    scales, dq = _scale_args(absmax, nested_absmax, nested_code, offset)

    def run(cfg):
        if cfg == DEQUANT:
            w = _dequantize_rows(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                                 nested_blocksize, g.dtype)
            return (g @ w).to(out_dtype)
        return grad_x_matmul("nf4", matmul_4bit_grad_x_kernel, g, (codes, *scales, code), k // 2, k, cfg, out_dtype,
                             dot_dt, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=dq,
                             DECODE=cfg.decode)

    if config is None:
        if g.device.type == "cpu":
            config = next((c for c in INTERPRETER_GRAD_X if _fits_grad_x(c, k)), FALLBACK_GRAD_X)
        else:
            cands = [c for c in GRAD_X_CONFIGS[bucket(GRAD_X_CONFIGS, m)] if _fits_grad_x(c, k)]
            if not cands:
                cands = [G(64, 32, 64, 1, 4, 3, 1)]
            cands.append(DEQUANT)
            config = pick(("gx", tune_m(m), n, k, g.dtype, dq, blocksize), cands, run)
    return run(config)


def quantize_4bit(
    flat: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = alloc_output((n + 1) // 2, torch.uint8, flat.device)
    absmax = alloc_output(nblocks, torch.float32, flat.device)
    per_prog = max(1, 2048 // blocksize)
    grid = (triton.cdiv(nblocks, per_prog),)
    count_launch("nf4.quantize")
    quantize_4bit_kernel[grid](
        flat, packed, absmax, bounds.float().contiguous(), order.to(torch.int32).contiguous(), n,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=per_prog, num_warps=4,
    )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    code, nested_code = _dense_tables(code, nested_code)
    double_quant = nested_absmax is not None
    store_dtype = torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype
    out = alloc_output(numel, store_dtype, packed.device)
    dummy = absmax  # never read when DOUBLE_QUANT is False
    block = 1024
    count_launch("nf4.dequantize")
    dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code,
        nested_absmax if double_quant else dummy,
        nested_code if double_quant else dummy,
        offset if double_quant else dummy,
        out, numel,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------
# Compile specs (kernels/_compile.py, `python -m lowbit._aot`, `python -m lowbit.kernels.cost`)
# ----------------------------------------------------------------------------------------------

# Bytes per weight streamed by a forward/grad_x call with double quantization: 4-bit codes, one
# uint8 scale code per 64 weights, one fp32 nested scale per 256 blocks.
_DQ_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def aot_specs() -> list:
    """Every config of the tables, launched by its launcher on meta tensors (N = K = 4096, the
    largest M its buckets serve, capped at 4096) so that the compile tier builds what the JIT
    builds: bf16 with double quant for each config; fp16, fp32 and plain scales for the first
    one; the quantize and dequantize kernels."""
    n = k = 4096
    code = meta(16)

    def weights(dq: bool):  # codes, absmax, nested_absmax, nested_code, offset
        codes = meta(n * k // 2, dtype=torch.uint8)
        if dq:
            return codes, meta(n * k // 64, dtype=torch.uint8), meta(n * k // 64 // 256), meta(256), meta(1)
        return codes, meta(n * k // 64), None, None, None

    specs = []
    for i, (cfg, m_bucket) in enumerate(buckets(FORWARD_CONFIGS).items()):
        extra = [(torch.float16, True), (torch.float32, True), (torch.bfloat16, False)] if i == 0 else []
        if cfg.kind == "words":  # never launched with fp32 activations on a GPU (_fits_forward)
            extra = [(dt, dq) for dt, dq in extra if dt != torch.float32]
        for dt, dq in [(torch.bfloat16, True)] + extra:
            m = min(m_bucket, 4096)
            codes, absmax, nested_absmax, nested_code, offset = weights(dq)
            x, bias = meta(m, k, dtype=dt), meta(n, dtype=dt)
            name = _forward_spec_name(cfg, dt, dq)
            cost = None
            if (dt, dq) == (torch.bfloat16, True):
                cost = {"kernel": f"nf4.{cfg.kind}", "format": "nf4", "m_bucket": m_bucket, "config": cfg,
                        "weights_per_iter": cfg.block_n * cfg.block_k, "bytes_per_weight": _DQ_BYTES_PER_WEIGHT}
            specs.append(launch_spec(name, lambda: matmul_4bit(x, codes, absmax, code, 64, n, nested_absmax,
                                                               nested_code, offset, 256, bias, config=cfg), cost))
    for i, (cfg, m_bucket) in enumerate(buckets(GRAD_X_CONFIGS).items()):
        extra = [(torch.float16, True), (torch.float32, False)] if i == 0 else []
        for dt, dq in [(torch.bfloat16, True)] + extra:
            m = min(m_bucket, 4096)
            codes, absmax, nested_absmax, nested_code, offset = weights(dq)
            g = meta(m, n, dtype=dt)
            name = (f"grad_x_4bit[{SIG_DT[dt]},dq={dq},{cfg.block_m}x{cfg.block_k}x{cfg.block_n},"
                    f"split={cfg.split_n},w={cfg.num_warps},s={cfg.num_stages},dec={cfg.decode}]")
            cost = None
            if (dt, dq) == (torch.bfloat16, True):
                cost = {"kernel": "nf4.grad_x", "format": "nf4", "m_bucket": m_bucket, "config": cfg,
                        "weights_per_iter": cfg.block_n * cfg.block_k, "bytes_per_weight": _DQ_BYTES_PER_WEIGHT}
            specs.append(launch_spec(name, lambda: matmul_4bit_grad_x(g, codes, absmax, code, 64, k, nested_absmax,
                                                                      nested_code, offset, 256, config=cfg), cost))
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for bs in (64, 4096):
            flat = meta(n * k, dtype=dt)
            specs.append(launch_spec(f"quantize_4bit[{SIG_DT[dt]},bs={bs}]",
                                     lambda: quantize_4bit(flat, bs, meta(15), meta(16, dtype=torch.int32))))
        for dq in (False, True):
            codes, absmax, nested_absmax, nested_code, offset = weights(dq)
            specs.append(launch_spec(f"dequantize_4bit[{SIG_DT[dt]},dq={dq}]",
                                     lambda: dequantize_4bit(codes, absmax, code, 64, n * k, dt, nested_absmax,
                                                             nested_code, offset, 256)))
    return specs


def _forward_spec_name(cfg: MatmulConfig, dt: torch.dtype, dq: bool) -> str:
    return (f"{cfg.kind}_4bit[{SIG_DT[dt]},dq={dq},{cfg.block_m}x{cfg.block_n}x{cfg.block_k},"
            f"split={cfg.split_k},w={cfg.num_warps},s={cfg.num_stages},dec={cfg.decode}]")


# Static goals checked by tests/test_cost.py on the cost report (python -m lowbit.kernels.cost).
# The M=1 default (the "words" GEMV, bf16, nf4 + double quant) at <= 6.0 SASS instructions per
# weight on sm_90 (the issue's goal; 5.2 would stream at the H100's full copy bandwidth), with one
# 128-bit load per 32 codes (4 code bits per weight, each loaded once), no barrier, no shuffle,
# no spill.
COST_BUDGETS = [
    CostBudget(_forward_spec_name(FORWARD_CONFIGS[1][0], torch.bfloat16, True), max_instr_per_weight=6.0,
               code_load_bits=128, code_bits_per_weight=4),
]

# Pointer arguments whose offsets grow with M (activation rows) or with N * K (weight bytes), by
# spec-name prefix: tests/test_compile_tier.py checks that each gets a 64-bit tensor offset.
INT64_POINTERS = {
    "gemv_4bit": ("x_ptr", "codes_ptr", "y_ptr"), "dot_4bit": ("x_ptr", "codes_ptr", "y_ptr"),
    "grad_x_4bit": ("g_ptr", "codes_ptr", "gx_ptr"),
    "quantize_4bit": ("x_ptr", "packed_ptr"), "dequantize_4bit": ("packed_ptr", "out_ptr"),
}
