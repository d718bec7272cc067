"""Triton kernels for 2/3/4-bit integer weights with per-row or per-group scale and zero point.

Over 500 lines, like kernels/nf4.py: the GEMV, GEMM, grad_x and grad_scale kernels share the field-unpacking
helpers at the top; splitting them would put one decode in two files.

W [N, K] is stored as in lowbit.formats.intq (format version 3): int32 words, per row a stream of
K * bits / 32 words holding the codes Q as packed fields (int4 nibbles, int2 crumbs, int3 quads of
crumb words A, B and third-bit words H), scale [N, G] (any float dtype, read as fp32) and zeros
uint8 [N, G], W = s * (Q - z), column k in group k // GROUP, G = NG = ceil(K / GROUP): when GROUP does
not divide K the last group of a row is ragged (shorter). No kernel derives the group length from
K / NG, and every K loop stops at K (the launchers pick tiles that divide K; a tile or words step
that divides GROUP and K never straddles a group, the ragged one included). Tiles of W are unpacked
and scaled in registers and fed to tl.dot with fp32 accumulation:

  forward     y[M, N]  = x[M, K] @ W^T            (GEMM with tl.dot, or GEMV for small M)
  grad_x      gx[M, K] = gy[M, N] @ W
  grad_scale  gs[N, G] = sum_{k in g} (Q - z)[n, k] * (gy^T x)[n, k]   (gy^T x tiles in registers)

The launchers pick a config and hand the launch to kernels/_launch.py (shared with nf4); the file
ends with the compile specs and cost goals the AOT compile and the cost report find.

Scale modes (constexprs): PER_ROW (G = 1), TILE_IN_GROUP (a K-tile never straddles a group: one
scale per tile row), otherwise one scale per element of the tile. SPLIT_K/SPLIT_N/SPLIT_M > 1
write fp32 partial sums that the launcher reduces (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    GradScaleConfig,
    GradXConfig,
    MatmulConfig,
    alloc_output,
    bucket,
    count_launch,
    dot_dtype,
    fma_x_pair,
    grouped_tile,
    interpreting,
    pick,
    precision,
    store_output,
    tune_m,
    words_accumulate,
    words_epilogue,
)
from ._launch import (
    SIG_DT,
    buckets,
    cpu_operand,
    grad_x_matmul,
    sm_count,
    tiled_matmul,
    words_codes,
    words_gemv,
)
from ._spec import CostBudget, launch_spec, meta


@triton.jit
def _unpack_tile(codes_ptr, rows, row_mask, col_start, K, COLS: tl.constexpr, BITS: tl.constexpr):
    """Q[rows, col_start : col_start + COLS] as int32 [len(rows), COLS // 32, 32] (col_start % 32 == 0),
    from the packed layout of lowbit.formats.intq (format version 3)."""
    R: tl.constexpr = rows.shape[0]
    NW: tl.constexpr = COLS // 32
    chunk = col_start // 32 + tl.arange(0, NW)  # 32-code chunks of the tile
    row_base = rows.to(tl.int64)[:, None] * ((K // 32) * BITS)
    lane = tl.arange(0, 32)[None, None, :]
    q = tl.zeros((R, NW, 32), dtype=tl.int32)
    if BITS == 3:
        quad = chunk // 4
        j = chunk % 4
        r = tl.minimum(4, K // 32 - 4 * quad)  # chunks in this quad (the row's last may be short)
        base = row_base + (12 * quad + j)[None, :]
        a = tl.load(codes_ptr + base, mask=row_mask[:, None], other=0)[:, :, None]
        b = tl.load(codes_ptr + base + r[None, :], mask=row_mask[:, None], other=0)[:, :, None]
        h = tl.load(codes_ptr + base + 2 * r[None, :], mask=row_mask[:, None], other=0)[:, :, None]
        lo = lane < 16
        crumb = (tl.where(lo, a, b) >> (2 * (lane % 16))) & 3
        third = (h >> tl.where(lo, 2 * lane + 1, 2 * (lane - 16))) & 1
        q = crumb | (third << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        base = row_base + (chunk * BITS)[None, :]
        word = tl.load(codes_ptr + base, mask=row_mask[:, None], other=0)[:, :, None]
        for t in tl.static_range(1, BITS):  # word t of the chunk holds lanes PER_WORD * t ..: pick the word
            wt = tl.load(codes_ptr + base + t, mask=row_mask[:, None], other=0)[:, :, None]
            word = tl.where(lane // PER_WORD == t, wt, word)
        q = (word >> (BITS * (lane % PER_WORD))) & ((1 << BITS) - 1)
    return q


@triton.jit
def _dequant_tile(codes_ptr, scale_ptr, zero_ptr, rows, row_mask, col_start, K, NG,
                  COLS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                  TILE_IN_GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """W[rows, col_start : col_start + COLS] = s * (Q - z), as [len(rows), COLS] in DOT_DTYPE."""
    R: tl.constexpr = rows.shape[0]
    NW: tl.constexpr = COLS // 32
    q = _unpack_tile(codes_ptr, rows, row_mask, col_start, K, COLS, BITS).to(tl.float32)
    if PER_ROW or TILE_IN_GROUP:
        if PER_ROW:
            idx = rows
        else:
            idx = rows * NG + col_start // GROUP
        z = tl.load(zero_ptr + idx, mask=row_mask, other=0).to(tl.float32)
        s = tl.load(scale_ptr + idx, mask=row_mask, other=0.0).to(tl.float32)
        w = (q - z[:, None, None]) * s[:, None, None]
    else:
        # Groups are whole 32-chunks: one scale and zero per (row, chunk).
        chunk = col_start // 32 + tl.arange(0, NW)
        idx = rows[:, None] * NG + (chunk * 32 // GROUP)[None, :]
        z = tl.load(zero_ptr + idx, mask=row_mask[:, None], other=0).to(tl.float32)
        s = tl.load(scale_ptr + idx, mask=row_mask[:, None], other=0.0).to(tl.float32)
        w = (q - z[:, :, None]) * s[:, :, None]
    return tl.reshape(w.to(DOT_DTYPE), (R, COLS))


@triton.jit
def matmul_int_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    M, N, K, NG,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
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
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0).to(DOT_DTYPE)
        w = _dequant_tile(codes_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, K, NG,
                          BLOCK_K, BITS, GROUP, PER_ROW, TILE_IN_GROUP, DOT_DTYPE)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def gemv_int_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    M, N, K, NG,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Small-M path (M <= BLOCK_M): a broadcast multiply and a row reduction, no tensor cores."""
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
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0).to(tl.float32)
        w = _dequant_tile(codes_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, K, NG,
                          BLOCK_K, BITS, GROUP, PER_ROW, TILE_IN_GROUP, tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def _field(w, third, magic, z, O: tl.constexpr, WIDTH: tl.constexpr, THIRD: tl.constexpr):
    """Q - z as fp32 (exactly) for the WIDTH-bit code field at bit O of w (O + WIDTH <= 23), z the
    row's zero point as fp32; with THIRD (int3) the code's bit 2 comes from bit O + 2 of `third`. The
    field is OR-ed into the mantissa of 2^(23 - O), giving 2^(23 - O) + Q: one LOP3 (two with THIRD)
    instead of a shift, a mask and a slow int->float convert; one FADD of -(2^(23 - O) + z), whose
    constant part the compiler hoists out of the loop, leaves Q - z. `magic` is the
    bit pattern of 2^23 (0x4B000000) passed in at run time: a constant the compiler knew would be
    re-materialized (a MOV) for every use, since a LOP3 takes one immediate and the mask is it."""
    # XOR, not OR: the bits are disjoint, and an XOR keeps the compiler from re-associating the int3
    # OR chain into three LOP3s (a & m | h & m2 | magic) instead of two
    t = (w & (((1 << WIDTH) - 1) << O)) ^ (magic - (O << 23))
    if THIRD:
        t = t | (third & (4 << O))
    return t.to(tl.float32, bitcast=True) - (z + (1 << (23 - O)))


@triton.jit
def gemv_int_words_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    N, K, NG, ROW_TILES, magic,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PAIRS: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W^T (+ bias) for M <= 4, in one launch, without tensor cores.

    The loop of the nf4 "words" GEMV (kernels/nf4.py), for the packed integer layout: each step
    loads, per row and thread, one 128-bit tile of 4 code words (int4: 32 codes, int2: 64; int3:
    128 codes as the A, B and H words of one quad, three 128-bit loads). A code is decoded by
    `_field` (a mask OR-ed into a float's mantissa, one FADD for - 2^(23 - O) - z), multiplied by
    its x element and summed in fp32 registers; the upper 16 bits of a word are shifted down once
    so every field sits inside the mantissa. Each thread owns whole rows of the step (no shuffles,
    no shared memory); per-row scales multiply once after the loop, group scales once per step
    (the launcher only picks this kernel when a group holds whole steps). Split-K and the epilogue
    are the nf4 kernel's (kernels._common.words_epilogue).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N)[:, None]
    rows64 = offs_n.to(tl.int64)[:, None]
    cols = tl.arange(0, 4)[None, :]
    STEP: tl.constexpr = 128 if BITS == 3 else 128 // BITS  # codes per row per step
    CPW: tl.constexpr = 32 // BITS  # codes per word (int3: per crumb word, 16)
    # ROW_TILES = K * BITS / 128: a row is that many 128-bit tiles, so every row starts 16-byte
    # aligned and the compiler can prove it (a plain K * BITS / 32 would give int3 32-bit loads)
    row_words = codes_ptr + rows64 * (ROW_TILES * 4)
    k_len = K // SPLIT_K
    acc0 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    if PER_ROW:
        z = tl.load(zero_ptr + rows64, mask=n_mask, other=0).to(tl.float32)
    for kk in range(0, k_len, STEP):
        k0 = pid_k * k_len + kk
        if not PER_ROW:
            z = tl.load(zero_ptr + rows64 * NG + k0 // GROUP, mask=n_mask, other=0).to(tl.float32)
        p0 = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
        words = row_words + tl.multiple_of((k0 // 32) * BITS, 4) + cols
        if BITS == 3:
            a = tl.load(words, mask=n_mask, other=0, eviction_policy="evict_first")
            b = tl.load(words + 4, mask=n_mask, other=0, eviction_policy="evict_first")
            h = tl.load(words + 8, mask=n_mask, other=0, eviction_policy="evict_first")
            for half in tl.static_range(2):  # codes 0..7, then 8..15 of each crumb word
                if half == 0:
                    a_, b_, ha, hb = a, b, h << 1, h << 2
                else:
                    a_, b_, ha, hb = a >> 16, b >> 16, h >> 15, h >> 14
                for i in tl.static_range(0, 8, 2):
                    va0 = _field(a_, ha, magic, z, 2 * i, 2, True)
                    va1 = _field(a_, ha, magic, z, 2 * i + 2, 2, True)
                    vb0 = _field(b_, hb, magic, z, 2 * i, 2, True)
                    vb1 = _field(b_, hb, magic, z, 2 * i + 2, 2, True)
                    kp = k0 // 2 + 16 * cols + 4 * half + i // 2  # pair index of code i of word A (constants fold)
                    p0, p1, p2, p3 = fma_x_pair(p0, p1, p2, p3, va0, va1, x_ptr, kp, K, M, PAIRS)
                    p0, p1, p2, p3 = fma_x_pair(p0, p1, p2, p3, vb0, vb1, x_ptr, kp + 8, K, M, PAIRS)
        else:
            w = tl.load(words, mask=n_mask, other=0, eviction_policy="evict_first")
            for half in tl.static_range(2):
                w_ = w if half == 0 else w >> 16
                for i in tl.static_range(0, CPW // 2, 2):
                    v0 = _field(w_, w_, magic, z, BITS * i, BITS, False)
                    v1 = _field(w_, w_, magic, z, BITS * i + BITS, BITS, False)
                    kp = k0 // 2 + (CPW // 2) * cols + (CPW // 4) * half + i // 2  # pair index (constants fold)
                    p0, p1, p2, p3 = fma_x_pair(p0, p1, p2, p3, v0, v1, x_ptr, kp, K, M, PAIRS)
        if PER_ROW:  # the row's scale multiplies once, after the loop (x * 1.0 folds away)
            s_step = 1.0
        else:
            s_step = tl.load(scale_ptr + rows64 * NG + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        acc0, acc1, acc2, acc3 = words_accumulate(acc0, acc1, acc2, acc3, p0, p1, p2, p3, s_step, M)
    if PER_ROW:
        s = tl.load(scale_ptr + rows64, mask=n_mask, other=0.0).to(tl.float32)
        acc0 *= s
        acc1 *= s
        acc2 *= s
        acc3 *= s
    words_epilogue(y_ptr, ws_ptr, count_ptr, bias_ptr, acc0, acc1, acc2, acc3, pid_n, pid_k, offs_n, n_mask, N,
                   M, HAS_BIAS, SPLIT_K)


@triton.jit
def matmul_int_grad_x_kernel(
    g_ptr, codes_ptr, scale_ptr, zero_ptr, gx_ptr,
    M, N, K, NG,
    stride_gm, stride_gn, stride_s, stride_om, stride_ok,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_k = grouped_tile(pid, tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_len = tl.cdiv(tl.cdiv(N, SPLIT_N), BLOCK_N) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for nn in range(0, n_len, BLOCK_N):
        offs_n = pid_s * n_len + nn + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = _dequant_tile(codes_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, K, NG,
                          BLOCK_K, BITS, GROUP, PER_ROW, TILE_IN_GROUP, DOT_DTYPE)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    out = gx_ptr + pid_s.to(tl.int64) * stride_s + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def matmul_int_grad_scale_kernel(
    g_ptr, x_ptr, codes_ptr, zero_ptr, gs_ptr,
    M, N, K, NG,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_s, GLEN,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """gs[pid_s, n, g] = sum over this split's rows m of gy[m, n] * x[m, k in g] @ (Q - z)[n, k].

    Grid (cdiv(N, BLOCK_N), NG, SPLIT_M). Each (BLOCK_N, BLOCK_K) tile of gy^T x lives only in
    registers; it is multiplied by (Q - z) and reduced over k at once. GLEN: the group length (K for
    per-row scales); group g covers columns g * GLEN .. min(K, (g + 1) * GLEN), so a ragged last group
    stops at K (BLOCK_K divides GLEN and K, hence that group's length too).
    """
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    glen = tl.minimum(GLEN, K - pid_g * GLEN)  # the ragged last group: its real columns only
    m_len = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = pid_s * m_len
    z = tl.load(zero_ptr + offs_n * NG + pid_g, mask=n_mask, other=0).to(tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kk in range(0, glen, BLOCK_K):
        k0 = pid_g * GLEN + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for mm in range(0, m_len, BLOCK_M):
            offs_m = m_start + mm + tl.arange(0, BLOCK_M)
            m_mask = offs_m < M
            gt = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_m.to(tl.int64)[None, :] * stride_gm,
                         mask=n_mask[:, None] & m_mask[None, :], other=0.0).to(DOT_DTYPE)
            x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(gt, x, acc, input_precision=PRECISION)
        q = tl.reshape(_unpack_tile(codes_ptr, offs_n, n_mask, k0, K, BLOCK_K, BITS), (BLOCK_N, BLOCK_K))
        q = q.to(tl.float32)
        total += tl.sum((q - z[:, None]) * acc, axis=1)
    tl.store(gs_ptr + pid_s * stride_s + offs_n * NG + pid_g, total, mask=n_mask)


# ----------------------------------------------------------------------------------------------
# Configs and launchers
# ----------------------------------------------------------------------------------------------

C = MatmulConfig
G = GradXConfig
S = GradScaleConfig
# Forward configs by M bucket (the largest M each serves); first = default, the tuner times the rest.
# Changed 2026-11-27 because the compile tier fails on any stack frame (AOT compile, Triton 3.9):
# with 4 warps int3 spills 4-8 B at 128-168 registers in the 32x128 GEMV (sm_90), 16x64x128 with
# groups of 128 (sm_80) and 16x32x128 (sm_90), so those tiles run 8 warps. The M=1 default is now
# 16x256 (clean, and 18-26 SASS instructions per weight against 26-33 for the old 32x128 4-warp
# default and 30-41 for 32x128 with 8 warps: `python -m lowbit.kernels.cost`, docs/cost.md).
# "words" (gemv_int_words_kernel, M <= 4): block_k is unused (a step is one 128-bit word tile: 32, 64 or
# 128 codes for int4, int2, int3); the split-K ladder lets every K that is a multiple of the step find
# a config (with autotuning off, the first that fits is used).
_WORDS_M1 = [C("words", 1, 128, 0, s, 1, 1) for s in (16, 4, 2, 1)]  # 2: K = 11008 (int3)
_WORDS_M4 = [C("words", 4, 64, 0, s, 1, 1) for s in (8, 1)]
FORWARD_CONFIGS: dict[int, list[MatmulConfig]] = {
    1: _WORDS_M1 + [C("gemv", 1, 16, 256, 4, 4, 3), C("gemv", 1, 64, 64, 4, 4, 3), C("gemv", 1, 32, 128, 4, 8, 3)],
    4: _WORDS_M4 + [C("gemv", 4, 32, 64, 4, 4, 3), C("dot", 16, 64, 64, 4, 4, 3)],
    16: [C("dot", 16, 64, 128, 4, 8, 3), C("dot", 16, 32, 128, 8, 8, 3), C("dot", 16, 64, 64, 4, 4, 3)],
    64: [C("dot", 64, 64, 64, 1, 4, 3), C("dot", 64, 128, 32, 1, 4, 4)],
    256: [C("dot", 128, 128, 32, 1, 8, 3), C("dot", 64, 128, 32, 1, 4, 4), C("dot", 128, 64, 64, 1, 8, 3)],
    1 << 30: [C("dot", 128, 128, 64, 1, 8, 3), C("dot", 128, 128, 32, 1, 8, 4), C("dot", 64, 128, 32, 1, 4, 4)],
}
GRAD_X_CONFIGS: dict[int, list[GradXConfig]] = {
    16: [G(16, 64, 128, 4, 8, 3), G(16, 64, 64, 4, 4, 3)],  # 4 warps: int2 spills 12 B (sm_90, format 3)
    256: [G(64, 64, 64, 1, 4, 3), G(64, 128, 32, 1, 4, 3)],
    1 << 30: [G(128, 128, 32, 1, 8, 3), G(128, 64, 32, 1, 4, 3)],
}
# 64x64x64 and 64x32x64 run 8 warps: with 4 they spill 8 B on sm_80 (int2/int3; 64x32x64 all widths).
GRAD_SCALE_CONFIGS = [S(64, 64, 64, 8, 3), S(128, 64, 64, 8, 3), S(64, 32, 64, 8, 3)]
GRAD_SCALE_CONFIGS_FP32 = [S(64, 32, 32, 4, 3), S(32, 64, 32, 4, 3)]  # fp32 tiles take twice the registers
INTERPRETER_FORWARD = [C("words", 1, 32, 0, 1, 1, 1), C("gemv", 1, 32, 64, 2, 4, 1), C("dot", 16, 32, 64, 1, 4, 1), C("dot", 16, 32, 32, 2, 4, 1)]
INTERPRETER_GRAD_X = [G(16, 64, 32, 2, 4, 1), G(16, 32, 32, 1, 4, 1)]
INTERPRETER_GRAD_SCALE = S(32, 32, 16, 4, 1)
FALLBACK_FORWARD = C("dot", 16, 32, 32, 1, 4, 1)
FALLBACK_GRAD_X = G(16, 32, 32, 1, 4, 1)


def words_step(bits: int) -> int:
    """Codes per row per step of gemv_int_words_kernel (one 128-bit tile of words; int3: a quad)."""
    return 128 if bits == 3 else 128 // bits


def _fits_forward(cfg: MatmulConfig, m: int, k: int, bits: int, group_len: int, dtype: torch.dtype) -> bool:
    if cfg.kind == "words":
        step = words_step(bits)
        # a group holds whole steps (rows: group_len = K, a multiple of the step when K is); fp32
        # activations: like the nf4 words GEMV, kept to fp16/bf16 on GPUs (register budget)
        # (a ragged last group: K and the group both whole steps, so no step straddles it either)
        return (m <= cfg.block_m and k % (step * cfg.split_k) == 0 and min(group_len, k) % step == 0
                and (dtype != torch.float32 or interpreting()))
    return (cfg.kind != "gemv" or m <= cfg.block_m) and k % (cfg.block_k * cfg.split_k) == 0


def n_groups(k: int, group_len: int) -> int:
    """Scale/zero groups per row: ceil(K / group_len) (the last one ragged when group_len does not divide K)."""
    return -(-k // group_len)


def _scale_mode(k: int, group_len: int, block_k: int) -> dict:
    per_row = group_len >= k  # one group per row ([N] or [N, 1] scales: the same index, row * 1 + 0)
    return {"GROUP": group_len if not per_row else 32, "PER_ROW": per_row,
            "TILE_IN_GROUP": per_row or group_len % block_k == 0}


def matmul_int(x, codes, scale, zeros, bits, group_len, n, bias, config: MatmulConfig | None = None):
    """y[M, n] = x[M, K] @ W^T (+ bias). x: 2-D contiguous, fp16/bf16/fp32; K % 32 == 0."""
    m, k = x.shape
    x_in, out_dtype = x, x.dtype
    x = cpu_operand(x)
    dot_dt = dot_dtype(x.dtype, x.device)
    ng = n_groups(k, group_len)
    scale = cpu_operand(scale)

    def run(cfg: MatmulConfig):
        if cfg.kind == "words":  # integer work only: x_in (bf16 stays bf16 under the interpreter too)
            per_row = group_len >= k
            return words_gemv("intq", gemv_int_words_kernel, x_in.contiguous(), (words_codes(codes), scale, zeros),
                              (n, k, ng, k * bits // 128, 0x4B000000), n, bias, cfg, out_dtype,
                              BITS=bits, GROUP=32 if per_row else group_len, PER_ROW=per_row)
        return tiled_matmul("intq", gemv_int_kernel, matmul_int_kernel, x, (codes, scale, zeros), ng, n, bias, cfg,
                            out_dtype, dot_dt, BITS=bits, **_scale_mode(k, group_len, cfg.block_k))

    if config is not None and not _fits_forward(config, m, k, bits, group_len, x.dtype):
        raise ValueError(f"config {config} does not serve M={m}, K={k}, int{bits}, group_len={group_len}, "
                         f"{x.dtype} (an explicit config must fit the call: see _fits_forward)")
    if config is None:
        if x.device.type == "cpu":
            cands = [c for c in INTERPRETER_FORWARD if _fits_forward(c, m, k, bits, group_len, x.dtype)
                     and (m == 1 or c.kind == "dot")]
            config = cands[0] if cands else FALLBACK_FORWARD
        else:
            cands = [c for c in FORWARD_CONFIGS[bucket(FORWARD_CONFIGS, m)]
                     if _fits_forward(c, m, k, bits, group_len, x.dtype)]
            if not cands:
                cands = [C("dot", 16 if m <= 16 else 64, 64, 32, 1, 4, 3)]
            config = pick(("int_fwd", tune_m(m), n, k, x.dtype, bits, group_len), cands, run)
    return run(config)


def matmul_int_grad_x(g, codes, scale, zeros, bits, group_len, k, config: GradXConfig | None = None):
    """gx[M, k] = g[M, N] @ W. g: 2-D contiguous, fp16/bf16/fp32."""
    m, n = g.shape
    out_dtype = g.dtype
    g = cpu_operand(g)
    dot_dt = dot_dtype(g.dtype, g.device)
    ng = n_groups(k, group_len)
    scale = cpu_operand(scale)

    def run(cfg: GradXConfig):
        return grad_x_matmul("intq", matmul_int_grad_x_kernel, g, (codes, scale, zeros), ng, k, cfg, out_dtype, dot_dt,
                             BITS=bits, **_scale_mode(k, group_len, cfg.block_k))

    if config is None:
        if g.device.type == "cpu":
            config = next((c for c in INTERPRETER_GRAD_X if k % c.block_k == 0), FALLBACK_GRAD_X)
        else:
            cands = [c for c in GRAD_X_CONFIGS[bucket(GRAD_X_CONFIGS, m)] if k % c.block_k == 0]
            cands = cands or [G(64, 32, 64, 1, 4, 3)]
            config = pick(("int_gx", tune_m(m), n, k, g.dtype, bits, group_len), cands, run)
    return run(config)


# grad_scale splits M until its grid fills about this many waves of the device's SMs.
GRAD_SCALE_WAVES = 2


def _split_m(m: int, n: int, ng: int, bn: int, bm: int, device) -> int:
    """SPLIT_M of a grad_scale launch: enough programs for GRAD_SCALE_WAVES waves of the device's
    SMs (meta tensors, i.e. the AOT compile and the cost report: an H100 SXM's 132, so a spec is
    the launch the JIT makes there), at most one per BLOCK_M rows and 64 in all."""
    if device.type == "cpu":
        return 2 if m > bm else 1
    tiles = triton.cdiv(n, bn) * ng
    want = max(1, GRAD_SCALE_WAVES * sm_count(device) // tiles)
    return max(1, min(want, triton.cdiv(m, bm), 64))


def matmul_int_grad_scale(g, x, codes, zeros, bits, group_len, config: GradScaleConfig | None = None):
    """gs[N, ceil(K/group_len)] fp32 = dL/ds for y = x @ W^T with g = dL/dy [M, N], x [M, K]."""
    m, n = g.shape
    k = x.shape[1]
    if g.device.type == "cpu" and g.dtype == torch.bfloat16:
        g, x = g.float(), x.float()
    if x.dtype != g.dtype:
        x = x.to(g.dtype)
    dot_dt = dot_dtype(g.dtype, g.device)
    ng = n_groups(k, group_len)

    def run(cfg: GradScaleConfig):
        glen = min(group_len, k)
        # a K-tile must divide the group and K (so also a ragged last group, K - (ng - 1) * glen): 32 always does
        bk = cfg.block_k if glen % cfg.block_k == 0 and k % cfg.block_k == 0 else 32
        split = _split_m(m, n, ng, cfg.block_n, cfg.block_m, g.device)
        gs = alloc_output((split, n, ng), torch.float32, g.device)
        grid = (triton.cdiv(n, cfg.block_n), ng, split)
        count_launch("intq.grad_scale")
        matmul_int_grad_scale_kernel[grid](
            g, x, codes, zeros, gs,
            m, n, k, ng, g.stride(0), g.stride(1), x.stride(0), x.stride(1), gs.stride(0), glen,
            BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_M=cfg.block_m, SPLIT_M=split, DOT_DTYPE=dot_dt,
            PRECISION=precision(dot_dt), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return gs.sum(0) if split > 1 else gs[0]

    if config is None:
        if g.device.type == "cpu":
            config = INTERPRETER_GRAD_SCALE
        else:
            cands = GRAD_SCALE_CONFIGS_FP32 if g.dtype == torch.float32 else GRAD_SCALE_CONFIGS
            config = pick(("int_gs", tune_m(m), n, k, g.dtype, bits, group_len), cands, run)
    return run(config)


# ----------------------------------------------------------------------------------------------
# Compile specs (kernels/_compile.py, `python -m lowbit._aot`, `python -m lowbit.kernels.cost`)
# ----------------------------------------------------------------------------------------------

def _group_variants(k: int, bk: int) -> list[tuple[str, int]]:
    # rows; groups of 128 (tile inside a group when bk divides 128); groups of 32 (per 32-chunk
    # scales when bk > 32; with bk = 32 it compiles the same path as g128)
    out = [("rows", k), ("g128", 128)]
    return out + ([("g32", 32)] if bk > 32 else [])


def aot_specs() -> list:
    """Every forward/grad_x/grad_scale config, launched by its launcher on meta tensors (N = K =
    4096, the largest M its buckets serve, capped at 4096) so that the compile tier builds what
    the JIT builds: bf16 rows for each bit width; int3 also with groups; fp16 and fp32 rows for
    the first config of each table."""
    n = k = 4096

    def weights(bits: int, group_len: int):  # codes, scale, zeros
        ng = n_groups(k, group_len)
        return meta(n, k // 32, bits, dtype=torch.int32), meta(n, ng), meta(n, ng, dtype=torch.uint8)

    def variants(first: bool, bits: int, bk: int):  # (dtype, group name, group_len)
        groups = _group_variants(k, bk) if bits == 3 else [("rows", k)]
        other_dts = [torch.float16, torch.float32] if first and bits == 3 else []
        return [(torch.bfloat16, gname, glen) for gname, glen in groups] + [(dt, "rows", k) for dt in other_dts]

    def cost(kernel: str, bits: int, m_bucket: int, cfg, weights_per_iter: int) -> dict:
        return {"kernel": kernel, "format": f"int{bits}", "m_bucket": m_bucket, "config": cfg,
                "weights_per_iter": weights_per_iter, "bytes_per_weight": bits / 8 + 5 / k}  # + fp32 scale, u8 zero

    specs = []
    for i, (cfg, m_bucket) in enumerate(buckets(FORWARD_CONFIGS).items()):
        m = min(m_bucket, 4096)
        for bits in (2, 3, 4):
            bk = words_step(bits) if cfg.kind == "words" else cfg.block_k
            for dt, gname, glen in variants(i == 0, bits, bk):
                if cfg.kind == "words" and not _fits_forward(cfg, m, k, bits, glen, dt):
                    continue  # the launcher never runs it (e.g. fp32 x, groups smaller than a step)
                codes, scale, zeros = weights(bits, glen)
                x, bias = meta(m, k, dtype=dt), meta(n, dtype=dt)
                name = _forward_spec_name(cfg, bits, dt, gname)
                c = (cost(f"int.{cfg.kind}", bits, m_bucket, cfg, cfg.block_n * bk)
                     if (dt, gname) == (torch.bfloat16, "rows") else None)
                specs.append(launch_spec(name, lambda: matmul_int(x, codes, scale, zeros, bits, glen, n, bias,
                                                                  config=cfg), c))
    for i, (cfg, m_bucket) in enumerate(buckets(GRAD_X_CONFIGS).items()):
        m = min(m_bucket, 4096)
        for bits in (2, 3, 4):
            for dt, gname, glen in variants(i == 0, bits, cfg.block_k):
                codes, scale, zeros = weights(bits, glen)
                g = meta(m, n, dtype=dt)
                name = (f"grad_x_int{bits}[{SIG_DT[dt]},{gname},{cfg.block_m}x{cfg.block_k}x{cfg.block_n},"
                        f"split={cfg.split_n},w={cfg.num_warps},s={cfg.num_stages}]")
                c = (cost("int.grad_x", bits, m_bucket, cfg, cfg.block_n * cfg.block_k)
                     if (dt, gname) == (torch.bfloat16, "rows") else None)
                specs.append(launch_spec(name, lambda: matmul_int_grad_x(g, codes, scale, zeros, bits, glen, k,
                                                                         config=cfg), c))
    # grad_scale: a training-step shape, M = 4096 tokens; its loop computes g^T x tiles and streams
    # no weights, so the cost report shows its loop but no per-weight figures.
    gs = [(cfg, bits, dt) for i, cfg in enumerate(GRAD_SCALE_CONFIGS) for bits in (2, 3, 4)
          for dt in [torch.bfloat16] + ([torch.float16] if i == 0 and bits == 3 else [])]
    gs += [(cfg, 3, torch.float32) for cfg in GRAD_SCALE_CONFIGS_FP32]
    for cfg, bits, dt in gs:
        codes, _, zeros = weights(bits, k)
        g, x = meta(4096, n, dtype=dt), meta(4096, k, dtype=dt)
        name = (f"grad_scale_int{bits}[{SIG_DT[dt]},{cfg.block_n}x{cfg.block_k}x{cfg.block_m},"
                f"w={cfg.num_warps},s={cfg.num_stages}]")
        c = cost("int.grad_scale", bits, 1 << 30, cfg, 0) if dt != torch.float16 else None
        specs.append(launch_spec(name, lambda: matmul_int_grad_scale(g, x, codes, zeros, bits, k, config=cfg), c))
    return specs


def _forward_spec_name(cfg: MatmulConfig, bits: int, dt: torch.dtype, gname: str) -> str:
    bk = words_step(bits) if cfg.kind == "words" else cfg.block_k
    return (f"{cfg.kind}_int{bits}[{SIG_DT[dt]},{gname},{cfg.block_m}x{cfg.block_n}x{bk},"
            f"split={cfg.split_k},w={cfg.num_warps},s={cfg.num_stages}]")


# Static goals checked by tests/test_cost.py on the cost report (python -m lowbit.kernels.cost):
# the M=1 default (the "words" GEMV, bf16, per-row scales) of each width within the SASS
# instruction budget per weight on sm_90 (int2 4.0, int3 5.5, int4 6.0), its codes read by 128-bit
# loads with every code bit loaded once, no barrier, no shuffle, no spill.
COST_BUDGETS = [
    CostBudget(_forward_spec_name(FORWARD_CONFIGS[1][0], bits, torch.bfloat16, "rows"), max_instr_per_weight=budget,
               code_load_bits=128, code_bits_per_weight=bits)
    for bits, budget in ((2, 4.0), (3, 5.5), (4, 6.0))
]

# Pointer arguments whose offsets grow with M (activation rows) or with N * K (weight bytes), by
# spec-name prefix: tests/test_compile_tier.py checks that each gets a 64-bit tensor offset.
INT64_POINTERS = {
    "gemv_int": ("x_ptr", "codes_ptr", "y_ptr"), "dot_int": ("x_ptr", "codes_ptr", "y_ptr"),
    "grad_x_int": ("g_ptr", "codes_ptr", "gx_ptr"), "grad_scale_int": ("g_ptr", "x_ptr", "codes_ptr"),
}
