"""Triton kernels for lowbit.formats.sz streams (version 2): decode to fp32/fp16/bf16.

The stream (formats/sz.py): chunks of `chunk` elements, each coded by LANES interleaved lanes
(lane j of a chunk codes its elements j, j + LANES, j + 2 LANES, ...), canonical Huffman code
words of <= MAX_LEN bits written LSB first into u32 words, lane after lane. `lane_ptr` holds the
bit offset where every lane starts (the prefix sum of the lane lengths).

One GPU thread per lane, BLOCK lanes per program:

    buf = the 64 bits at the lane's start; nb = how many of them are the lane's
    for i in range(0, steps, 2):          # two symbols per refill: after one nb >= 32 >= 2 * 12
        for each of the two symbols:
            e = table[buf & (2**MAX_LEN - 1)]       # symbol << 4 | code length (8 KiB, L1)
            out[chunk start + j + i * LANES] = float32(symbol - radius) * step   (in out's dtype)
            buf >>= e & 15; nb -= e & 15
        if nb < 32: buf |= next word << nb; nb += 32

Neighbouring threads are neighbouring lanes of a chunk, so at every step a warp stores contiguous
elements. Outliers are scattered afterwards by the launcher with torch (`out[idx] = values`),
exactly as the reference decoder does, so every path is bit-identical to
`lowbit.formats.sz.decode_reference`.

Launchers take tensors on CUDA, or on CPU under TRITON_INTERPRET=1 (then bf16 is produced in
fp32 and rounded by torch, because the interpreter truncates fp32->bf16 casts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import alloc_output, count_launch, interpreting
from ._spec import launch_spec, meta

BLOCK = 64  # lanes (threads) per program
NUM_WARPS = BLOCK // 32


@triton.jit
def _next_symbol(buf, nb, table_ptr, radius, step, MAX_LEN: tl.constexpr):
    """(value, buf, nb) after decoding one code word from the low bits of buf."""
    e = tl.load(table_ptr + (buf & ((1 << MAX_LEN) - 1)).to(tl.int32)).to(tl.int32)
    ln = e & 15
    v = ((e >> 4) - radius).to(tl.float32) * step
    return v, buf >> ln.to(tl.uint64), nb - ln


@triton.jit
def _open_lane(payload_ptr, start, live, n_words):
    """A lane's bit reader at bit `start`: (64-bit buffer, valid bits in it, next u32 word to read).
    Words past the payload read as zeros."""
    wi = start >> 5
    sh = (start & 31).to(tl.uint64)
    w0 = tl.load(payload_ptr + wi, mask=live & (wi < n_words), other=0).to(tl.uint32).to(tl.uint64)
    w1 = tl.load(payload_ptr + wi + 1, mask=live & (wi + 1 < n_words), other=0).to(tl.uint32).to(tl.uint64)
    return (w0 | (w1 << 32)) >> sh, 64 - sh.to(tl.int32), wi + 2


@triton.jit
def sz_decode_kernel(
    payload_ptr,  # int32 words: the LSB-first bit stream
    lane_ptr,  # int32 (int64 past 2**31 bits) [n_lanes + 1]: bit offset of every lane
    table_ptr,  # int16 [2**MAX_LEN]: symbol << 4 | code length
    step_ptr,  # fp32 [1]
    out_ptr,  # [numel] fp32 / fp16 / bf16
    numel,
    n_lanes,
    n_words,
    radius,
    chunk,  # elements per chunk
    steps,  # symbols per lane (chunk // LANES)
    err_ptr,  # int32 [1]: CHECK adds the number of lanes that do not end at their recorded length
    LANES: tl.constexpr,  # lanes per chunk
    MAX_LEN: tl.constexpr,
    BLOCK: tl.constexpr,
    CHECK: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_lanes
    start = tl.load(lane_ptr + lane, mask=live, other=0).to(tl.int64)
    endp = start  # CHECK: the bit position after the lane's last symbol (bit position = wi * 32 - nb)
    c0 = (lane // LANES).to(tl.int64) * chunk  # first element of the lane's chunk
    j = lane % LANES
    count = (tl.minimum(numel - c0, chunk) - j + (LANES - 1)) // LANES  # this lane's symbols
    count = tl.where(live, count, 0).to(tl.int32)
    ptrs = out_ptr + c0 + j
    step = tl.load(step_ptr)
    buf, nb, wi = _open_lane(payload_ptr, start, live, n_words)
    for i in range(0, steps, 2):
        v, buf, nb = _next_symbol(buf, nb, table_ptr, radius, step, MAX_LEN)
        tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=i < count)
        if CHECK:
            endp = tl.where(i + 1 == count, wi * 32 - nb, endp)
        v, buf, nb = _next_symbol(buf, nb, table_ptr, radius, step, MAX_LEN)
        tl.store(ptrs + LANES, v.to(out_ptr.dtype.element_ty), mask=i + 1 < count)
        if CHECK:
            endp = tl.where(i + 2 == count, wi * 32 - nb, endp)
        ptrs += 2 * LANES
        need = nb < 32
        w = tl.load(payload_ptr + wi, mask=need & (wi < n_words), other=0).to(tl.uint32).to(tl.uint64)
        buf = buf | (w << nb.to(tl.uint64))
        nb = tl.where(need, nb + 32, nb)
        wi = tl.where(need, wi + 1, wi)
    if CHECK:
        end = tl.load(lane_ptr + lane + 1, mask=live, other=0).to(tl.int64)
        tl.atomic_add(err_ptr, tl.sum((live & (endp != end)).to(tl.int32)))


def sz_decode(
    payload: torch.Tensor,
    lane_start: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor,
    outlier_idx: torch.Tensor,
    outlier_val: torch.Tensor,
    numel: int,
    chunk_size: int,
    max_len: int,
    radius: int,
    dtype: torch.dtype,
    check: bool = False,
) -> torch.Tensor:
    """Flat decoded tensor of `numel` values in `dtype` (payload int32 words, lane_start int32/int64
    of n_lanes + 1 bit offsets, table int16 of 2**max_len, step fp32 of 1 element, outliers int64 /
    any float), as SZTensor.decoder_args gives them.

    check: also verify that every lane ends exactly at its recorded length (a stream whose lane
    lengths were tampered with raises ValueError instead of decoding wrong values); this waits
    for the kernel (one device sync)."""
    store_dtype = torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype
    out = alloc_output(numel, store_dtype, payload.device)
    n_lanes = lane_start.numel() - 1
    lanes = n_lanes // -(-numel // chunk_size)
    if payload.numel() == 0:  # the kernel needs a real pointer; every load is masked anyway
        payload = torch.zeros(1, dtype=torch.int32, device=payload.device)
    err = torch.zeros(1, dtype=torch.int32, device=payload.device)
    count_launch("sz.decode")
    sz_decode_kernel[(triton.cdiv(n_lanes, BLOCK),)](
        payload, lane_start, table, step, out, numel, n_lanes, payload.numel(), radius, chunk_size,
        chunk_size // lanes, err, LANES=lanes, MAX_LEN=max_len, BLOCK=BLOCK, CHECK=check, num_warps=NUM_WARPS,
    )
    if check and int(err.item()):
        raise ValueError(f"invalid SZ stream: {int(err.item())} lanes do not end at their recorded length")
    out = out.to(dtype)
    if outlier_idx.numel():
        out[outlier_idx] = outlier_val.to(dtype)
    return out


@triton.jit
def sz_gemv_kernel(
    x_ptr,  # [M, K] activations (fp32 / fp16 / bf16)
    payload_ptr,  # as sz_decode_kernel
    lane_ptr,
    table_ptr,
    step_ptr,
    y_ptr,  # [M, N] fp32: x @ W^T without the outliers (their code is 0)
    M,
    N,
    n_lanes,
    n_words,
    radius,
    rows,  # rows of W per chunk
    steps,  # symbols per lane and row (K // LANES)
    stride_xm,
    stride_ym,
    LANES: tl.constexpr,  # lanes per chunk (divides K: lane j of a chunk codes columns j, j + LANES, ...)
    MAX_LEN: tl.constexpr,
    BLOCK: tl.constexpr,  # lanes per program, a multiple of LANES
    BM: tl.constexpr,  # rows of x (M <= BM)
):
    """Fused decode-GEMV for a row-aligned stream (chunks of whole rows of W): each lane multiplies
    its decoded weights by the matching x elements as it goes (acc[m, lane] += v * x[m, col]),
    and after each row of W one sum over the chunk's lanes gives y[m, row]."""
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_lanes
    start = tl.load(lane_ptr + lane, mask=live, other=0).to(tl.int64)
    j = lane % LANES
    offs_m = tl.arange(0, BM)
    xmask = (offs_m < M)[:, None] & live[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + j[None, :]
    step = tl.load(step_ptr)
    buf, nb, wi = _open_lane(payload_ptr, start, live, n_words)
    CPB: tl.constexpr = BLOCK // LANES  # chunks per program
    chunk = pid * CPB + tl.arange(0, CPB)
    for g in range(rows):
        acc = tl.zeros([BM, BLOCK], dtype=tl.float32)
        xp = x_ptrs
        for _t in range(steps):
            v, buf, nb = _next_symbol(buf, nb, table_ptr, radius, step, MAX_LEN)
            need = nb < 32
            w = tl.load(payload_ptr + wi, mask=need & (wi < n_words), other=0).to(tl.uint32).to(tl.uint64)
            buf = buf | (w << nb.to(tl.uint64))
            nb = tl.where(need, nb + 32, nb)
            wi = tl.where(need, wi + 1, wi)
            acc += v[None, :] * tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
            xp += LANES
        part = tl.sum(tl.reshape(acc, [BM, CPB, LANES]), axis=2)  # [BM, CPB]: one row of W per chunk
        row = chunk.to(tl.int64) * rows + g
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + row[None, :]
        tl.store(y_ptrs, part, mask=(offs_m < M)[:, None] & (row < N)[None, :])


GEMV_MAX_M = 16  # the fused decode-GEMV serves M <= this; larger M decodes W once, then cuBLAS


def gemv_fits(m: int, k: int, numel: int, chunk_size: int, n_lanes: int) -> bool:
    """Whether sz_gemv serves this call: M <= GEMV_MAX_M and a row-aligned layout (chunks of whole
    rows, lanes dividing K)."""
    lanes = n_lanes // -(-numel // chunk_size)
    return 0 < m <= GEMV_MAX_M and chunk_size % k == 0 and k % lanes == 0


def sz_gemv(x: torch.Tensor, payload: torch.Tensor, lane_start: torch.Tensor, table: torch.Tensor,
            step: torch.Tensor, outlier_idx: torch.Tensor, outlier_val: torch.Tensor, n: int, chunk_size: int,
            max_len: int, radius: int, bias) -> torch.Tensor:
    """y = x @ W^T + bias for x [M, K] (M <= 16) and W [n, K] an SZ stream with a row-aligned layout
    (gemv_fits): one fused kernel (fp32 accumulation), then the outliers as a sparse correction
    y[:, r] += x[:, c] * w[r, c] and the bias, in fp32; y in x's dtype."""
    m, k = x.shape
    numel = n * k
    n_lanes = lane_start.numel() - 1
    lanes = n_lanes // -(-numel // chunk_size)
    block = max(BLOCK, lanes)
    y = alloc_output((m, n), torch.float32, x.device)
    if payload.numel() == 0:
        payload = torch.zeros(1, dtype=torch.int32, device=payload.device)
    count_launch("sz.gemv")
    sz_gemv_kernel[(triton.cdiv(n_lanes, block),)](
        x, payload, lane_start, table, step, y, m, n, n_lanes, payload.numel(), radius, chunk_size // k, k // lanes,
        x.stride(0), y.stride(0), LANES=lanes, MAX_LEN=max_len, BLOCK=block, BM=triton.next_power_of_2(m),
        num_warps=min(8, block // 32),
    )
    if outlier_idx.numel():
        y.index_add_(1, outlier_idx // k, x[:, outlier_idx % k].float() * outlier_val.float())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def aot_specs() -> list:
    """The decoder as sz_decode launches it (kernels/_compile.py) for 4096 x 4096 (chunks of 4 rows,
    32 lanes, 512 symbols per lane) and 8192 x 8192 (4 rows, 32 lanes, 1024 symbols), about 4 bits
    per symbol, writing fp32 / fp16 / bf16."""
    max_len, radius = 12, 511
    specs = []
    for n, k, chunk, lanes in ((4096, 4096, 16384, 32), (8192, 8192, 32768, 32)):
        numel = n * k
        n_lanes = numel // chunk * lanes
        for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            args = (meta(numel // 8, dtype=torch.int32), meta(n_lanes + 1, dtype=torch.int32),
                    meta(1 << max_len, dtype=torch.int16), meta(1), meta(0, dtype=torch.int64), meta(0),
                    numel, chunk, max_len, radius, dt)
            # one lane per thread; the cost report counts symbols by the loop's stores
            cost = {"kernel": "sz.decode", "format": "sz", "m_bucket": None, "unit": "symbol",
                    "iterations_by_stores": True,
                    "config": {"out": name, "chunk": chunk, "lanes": lanes, "symbols_per_lane": chunk // lanes,
                               "block": BLOCK},
                    "weights_per_iter": BLOCK, "bytes_per_weight": torch.finfo(dt).bits / 8 + 0.5}
            specs.append(launch_spec(f"sz_decode[{name},{n}x{k}]", lambda a=args: sz_decode(*a), cost))
            if dt == torch.float32 and n == 4096:  # the verifying variant (sz_decompress, SZLinear's load)
                specs.append(launch_spec(f"sz_decode[{name},{n}x{k},check]", lambda a=args: sz_decode(*a, True),
                                         {**cost, "config": {**cost["config"], "check": True}}))
        for m in (1, 4, 16):  # the fused decode-GEMV, bf16 activations
            args = (meta(m, k, dtype=torch.bfloat16), meta(numel // 8, dtype=torch.int32),
                    meta(n_lanes + 1, dtype=torch.int32), meta(1 << max_len, dtype=torch.int16), meta(1),
                    meta(0, dtype=torch.int64), meta(0), n, chunk, max_len, radius, None)
            cost = {"kernel": "sz.gemv", "format": "sz", "m_bucket": m, "unit": "symbol",
                    "config": {"out": f"bf16 M={m}", "chunk": chunk, "lanes": lanes, "symbols_per_lane": chunk // lanes,
                               "block": BLOCK},
                    "weights_per_iter": BLOCK, "bytes_per_weight": 0.5}
            specs.append(launch_spec(f"sz_gemv[bf16,M={m},{n}x{k}]", lambda a=args: sz_gemv(*a), cost))
    return specs


# No static instruction goal is set for the decoder yet (tests/test_cost.py checks the shape of
# its loop: one refill per two symbols, one table load per symbol).
COST_BUDGETS: list = []

# Pointer arguments whose offsets grow with N * K, by spec-name prefix: tests/test_compile_tier.py
# checks that each gets a 64-bit tensor offset.
INT64_POINTERS = {"sz_decode": ("payload_ptr", "out_ptr")}
