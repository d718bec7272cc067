"""Machinery shared by the kernel files: named config records, output allocation, the grouped
tile order, the forward epilogue, the first-call tuner and the launch counter.

Nothing in kernels/ imports lowbit: the launchers take plain tensors and ints, and the few
switches they read (TRITON_INTERPRET, LOWBIT_POISON, LOWBIT_AUTOTUNE) are environment variables.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

# -- named config records (never positional tuples: a field read by position is a bug waiting) --


class MatmulConfig(NamedTuple):
    """A forward y = x @ W^T launch: `kind` "gemv" (no tensor cores, M <= block_m) or "dot"
    (tl.dot tiles), or "dequant" (dequantize W once, then cuBLAS; the tile fields are unused)."""

    kind: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    decode: int = 2  # 4-bit table lookup: 0 global gather, 1 select tree, 2 tl.gather (unused by int)


class GradXConfig(NamedTuple):
    """A gx = g @ W launch (reduction over N, split over SPLIT_N programs)."""

    block_m: int
    block_k: int
    block_n: int
    split_n: int
    num_warps: int
    num_stages: int
    decode: int = 2


class GradScaleConfig(NamedTuple):
    """An int grad_scale launch (gs[N, G] from g^T x tiles); SPLIT_M is chosen from the grid."""

    block_n: int
    block_k: int
    block_m: int
    num_warps: int
    num_stages: int


DEQUANT = MatmulConfig("dequant", 0, 0, 0, 1, 0, 0, 0)

# Above this M a forward launcher without a shipped table tries dequantize + cuBLAS first: the fused
# kernels lost to it at large M on an H100 (docs/benchmarks.md); a table or the opt-in tuner can still
# pick a fused config.
DEQUANT_FIRST_M = 256


def with_dequant(cands: list, m: int) -> list:
    """The forward candidates for M rows with DEQUANT added: first above DEQUANT_FIRST_M, last otherwise."""
    return [DEQUANT, *cands] if m > DEQUANT_FIRST_M else [*cands, DEQUANT]

# -- launch counter: tests assert that a kernel ran (not that some path returned a tensor) -----

LAUNCHES: collections.Counter[str] = collections.Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1): no bf16 arithmetic there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def alloc_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, except under LOWBIT_POISON=1 (the tests): NaN (0xAB for bytes) everywhere, so
    an element a kernel failed to write cannot pass a comparison."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if os.environ.get("LOWBIT_POISON") == "1":
        fill = float("nan") if dtype.is_floating_point else 0xAB
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype, device: torch.device):
    # The interpreter has no bf16 arithmetic: the launcher upcasts bf16 to fp32 there.
    if device.type == "cpu" and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPE[dtype]


def precision(dot_dt) -> str:
    # fp32 activations run their dots in tf32 on the GPU (the 10x-slower ieee path is never taken
    # silently); the interpreter computes exactly.
    return "ieee" if (dot_dt != tl.float32 or interpreting()) else "tf32"


# -- the first-call tuner ------------------------------------------------------------------------


def bucket(table: dict, m: int) -> int:
    """The smallest M bucket of a config table that serves M."""
    return next(b for b in sorted(table) if m <= b)


def tune_m(m: int) -> int:
    """M as the tuner keys it: the next power of two (capped at 8192). Config-table buckets are
    too coarse for this: a choice timed at M=512 was reused at M=4096, where it ran 4x slower
    than the alternative (H100, 2026-11-26)."""
    return min(1 << max(m - 1, 0).bit_length(), 8192)


_tuned: dict[tuple, NamedTuple] = {}

# Shipped per-card tables (gemlite's idea): kernels/_configs/<card>.json, written by `lowbit tune`
# on that card, map tuner keys to the config measured fastest there. A key found in the table (or
# the nearest shape of the same kernel, M, dtype and format) is used without timing anything; a
# card without a table takes the bucket's first config that fits, also without timing (a first
# call that times 5-10 candidates costs seconds and is not deterministic). The first-call tuner is
# opt-in: LOWBIT_AUTOTUNE=1, or `lowbit tune --out` to write a table. LOWBIT_CONFIG_DIR points at
# another folder.
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "_configs")
TABLE_VERSION = 1
_RECORDS = {"MatmulConfig": MatmulConfig, "GradXConfig": GradXConfig, "GradScaleConfig": GradScaleConfig}
_tables: dict[str, dict] = {}


def card_name(device=None) -> str:
    """The file stem of a card's table: its CUDA name, lower case, runs of other characters as '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def key_to_json(key: tuple) -> list:
    return [str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v for v in key]


def config_to_json(cfg: NamedTuple) -> dict:
    return {"record": type(cfg).__name__, **cfg._asdict()}


def config_from_json(d: dict) -> NamedTuple:
    d = dict(d)
    return _RECORDS[d.pop("record")](**d)


def load_table(card: str) -> dict:
    """{tuple(json key): config} of the shipped table for `card` ({} if there is none)."""
    if card not in _tables:
        import json

        path = os.path.join(os.environ.get("LOWBIT_CONFIG_DIR", CONFIG_DIR), card + ".json")
        table = {}
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != TABLE_VERSION:
                raise ValueError(f"{path}: config table version {data.get('version')!r}, this lowbit reads "
                                 f"{TABLE_VERSION}; re-run `lowbit tune` on this card")
            table = {tuple(e["key"]): config_from_json(e["config"]) for e in data["entries"]}
        _tables[card] = table
    return _tables[card]


def _from_table(key: tuple, candidates: list) -> NamedTuple | None:
    """The shipped config for `key`: the exact key, else the nearest N, K (log distance) among the
    keys that agree on everything else; only configs that are candidates here (fit this shape)."""
    import math

    if not torch.cuda.is_available():
        return None
    table = load_table(card_name())
    if not table:
        return None
    jkey = tuple(key_to_json(key))
    cfg = table.get(jkey)
    if cfg in candidates:
        return cfg
    # key layout: (kernel, M, N, K, dtype, ...format fields): N and K at positions 2 and 3
    same = [(k, c) for k, c in table.items() if len(k) == len(jkey) and k[:2] == jkey[:2] and k[4:] == jkey[4:]
            and c in candidates]
    if not same:
        return None
    return min(same, key=lambda kc: abs(math.log(kc[0][2] / jkey[2])) + abs(math.log(kc[0][3] / jkey[3])))[1]


def autotune_enabled() -> bool:
    return os.environ.get("LOWBIT_AUTOTUNE", "0") == "1"


def pick(key: tuple, candidates: list, run: Callable) -> NamedTuple:
    """The config for `key` (once per key per process): the shipped table's for this card, else the
    fastest of a short timed run of each candidate (autotuning on), else the first candidate."""
    if key in _tuned:
        return _tuned[key]
    shipped = _from_table(key, candidates)
    if shipped is not None:
        _tuned[key] = shipped
        return shipped
    if len(candidates) == 1 or not autotune_enabled():
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


def reduce_split(y: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[SPLIT, M, N] partial sums (or one [1, M, N] result) -> [M, N] in out_dtype, plus the bias
    when the kernel could not add it (split > 1)."""
    if y.shape[0] == 1 and y.dtype == out_dtype:
        return y[0]
    out = y.sum(0) if y.shape[0] > 1 else y[0]
    if bias is not None and y.shape[0] > 1:
        out = out + bias.float()
    return out.to(out_dtype)


# -- device helpers ---------------------------------------------------------------------------


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row-tiles in a row share each
    column-tile of the weight while it is hot in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def load_x_halves(x_ptr, offs_m, m_mask, k0, stride_xm, stride_xk, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """x[offs_m, k0 : k0 + BLOCK_K] as (even columns, odd columns), each [BM, BLOCK_K/2]: the 4-bit families
    (nf4, blockfp) store two columns per byte and split x by parity instead of interleaving W's nibbles."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
    BM: tl.constexpr = offs_m.shape[0]
    xe, xo = tl.split(tl.reshape(x.to(DTYPE), (BM, BLOCK_K // 2, 2)))
    return xe, xo


@triton.jit
def store_output(y_ptr, acc, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, stride_ys, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the forward kernels: add the bias (only when not split: the launcher adds it
    after reducing split-K partials) and store the [BM, BN] tile of split `pid_k`. Row offsets
    are int64: M * N passes 2**31 at a few thousand tokens of a wide layer."""
    if HAS_BIAS:
        if SPLIT_K == 1:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k.to(tl.int64) * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -- the "words" GEMVs (M <= 4, one launch): split-K workspace and epilogue ---------------------

# Split-K workspaces of the "words" GEMVs: fp32 partials [SPLIT, 4, N] and one arrival counter per
# row tile. The counters start at zero and the last program of each tile resets its own, so the
# buffers are reused across calls (and CUDA-graph replays) without a memset. One per (device,
# stream, shape): two streams never share one.
WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def words_workspace(device: torch.device, split: int, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "meta":
        return (torch.empty((split, 4, n), dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    if split == 1:  # never touched by the kernel: one cached pair per device, no allocation per call
        n, tiles = 1, 1
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, split, n, tiles)
    if key not in WORKSPACES:
        WORKSPACES[key] = (torch.empty((split, 4, n), dtype=torch.float32, device=device),
                           torch.zeros(tiles, dtype=torch.int32, device=device))
    return WORKSPACES[key]


@triton.jit
def _words_store_row(y_ptr, ws_ptr, bias_ptr, y, m, offs_n, n_mask, N, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n[:, None], mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(ws_ptr + (pid_k * 4 + m) * N + offs_n[:, None], y, mask=n_mask)


@triton.jit
def _words_reduce_row(y_ptr, ws_ptr, bias_ptr, m, offs_n, n_mask, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    y = tl.zeros(offs_n[:, None].shape, dtype=tl.float32)
    for s_ in tl.static_range(SPLIT_K):  # in split order: deterministic
        y += tl.load(ws_ptr + (s_ * 4 + m) * N + offs_n[:, None], mask=n_mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n[:, None], mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def words_epilogue(y_ptr, ws_ptr, count_ptr, bias_ptr, acc0, acc1, acc2, acc3, pid_n, pid_k, offs_n, n_mask, N,
                   M: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the M <= 4 rows [BLOCK_N, 1] of a words GEMV. Split-K: fp32 partials go to the
    workspace, and the last program of the row tile (a counter per tile, reset by that program)
    sums them in split order, adds the bias, casts and stores: one launch, deterministic, no memset."""
    _words_store_row(y_ptr, ws_ptr, bias_ptr, acc0, 0, offs_n, n_mask, N, pid_k, HAS_BIAS, SPLIT_K)
    if M > 1:
        _words_store_row(y_ptr, ws_ptr, bias_ptr, acc1, 1, offs_n, n_mask, N, pid_k, HAS_BIAS, SPLIT_K)
    if M > 2:
        _words_store_row(y_ptr, ws_ptr, bias_ptr, acc2, 2, offs_n, n_mask, N, pid_k, HAS_BIAS, SPLIT_K)
    if M > 3:
        _words_store_row(y_ptr, ws_ptr, bias_ptr, acc3, 3, offs_n, n_mask, N, pid_k, HAS_BIAS, SPLIT_K)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partial is written before the program counts itself done
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            _words_reduce_row(y_ptr, ws_ptr, bias_ptr, 0, offs_n, n_mask, N, HAS_BIAS, SPLIT_K)
            if M > 1:
                _words_reduce_row(y_ptr, ws_ptr, bias_ptr, 1, offs_n, n_mask, N, HAS_BIAS, SPLIT_K)
            if M > 2:
                _words_reduce_row(y_ptr, ws_ptr, bias_ptr, 2, offs_n, n_mask, N, HAS_BIAS, SPLIT_K)
            if M > 3:
                _words_reduce_row(y_ptr, ws_ptr, bias_ptr, 3, offs_n, n_mask, N, HAS_BIAS, SPLIT_K)
            tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def _fma_x_row(p, v0, v1, x_ptr, kp, row, K, PAIRS: tl.constexpr):
    """p += v0 * x[row, 2 kp] + v1 * x[row, 2 kp + 1] (see fma_x_pair)."""
    if PAIRS:
        xw = tl.load(x_ptr + kp + row * (K // 2), eviction_policy="evict_last")
        p += v0 * (xw << 16).to(tl.float32, bitcast=True)
        p += v1 * (xw & -65536).to(tl.float32, bitcast=True)
    else:
        xk = x_ptr + 2 * kp + row * K
        p += v0 * tl.load(xk, eviction_policy="evict_last").to(tl.float32)
        p += v1 * tl.load(xk + 1, eviction_policy="evict_last").to(tl.float32)
    return p


@triton.jit
def fma_x_pair(p0, p1, p2, p3, v0, v1, x_ptr, kp, K, M: tl.constexpr, PAIRS: tl.constexpr):
    """p_m += v0 * x[m, 2 kp] + v1 * x[m, 2 kp + 1] for the M <= 4 rows of x (contiguous [M, K]).

    PAIRS (bf16 x, passed as int32 words): one 32-bit load brings both elements, and a bf16 is the
    upper half of an fp32, so the two conversions are a shift and a mask (the 16-bit loads plus
    IMAD conversions they replace cost ~0.1 SASS instruction per weight of an M=1 GEMV). Integer
    and bitcast work only: the Triton interpreter runs it as the GPU does."""
    p0 = _fma_x_row(p0, v0, v1, x_ptr, kp, 0, K, PAIRS)
    if M > 1:
        p1 = _fma_x_row(p1, v0, v1, x_ptr, kp, 1, K, PAIRS)
    if M > 2:
        p2 = _fma_x_row(p2, v0, v1, x_ptr, kp, 2, K, PAIRS)
    if M > 3:
        p3 = _fma_x_row(p3, v0, v1, x_ptr, kp, 3, K, PAIRS)
    return p0, p1, p2, p3


@triton.jit
def table_value(w, table_base, SHIFT: tl.constexpr):
    """table[(w >> SHIFT) & 15] for the 16-entry fp32 code table at `table_base` (64-byte aligned): the
    words GEMVs' decode (nf4's code table, blockfp's E2M1 values).

    The byte offset (w >> (SHIFT - 2)) & 60 is OR-ed into the table's address instead of added:
    the high address word never changes, so the address costs one shift and one LOP3 (no 64-bit
    add), and the 64-byte table stays in L1 (one wavefront per warp-wide gather)."""
    if SHIFT >= 2:
        off = (w >> (SHIFT - 2)) & 0x3C
    else:
        off = (w << (2 - SHIFT)) & 0x3C
    return tl.load((table_base | off.to(tl.int64)).to(tl.pointer_type(tl.float32)))


@triton.jit
def words_accumulate(acc0, acc1, acc2, acc3, p0, p1, p2, p3, s, M: tl.constexpr):
    """acc_m += (the step's partial p_m summed over its columns, inside the thread) * s, M <= 4 rows."""
    acc0 += tl.sum(p0, axis=1, keep_dims=True) * s
    if M > 1:
        acc1 += tl.sum(p1, axis=1, keep_dims=True) * s
    if M > 2:
        acc2 += tl.sum(p2, axis=1, keep_dims=True) * s
    if M > 3:
        acc3 += tl.sum(p3, axis=1, keep_dims=True) * s
    return acc0, acc1, acc2, acc3


def words_x(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The x argument of a words GEMV and its PAIRS flag: bf16 as int32 pairs (K is even)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int32), True
    return x, False


def words_out_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The interpreter truncates fp32 -> bf16 casts: store fp32 there, torch rounds."""
    return torch.float32 if (x_dtype == torch.bfloat16 and interpreting()) else x_dtype
