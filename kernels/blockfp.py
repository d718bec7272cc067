"""Triton kernels of the block floating-point family (MXFP4, NVFP4): the fused dequant-matmuls
(decode GEMV, forward GEMM, grad_x GEMM) and the dequantize kernel the DEQUANT path uses.

One file per family (the house plan), read top to bottom: device helpers, kernels, configs,
launchers, compile specs and cost goals. kernels/nf4.py is the model; what differs is the decode.
It is a little over 500 lines because the three matmul kernels share the decode helpers above
them and the config tables carry the cost-report figures that chose them.

Byte layout (lowbit.formats.blockfp documents it): W [N, K], K % B == 0, B = SCALE_BLOCK = 32
(mxfp4) or 16 (nvfp4).

  packed       uint8 [N, K/2]  byte j of row n = code[n, 2j] | code[n, 2j+1] << 4: element 2j in
                               the LOW nibble (nf4 is the other way round)
  scales       uint8 [N, K/B]  one scale byte per block of B consecutive elements of a row
  scale_table  fp32 [256]      the fp32 factor of each scale byte (E8M0 2^(b-127), or E4M3(b) /
                               global scale for nvfp4: the division is already in the table)

  W[n, k] = E2M1[code[n, k]] * scale_table[scales[n, k // B]]

with E2M1 = (0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6). One definition for both
quant types: the kernels only see B as a constexpr and one table lookup per block.

Kernels
  words    y = x @ W^T for M <= 4 (the decode path), no tensor cores: int32 words of 8 codes read
           128 bits at a time, each code decoded by a gather from a 16-entry fp32 table in L1,
           multiplied by x in fp32 registers; the block scale multiplies each block's partial sum
           once (a 32-code tile is one mxfp4 block or two nvfp4 blocks). Split-K is reduced inside
           the launch (kernels/_common.py's words workspace): one launch, deterministic.
  dot      y = x @ W^T, tl.dot tiles in grouped order, split-K partials reduced by the launcher.
           A W tile is loaded as [rows, blocks, bytes] so that each block's factor is read once per
           row, decoded from its bits (no table), scaled in fp32 and rounded to the dot dtype.
  grad_x   gx = g @ W, the same tile decode, W rows as the reduction.
  dequant  (config kind) W decoded once into the activation dtype by `dequantize_blockfp_kernel`,
           then torch (cuBLAS): a candidate the tuner times; the only path for K not a multiple of
           32 (nvfp4 K = 16 * odd: a dot tile needs 16 columns of each parity).

The tiled kernels split a tile by column parity instead of interleaving nibbles back into W's
column order: x @ W^T = x_even @ lo^T + x_odd @ hi^T (lo = low nibbles = even columns), as nf4.
They and DEQUANT round the scaled weight to the activation dtype (tf32 for fp32 on a GPU): a
weight beyond fp16's range needs bf16/fp32 activations there; the words GEMV keeps fp32.
Offsets that grow with M (activation rows) or N * K (weight bytes, scale bytes) are int64.
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

# The E2M1 value of each 4-bit code (lowbit.formats.blockfp.E2M1_VALUES; kernels/ imports nothing
# from lowbit). The words GEMV gathers from it; the tiled kernels decode the same values from bits.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS = {"mxfp4": 32, "nvfp4": 16}

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _e2m1(c):
    """fp32 value of E2M1 codes c (int32, 0..15) from the bits, exactly: codes with a non-zero
    exponent (magnitude 2..7 = 1 .. 6) are normal numbers whose exponent and mantissa bits, moved
    to fp32's fields, need the bias 1 -> 127 ((c & 7) << 22 plus 126 << 23); magnitudes 0 and 1 are
    E2M1's subnormals 0 and 0.5 (0.5 = 126 << 23). Bit 3 is the sign (code 8 is -0.0)."""
    mag = c & 7
    bits = tl.where(mag >= 2, (mag << 22) + (126 << 23), (mag & 1) * (126 << 23))
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _block_scale(byte_ptr, scale_table_ptr, mask):
    """fp32 factor of the scale bytes at byte_ptr (masked lanes read byte 0, whose factor is finite)."""
    byte = tl.load(byte_ptr, mask=mask, other=0)
    return tl.load(scale_table_ptr + byte.to(tl.int32))


@triton.jit
def _dequant_halves(codes_ptr, scales_ptr, scale_table_ptr, rows, row_mask, col_start, K, stride_wn,
                    COLS: tl.constexpr, SCALE_BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(even columns, odd columns) of W[rows, col_start : col_start + COLS], scaled, in DOT_DTYPE,
    [R, COLS/2] each. The bytes are loaded as [R, NB, CB/2]: NB blocks of CB = min(COLS, B) columns,
    so that each block's factor is loaded once per row ([R, NB, 1]) and broadcast over its bytes,
    not gathered per column pair; merging the last two dimensions gives the pair index."""
    R: tl.constexpr = rows.shape[0]
    CB: tl.constexpr = min(COLS, SCALE_BLOCK)
    NB: tl.constexpr = COLS // CB
    r64 = rows.to(tl.int64)[:, None, None]
    blk = tl.arange(0, NB)[None, :, None]
    mask = row_mask[:, None, None]
    byte = tl.load(codes_ptr + r64 * stride_wn + (col_start // 2 + blk * (CB // 2) + tl.arange(0, CB // 2)[None, None, :]),
                   mask=mask, other=0).to(tl.int32)
    s = _block_scale(scales_ptr + r64 * (K // SCALE_BLOCK) + (col_start // SCALE_BLOCK + blk), scale_table_ptr, mask)
    lo = tl.reshape(_e2m1(byte & 0xF) * s, (R, COLS // 2))
    hi = tl.reshape(_e2m1(byte >> 4) * s, (R, COLS // 2))
    return lo.to(DOT_DTYPE), hi.to(DOT_DTYPE)


@triton.jit
def _add_halves(acc, p, first, s0, s1):
    acc += tl.sum(tl.where(first, p, -0.0), axis=1, keep_dims=True) * s0  # one FFMA each
    acc += tl.sum(tl.where(first, -0.0, p), axis=1, keep_dims=True) * s1
    return acc


@triton.jit
def _accumulate_halves(acc0, acc1, acc2, acc3, p0, p1, p2, p3, first, s0, s1, M: tl.constexpr):
    """acc_m += (words 0, 1 of p_m) * s0 + (words 2, 3) * s1: a 32-code tile holds two 16-code
    blocks. `first` is a constant per register (the words of a row sit in one thread), so the
    selects fold away and -0.0 (x + -0.0 == x) drops the other half from each sum."""
    acc0 = _add_halves(acc0, p0, first, s0, s1)
    if M > 1:
        acc1 = _add_halves(acc1, p1, first, s0, s1)
    if M > 2:
        acc2 = _add_halves(acc2, p2, first, s0, s1)
    if M > 3:
        acc3 = _add_halves(acc3, p3, first, s0, s1)
    return acc0, acc1, acc2, acc3


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def gemv_blockfp_words_kernel(
    x_ptr, words_ptr, scales_ptr, scale_table_ptr, code_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    N, K, stride_wn,
    SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PAIRS: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W^T (+ bias) for M <= 4, one launch, no tensor cores (nf4's words GEMV,
    whose docstring explains the loop shape: whole rows per thread, no shuffle, no barrier).

    A step of BLOCK_K codes is BLOCK_K / 32 tiles of [BLOCK_N, 4] int32 words (one 128-bit load per
    row and tile). Word c of tile t holds elements k0 + 32 t + 8 c + (0 .. 7), element j at bit 4 j
    (low nibble first). A tile is one mxfp4 block, or two nvfp4 blocks (words 0-1, words 2-3): its
    per-word partials p [BLOCK_N, 4] are summed per block and each sum multiplied by its block's
    factor, once per block and row instead of once per weight.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N)[:, None]
    WORDS: tl.constexpr = 4
    cols = tl.arange(0, WORDS)[None, :]
    rows64 = offs_n.to(tl.int64)[:, None]
    srow = rows64 * (K // SCALE_BLOCK)
    table_base = code_ptr.to(tl.int64, bitcast=True)
    k_len = K // SPLIT_K
    acc0 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for kk in range(0, k_len, BLOCK_K):
        k0 = pid_k * k_len + kk  # a multiple of 32: tile t starts at word k0 / 8 + 4 t, block k0 / B + 32 t / B
        wrow = words_ptr + rows64 * stride_wn + tl.multiple_of(k0 // 8, WORDS)
        srow_k = scales_ptr + srow + k0 // SCALE_BLOCK
        for t in tl.static_range(BLOCK_K // 32):
            w = tl.load(wrow + (4 * t + cols), mask=n_mask, other=0, eviction_policy="evict_first")
            p0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            p1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            p2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            p3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            for pair in tl.static_range(4):  # byte `pair`: element 2 pair (low nibble), then 2 pair + 1
                v0 = table_value(w, table_base, 8 * pair)
                v1 = table_value(w, table_base, 8 * pair + 4)
                kp = k0 // 2 + 16 * t + 4 * cols + pair  # pair index, [1, WORDS]: in the tile's layout
                p0, p1, p2, p3 = fma_x_pair(p0, p1, p2, p3, v0, v1, x_ptr, kp, K, M, PAIRS)
            if SCALE_BLOCK >= 32:
                s = _block_scale(srow_k + t, scale_table_ptr, n_mask)
                acc0, acc1, acc2, acc3 = words_accumulate(acc0, acc1, acc2, acc3, p0, p1, p2, p3, s, M)
            else:
                s0 = _block_scale(srow_k + 2 * t, scale_table_ptr, n_mask)
                s1 = _block_scale(srow_k + 2 * t + 1, scale_table_ptr, n_mask)
                acc0, acc1, acc2, acc3 = _accumulate_halves(acc0, acc1, acc2, acc3, p0, p1, p2, p3,
                                                            cols < 2, s0, s1, M)
    words_epilogue(y_ptr, ws_ptr, count_ptr, bias_ptr, acc0, acc1, acc2, acc3, pid_n, pid_k, offs_n, n_mask, N,
                   M, HAS_BIAS, SPLIT_K)


@triton.jit
def matmul_blockfp_kernel(
    x_ptr, codes_ptr, scales_ptr, scale_table_ptr, bias_ptr, y_ptr,
    M, N, K, stride_wn,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y = x @ W^T: [BLOCK_M, BLOCK_N] tiles in grouped order, split K of SPLIT_K writing fp32 partials."""
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
        we, wo = _dequant_halves(codes_ptr, scales_ptr, scale_table_ptr, offs_n, n_mask, k0, K, stride_wn,
                                 BLOCK_K, SCALE_BLOCK, DOT_DTYPE)
        acc = tl.dot(xe, tl.trans(we), acc, input_precision=PRECISION)
        acc = tl.dot(xo, tl.trans(wo), acc, input_precision=PRECISION)
    store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def matmul_blockfp_grad_x_kernel(
    g_ptr, codes_ptr, scales_ptr, scale_table_ptr, gx_ptr,
    M, N, K, stride_wn,
    stride_gm, stride_gn, stride_s, stride_om, stride_ok,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """gx = g @ W: [BLOCK_M, BLOCK_K] output tiles, the N reduction split over SPLIT_N programs."""
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
        we, wo = _dequant_halves(codes_ptr, scales_ptr, scale_table_ptr, offs_n, n_mask, k0, K, stride_wn,
                                 BLOCK_K, SCALE_BLOCK, DOT_DTYPE)
        acc_e = tl.dot(g, we, acc_e, input_precision=PRECISION)
        acc_o = tl.dot(g, wo, acc_o, input_precision=PRECISION)
    acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_K))  # even and odd columns back in order
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = gx_ptr + pid_s.to(tl.int64) * stride_s + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def dequantize_blockfp_kernel(packed_ptr, scales_ptr, scale_table_ptr, out_ptr, numel,
                              SCALE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """W flattened: element i is nibble i % 2 (low first) of byte i // 2, its block i // B (K % B == 0:
    blocks never straddle rows). One rounding (code value * factor in fp32), as the reference."""
    pid = tl.program_id(0).to(tl.int64)
    boffs = pid * (TILE // 2) + tl.arange(0, TILE // 2)
    byte = tl.load(packed_ptr + boffs, mask=boffs < numel // 2, other=0).to(tl.int32)
    code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (TILE,))
    offs = pid * TILE + tl.arange(0, TILE)
    mask = offs < numel
    v = _e2m1(code) * _block_scale(scales_ptr + offs // SCALE_BLOCK, scale_table_ptr, mask)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

C = MatmulConfig
G = GradXConfig
# Forward configs by M bucket (the largest M each serves); the first fitting entry is the default,
# LOWBIT_AUTOTUNE=1 times them all and DEQUANT. None timed on a GPU yet: the shapes are nf4's,
# whose kernels these mirror (benchmarks/results/2026-11-26-h100-sweep.log), and the instruction
# counts are the cost report's (python -m lowbit.kernels.cost --filter blockfp).
FORWARD_CONFIGS: dict[int, list[MatmulConfig]] = {
    # "words": the default runs 8 rows per thread (1 warp of 256 rows) and 64-code steps: 5.9 SASS
    # instructions per weight for nvfp4 on sm_90, against 6.1 at 4 rows per thread (2 warps of 256,
    # nf4's default shape), where the x loads and bf16 conversions (~0.5 per weight at 4 rows) and each
    # block's scale lookups are shared by half as many weights (cost report, 2026-11-27); 204
    # registers, no spill. Split 4 serves K = 11008; the 32-code steps serve K that 64 * split does
    # not divide; 32 rows per warp put more warps in flight at small N.
    1: [C("words", 1, 256, 64, 16, 1, 1), C("words", 1, 256, 64, 16, 2, 1), C("words", 1, 256, 64, 4, 1, 1),
        C("words", 1, 128, 32, 16, 1, 1), C("words", 1, 128, 32, 8, 1, 1), C("words", 1, 32, 32, 16, 1, 1)],
    # M = 2..4: the words GEMV spends 12.5 instructions per weight at M = 4 (3.1 per multiply-add),
    # the first dot config 14 (cost report): words first, the dot the tuner's alternative.
    4: [C("words", 4, 64, 64, 8, 1, 1), C("dot", 16, 64, 64, 2, 4, 3)],
    # Dot tiles: nf4's shapes shrunk until sm_80 keeps them in registers (the decode from bits and
    # the [rows, blocks, bytes] tile hold more live values than nf4's table gather): 16x128x64,
    # 64x128x64 and the 128-row grad_x tiles spill 4-100 B on sm_80 (cost report, 2026-11-27).
    16: [C("dot", 16, 64, 64, 2, 4, 3), C("dot", 16, 128, 32, 2, 4, 3)],
    64: [C("dot", 64, 64, 64, 1, 4, 3), C("dot", 32, 128, 32, 2, 4, 3)],
    1 << 30: [C("dot", 128, 128, 32, 1, 8, 3), C("dot", 64, 128, 32, 1, 4, 3)],
}
GRAD_X_CONFIGS: dict[int, list[GradXConfig]] = {
    16: [G(16, 64, 64, 4, 4, 3), G(16, 32, 128, 2, 4, 3)],
    1 << 30: [G(64, 64, 64, 1, 4, 3), G(128, 32, 64, 1, 8, 3)],
}
# Small tiles for the interpreter. Together: words at M = 1 (one tile per step) and M <= 4 (two
# tiles per step), both split; dot with a 32-column tile (one mxfp4 block, two nvfp4 blocks) split
# in two, and with a 64-column tile (two and four blocks); grad_x with both tile widths, split over
# N or not. The first fitting words (M <= 4) or dot config is the default on CPU.
INTERPRETER_FORWARD = [C("words", 1, 32, 32, 2, 1, 1), C("words", 4, 16, 64, 2, 1, 1), C("dot", 16, 32, 32, 2, 4, 1),
                       C("dot", 32, 16, 64, 1, 4, 1)]
INTERPRETER_GRAD_X = [G(16, 32, 32, 2, 4, 1), G(32, 64, 16, 1, 4, 1)]


def _fits_forward(cfg: MatmulConfig, m: int, k: int, block: int = 16) -> bool:
    """Whether `cfg` serves M rows and K columns: K a multiple of the split's steps; words for
    M <= block_m with whole 32-code tiles; dot with tiles of >= 16 columns of each parity."""
    if cfg.kind == "dequant" or k % (cfg.block_k * cfg.split_k) or k % block:
        return False
    if cfg.kind == "words":
        return m <= cfg.block_m and cfg.block_k % 32 == 0
    return cfg.block_k >= 32


def _fits_grad_x(cfg: GradXConfig, k: int) -> bool:
    return k % cfg.block_k == 0 and cfg.block_k >= 32


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_CODE_TABLES: dict[torch.device, torch.Tensor] = {}


def _code_table(device: torch.device) -> torch.Tensor:
    """E2M1_VALUES on `device`, 64-byte aligned (the words GEMV ORs offsets into its address)."""
    if device not in _CODE_TABLES:
        buf = torch.zeros(32, dtype=torch.float32, device=device)
        start = (-buf.data_ptr() % 64) // 4
        table = buf[start:start + 16]
        table.copy_(torch.tensor(E2M1_VALUES, dtype=torch.float32))
        _CODE_TABLES[device] = table
    return _CODE_TABLES[device]


def dequantize_blockfp(packed, scales, scale_table, block: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W [n, k] in `dtype`, bit for bit lowbit.formats.blockfp.dequantize_blockfp (one launch)."""
    numel = n * k
    store_dtype = torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype
    out = alloc_output((n, k), store_dtype, packed.device)
    tile = 1024
    count_launch("blockfp.dequantize")
    dequantize_blockfp_kernel[(triton.cdiv(numel, tile),)](packed, scales, scale_table.contiguous(), out, numel,
                                                            SCALE_BLOCK=block, TILE=tile, num_warps=4)
    return out.to(dtype)


def matmul_blockfp(x, packed, scales, scale_table, block, n, bias, config: MatmulConfig | None = None):
    """y[M, n] = x[M, K] @ W^T (+ bias) in x's dtype. x: 2-D contiguous fp16/bf16/fp32, K % block == 0;
    packed uint8 [n, K/2], scales uint8 [n, K/block], scale_table fp32 [256]; bias None or [n]."""
    m, k = x.shape
    x_in, out_dtype = x, x.dtype
    x = cpu_operand(x)
    dot_dt = dot_dtype(x.dtype, x.device)
    scale_table = scale_table.contiguous()

    def run(cfg: MatmulConfig):
        if cfg.kind == "dequant":
            w = dequantize_blockfp(packed, scales, scale_table, block, n, k, x.dtype)
            return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype)).to(out_dtype)
        if cfg.kind == "words":  # integer work on x only: bf16 x stays bf16 under the interpreter too
            return words_gemv("blockfp", gemv_blockfp_words_kernel, x_in.contiguous(),
                              (words_codes(packed), scales, scale_table, _code_table(x.device)), (n, k, k // 8), n,
                              bias, cfg, out_dtype, SCALE_BLOCK=block, BLOCK_K=cfg.block_k)
        return tiled_matmul("blockfp", matmul_blockfp_kernel, matmul_blockfp_kernel, x, (packed, scales, scale_table),
                            k // 2, n, bias, cfg, out_dtype, dot_dt, SCALE_BLOCK=block)

    if config is not None and config.kind != "dequant" and not _fits_forward(config, m, k, block):
        raise ValueError(f"config {config} does not serve M={m}, K={k}, block={block} "
                         "(an explicit config must fit the call: see _fits_forward)")
    if config is None:
        if x.device.type == "cpu":
            cands = [c for c in INTERPRETER_FORWARD if _fits_forward(c, m, k, block) and (c.kind == "words") == (m <= 4)]
            config = cands[0] if cands else DEQUANT
        else:
            cands = [c for c in FORWARD_CONFIGS[bucket(FORWARD_CONFIGS, m)] if _fits_forward(c, m, k, block)]
            if not cands and k % 32 == 0:
                cands = [C("dot", 16 if m <= 16 else 64, 64, 32, 1, 4, 3)]
            config = pick(("bfp_fwd", tune_m(m), n, k, x.dtype, block), with_dequant(cands, m), run)
    return run(config)


def matmul_blockfp_grad_x(g, packed, scales, scale_table, block, k, config: GradXConfig | MatmulConfig | None = None):
    """gx[M, k] = g[M, N] @ W in g's dtype. g: 2-D fp16/bf16/fp32."""
    m, n = g.shape
    out_dtype = g.dtype
    g = cpu_operand(g)
    dot_dt = dot_dtype(g.dtype, g.device)
    scale_table = scale_table.contiguous()

    def run(cfg):
        if cfg == DEQUANT:
            return (g @ dequantize_blockfp(packed, scales, scale_table, block, n, k, g.dtype)).to(out_dtype)
        return grad_x_matmul("blockfp", matmul_blockfp_grad_x_kernel, g, (packed, scales, scale_table), k // 2, k, cfg,
                             out_dtype, dot_dt, SCALE_BLOCK=block)

    if config is not None and config != DEQUANT and not _fits_grad_x(config, k):
        raise ValueError(f"config {config} does not serve K={k} (see _fits_grad_x)")
    if config is None:
        if g.device.type == "cpu":
            config = next((c for c in INTERPRETER_GRAD_X if _fits_grad_x(c, k)), DEQUANT)
        else:
            cands = [c for c in GRAD_X_CONFIGS[bucket(GRAD_X_CONFIGS, m)] if _fits_grad_x(c, k)]
            if not cands and k % 32 == 0:
                cands = [G(64, 32, 64, 1, 4, 3)]
            cands.append(DEQUANT)
            config = pick(("bfp_gx", tune_m(m), n, k, g.dtype, block), cands, run)
    return run(config)


# ----------------------------------------------------------------------------------------------
# Compile specs (kernels/_compile.py, `python -m lowbit._aot`, `python -m lowbit.kernels.cost`)
# ----------------------------------------------------------------------------------------------

_ROLES = {"scales_ptr": "scales", "scale_table_ptr": "scales"}  # for the cost report


def _bytes_per_weight(block: int) -> float:
    return 0.5 + 1 / block  # 4-bit codes and one scale byte per block (nvfp4's global scale: nothing)


def _forward_spec_name(cfg: MatmulConfig, dt: torch.dtype, quant_type: str) -> str:
    return (f"{cfg.kind}_blockfp[{SIG_DT[dt]},{quant_type},{cfg.block_m}x{cfg.block_n}x{cfg.block_k},"
            f"split={cfg.split_k},w={cfg.num_warps},s={cfg.num_stages}]")


def aot_specs() -> list:
    """Every config of the tables launched by its launcher on meta tensors (N = K = 4096, the
    largest M its buckets serve, capped at 4096): bf16 nvfp4 for each config (with a cost record);
    mxfp4 too for every words config (the decode path, budgeted for both); fp16, fp32 and mxfp4
    for the first dot config and the first grad_x config; the dequantize kernel."""
    n = k = 4096
    table = meta(256)

    def weights(qt):  # packed, scales
        return meta(n, k // 2, dtype=torch.uint8), meta(n, k // BLOCKS[qt], dtype=torch.uint8)

    specs = []
    first_dot = True
    for cfg, m_bucket in buckets(FORWARD_CONFIGS).items():
        variants = [(torch.bfloat16, "nvfp4")]
        if cfg.kind == "words":
            variants.append((torch.bfloat16, "mxfp4"))
            if cfg == FORWARD_CONFIGS[1][0]:
                variants += [(torch.float16, "nvfp4"), (torch.float32, "nvfp4")]
        elif first_dot:
            variants += [(torch.float16, "nvfp4"), (torch.float32, "nvfp4"), (torch.bfloat16, "mxfp4")]
            first_dot = False
        for dt, qt in variants:
            packed, scales = weights(qt)
            x, bias = meta(min(m_bucket, 4096), k, dtype=dt), meta(n, dtype=dt)
            cost = None
            if dt == torch.bfloat16:
                cost = {"kernel": f"blockfp.{cfg.kind}", "format": qt, "m_bucket": m_bucket, "config": cfg,
                        "weights_per_iter": cfg.block_n * cfg.block_k, "bytes_per_weight": _bytes_per_weight(BLOCKS[qt]),
                        "roles": _ROLES}
            specs.append(launch_spec(_forward_spec_name(cfg, dt, qt), lambda: matmul_blockfp(
                x, packed, scales, table, BLOCKS[qt], n, bias, config=cfg), cost))
    for i, (cfg, m_bucket) in enumerate(buckets(GRAD_X_CONFIGS).items()):
        variants = [(torch.bfloat16, "nvfp4")]
        if i == 0:
            variants += [(torch.float16, "nvfp4"), (torch.float32, "nvfp4"), (torch.bfloat16, "mxfp4")]
        for dt, qt in variants:
            packed, scales = weights(qt)
            g = meta(min(m_bucket, 4096), n, dtype=dt)
            name = (f"grad_x_blockfp[{SIG_DT[dt]},{qt},{cfg.block_m}x{cfg.block_k}x{cfg.block_n},"
                    f"split={cfg.split_n},w={cfg.num_warps},s={cfg.num_stages}]")
            cost = None
            if dt == torch.bfloat16:
                cost = {"kernel": "blockfp.grad_x", "format": qt, "m_bucket": m_bucket, "config": cfg,
                        "weights_per_iter": cfg.block_n * cfg.block_k, "bytes_per_weight": _bytes_per_weight(BLOCKS[qt]),
                        "roles": _ROLES}
            specs.append(launch_spec(name, lambda: matmul_blockfp_grad_x(g, packed, scales, table, BLOCKS[qt], k,
                                                                         config=cfg), cost))
    for dt, qt in ((torch.bfloat16, "nvfp4"), (torch.bfloat16, "mxfp4"), (torch.float16, "nvfp4"),
                   (torch.float32, "nvfp4")):
        packed, scales = weights(qt)
        specs.append(launch_spec(f"dequantize_blockfp[{SIG_DT[dt]},{qt}]",
                                 lambda: dequantize_blockfp(packed, scales, table, BLOCKS[qt], n, k, dt)))
    return specs


# Static goals checked by tests/test_cost.py on the cost report: the M = 1 default (the words GEMV,
# bf16 activations) for both quant types at <= 6.0 SASS instructions per weight on sm_90 (nf4's
# words GEMV: 5.84), one 128-bit load per 32 codes (each code bit loaded once), no barrier, no
# shuffle, no spill.
COST_BUDGETS = [
    CostBudget(_forward_spec_name(FORWARD_CONFIGS[1][0], torch.bfloat16, qt), max_instr_per_weight=6.0,
               code_load_bits=128, code_bits_per_weight=4)
    for qt in ("nvfp4", "mxfp4")
]

# Pointer arguments whose offsets grow with M (activation rows) or with N * K (code and scale
# bytes), by spec-name prefix: tests/test_compile_tier.py checks that each gets a 64-bit offset.
INT64_POINTERS = {
    "words_blockfp": ("words_ptr", "scales_ptr"),
    "dot_blockfp": ("x_ptr", "codes_ptr", "scales_ptr", "y_ptr"),
    "grad_x_blockfp": ("g_ptr", "codes_ptr", "scales_ptr", "gx_ptr"),
    "dequantize_blockfp": ("packed_ptr", "scales_ptr", "out_ptr"),
}
