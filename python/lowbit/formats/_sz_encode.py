"""The SZ encoder's inner loops (lowbit.formats.sz.sz_compress calls them): quantize with the
exact per-element bound check, the outlier values, the lane lengths and the payload packing.

Two implementations, the same bytes: numpy/torch on CPU tensors (the reference, always there), and
the C kernels in lowbit/csrc/sz_encode.c (built into the CPU backend's one library by lowbit._clib;
their signatures are declared below) for quantize, lane lengths, packing, the exact bound checks and
the Huffman code lengths. The C kernels run when LOWBIT_CPU_BACKEND is "fast" (the default) and the
kernels could be built (lowbit._clib warns once when not); `_clib.CALLS["sz.encode_*"]` counts them.
The suspects' resolution and everything per symbol (radius, canonical codes) is numpy in both.
The format itself is in sz.py."""

from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _clib
from .._clib import F32, F64, I64, INT, P, kernel
from .._validate import FLOAT_DTYPES
from ._entropy import MAX_LEN, huffman_lengths, pack_lsb, reversed_codes

MAX_RADIUS = 511  # alphabet: codes -511..511 (1023 symbols); larger |code| are outliers
DTYPE_BIT = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 4}
_FLT_MAX = float(torch.finfo(torch.float32).max)
SZQ_BLOCK = 65536  # lb_szq2 reports suspects per block of this many elements (uint16 offsets)
SZ_PARALLEL_MIN = 1 << 20  # elements below which the C kernels use one thread (as lowbit._cpu.PARALLEL_MIN)

# The kernels of csrc/sz_encode.c, as C declares them (tests/test_c_bindings.py checks it); each returns a code:
# MemoryError on LB_ENOMEM (lowbit._clib).
_clib.bind(
    kernel("lb_szq1", w=P, n=I64, step=F32, q=P, hist=P, nt=INT),
    kernel("lb_szq2", w=P, n=I64, step=F32, radius=INT, limit=F32, q=P, sus=P, cnt=P, nt=INT),
    kernel("lb_szlb", sym=P, n=I64, len=P, chunk=I64, lanes=I64, bits=P, nt=INT),
    kernel("lb_szpack", sym=P, n=I64, code=P, chunk=I64, lanes=I64, start=P, out=P, nt=INT),
    kernel("lb_szexc", v=P, w=P, m=I64, eb=F64, out=P),
    kernel("lb_szdm", w=P, n=I64, out=P, nt=INT),
    kernel("lb_szhuff", f=P, n=I64, max_len=INT, len=P),
)


def fast_library() -> Optional[ctypes.CDLL]:
    """The CPU backend's kernels; None when LOWBIT_CPU_BACKEND is not "fast" or the kernels can not be
    built (lowbit._clib has then warned once): the reference runs."""
    return _clib.fast_library()


class _Work:
    """Buffers reused by the encoder's candidates (a fresh allocation costs more than the math), and
    the C kernels to use (`lib`, None for the numpy/torch reference)."""

    def __init__(self, n: int, lib: Optional[ctypes.CDLL] = None) -> None:
        self.lib = lib
        self.sym = torch.empty(n, dtype=torch.int16)  # the candidate's symbols
        self.kept = torch.empty(n, dtype=torch.int16)  # the best candidate's
        if lib is not None:
            self.sus = np.empty(n, dtype=np.uint16)  # lb_szq2's suspect offsets
            return
        self.q = torch.empty(n)
        self.a = torch.empty(n)
        self.b = torch.empty(n)
        self.h = torch.empty(n, dtype=torch.float16)
        self.hb = torch.empty(n, dtype=torch.bfloat16)
        self.sus = torch.empty(n, dtype=torch.bool)

    def u8(self) -> np.ndarray:
        return self.b.numpy().view(np.uint8)[: self.b.numel()]  # b is free once the codes are made

    def keep(self) -> None:
        self.sym, self.kept = self.kept, self.sym


def _dtype_mask(wt: Tensor, amax: float, eb: float, lib: Optional[ctypes.CDLL] = None,
                w32: Optional[Tensor] = None) -> int:
    """Bit per output dtype: w itself is within the bound in that dtype (cheap sufficient test first;
    with `lib`, the exact test by lb_szdm on w32, w as fp32)."""
    mask = 0
    cast_err = None
    for d, bits, sub in ((torch.float32, 24, 2.0**-150), (torch.float16, 11, 2.0**-25), (torch.bfloat16, 8, 2.0**-134)):
        cheap = amax * 2.0**-bits + sub <= eb and amax < 65504.0
        if cheap:
            mask |= DTYPE_BIT[d]
            continue
        if lib is None:
            err = float((wt.to(d).double() - wt.double()).abs().max())
        elif d == torch.float32:
            err = 0.0  # a finite fp32/fp16/bf16 w is exact in fp32
        else:
            if cast_err is None:
                n = w32.numel()
                out = np.zeros(2 * -(-n // SZQ_BLOCK))
                lib.lb_szdm(w32.data_ptr(), n, out.ctypes.data, _threads(n))
                cast_err = {torch.float16: float(out[0::2].max()), torch.bfloat16: float(out[1::2].max())}
            err = cast_err[d]
        if err <= eb:
            mask |= DTYPE_BIT[d]
    return mask


def _step32(step: float) -> np.float32:
    step32 = np.float32(min(step, 2.0**127))
    return max(step32, np.float32(2.0**-149))  # finite, non-zero (the per-element check keeps the bound)


def _radius(hist: np.ndarray, numel: int, esize: int) -> tuple[int, np.ndarray]:
    """(radius, histogram of the codes clamped to it) from `hist`, the histogram of the codes clamped
    to +-(MAX_RADIUS + 1). Each symbol costs half a byte of code-length table, each |q| beyond the
    radius an outlier (index + value); take the cheapest radius <= MAX_RADIUS."""
    off = MAX_RADIUS + 1
    habs = hist[off:].copy()
    habs[1:] += hist[:off][::-1]
    beyond = numel - np.cumsum(habs)[: MAX_RADIUS + 1]
    r = np.arange(MAX_RADIUS + 1)
    radius = int(np.argmin((2 * r + 1) * 0.5 + beyond * (1.5 + esize + 0.5)))
    sym_hist = hist[off - radius:off + radius + 1].copy()  # histogram of the clamped codes
    sym_hist[0] += hist[:off - radius].sum()
    sym_hist[-1] += hist[off + radius + 1:].sum()
    return radius, sym_hist


def _limit32(eb: float) -> float:
    """The suspect threshold eb (1 - 2**-16) as the largest fp32 not above it: rounded to nearest, a
    bound below the smallest subnormal (1e-45) would become 1.4e-45 and hide a miss of exactly that size."""
    limit = min(eb * (1.0 - 2.0**-16), _FLT_MAX)
    limit32 = np.float32(limit)
    if float(limit32) > limit:
        limit32 = np.nextafter(limit32, np.float32(0))
    return float(limit32)


def _resolve(suspect: np.ndarray, q_s: np.ndarray, wt: Tensor, radius: int, step32: np.float32, eb: float,
             sym_hist: np.ndarray, lib: Optional[ctypes.CDLL] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The suspects (indices, their clamped codes q_s as float64) checked exactly: first the code itself,
    then the other neighbour code (w near the midpoint of two codes), then give up: outlier. Returns
    (final codes of the suspects, float64; which changed; outlier indices); sym_hist is updated."""
    wt_s = wt[torch.from_numpy(suspect)]
    fails = _misses_bound(q_s, wt_s, radius, step32, eb, lib)
    x_s = wt_s.double().numpy() / float(step32)
    q_alt = q_s + np.where(x_s >= q_s, 1.0, -1.0)
    alt_ok = fails & ~_misses_bound(q_alt, wt_s, radius, step32, eb, lib)
    out = fails & ~alt_ok
    new = np.where(alt_ok, q_alt, np.where(out, 0.0, q_s))
    np.add.at(sym_hist, q_s.astype(np.int64) + radius, -1)
    np.add.at(sym_hist, new.astype(np.int64) + radius, 1)
    return new, fails, suspect[out].astype(np.int64)


def _quantize(work: _Work, wt: Tensor, w32: Tensor, eb: float, step: float) -> tuple:
    """Codes for one step into work.sym (as symbols, code + radius; outliers carry the code 0):
    (the fp32 step, the radius, the outlier indices, the symbol histogram). The C kernels when
    work.lib is set, else torch/numpy (the reference); the same symbols either way."""
    if work.lib is not None:
        return _quantize_fast(work, wt, w32, eb, step)
    step32 = _step32(step)
    s = torch.tensor(float(step32), dtype=torch.float32)
    q, a, b, h = work.q, work.a, work.b, work.h
    torch.div(w32, s, out=q).round_()  # fp32 quotient: a midpoint case may round the other way; checked below
    off = MAX_RADIUS + 1
    work.sym.copy_(torch.clamp(q, -off, off, out=a)).add_(off)
    hist = torch.bincount(work.sym, minlength=2 * off + 1).numpy()
    radius, sym_hist = _radius(hist, len(q), wt.element_size())
    q.clamp_(-radius, radius)
    # Suspects: elements whose reconstruction, as fp32, fp16 or bf16, is more than the bound less
    # 2**-16 of it from w, those differences computed in fp32 (each within 2**-24 of exact, so
    # every other element keeps the bound in every dtype). Suspects are checked exactly below.
    torch.mul(q, s, out=a)  # the fp32 reconstruction, as the decoders compute it
    h.copy_(a)  # rounded to fp16 (inf past its range: a suspect)
    work.hb.copy_(a)  # and to bf16
    b.copy_(h).sub_(w32).abs_()
    torch.maximum(a.sub_(w32).abs_(), b, out=b)
    a.copy_(work.hb).sub_(w32).abs_()
    torch.maximum(a, b, out=a)
    torch.gt(a, _limit32(eb), out=work.sus)
    suspect = np.flatnonzero(work.sus.numpy())
    outlier_idx = np.zeros(0, dtype=np.int64)
    if len(suspect):
        new, changed, outlier_idx = _resolve(suspect, q[torch.from_numpy(suspect)].double().numpy(), wt, radius,
                                             step32, eb, sym_hist)
        q[torch.from_numpy(suspect[changed])] = torch.from_numpy(new[changed]).float()
    work.sym.copy_(q).add_(radius)
    return step32, radius, outlier_idx, sym_hist


def code_lengths(lib: Optional[ctypes.CDLL], hist: np.ndarray) -> np.ndarray:
    """_entropy.huffman_lengths(hist, MAX_LEN), by lb_szhuff when `lib` is set (the same lengths)."""
    present = np.flatnonzero(hist)
    if lib is None or len(present) < 2:
        return huffman_lengths(hist, MAX_LEN)
    f = np.ascontiguousarray(hist[present], dtype=np.int64)
    ln = np.zeros(len(present), dtype=np.uint8)
    lib.lb_szhuff(f.ctypes.data, len(f), MAX_LEN, ln.ctypes.data)  # MemoryError when C runs out of memory
    lengths = np.zeros(len(hist), dtype=np.uint8)
    lengths[present] = ln
    _clib.CALLS["sz.encode_huffman"] += 1
    return lengths


def _threads(numel: int) -> int:
    return 1 if numel < SZ_PARALLEL_MIN else torch.get_num_threads()


def _quantize_fast(work: _Work, wt: Tensor, w32: Tensor, eb: float, step: float) -> tuple:
    """_quantize by the C kernels lb_szq1 / lb_szq2 (bit-identical: fp32 arithmetic in the same order)."""
    lib, n, sym = work.lib, wt.numel(), work.sym
    step32 = _step32(step)
    hist = np.zeros(2 * MAX_RADIUS + 3, dtype=np.int64)
    nt = _threads(n)
    lib.lb_szq1(w32.data_ptr(), n, float(step32), sym.data_ptr(), hist.ctypes.data, nt)
    radius, sym_hist = _radius(hist, n, wt.element_size())
    cnt = np.zeros(-(-n // SZQ_BLOCK), dtype=np.int64)
    lib.lb_szq2(w32.data_ptr(), n, float(step32), radius, _limit32(eb), sym.data_ptr(), work.sus.ctypes.data,
                cnt.ctypes.data, nt)
    outlier_idx = np.zeros(0, dtype=np.int64)
    if cnt.any():
        blocks = np.flatnonzero(cnt)
        suspect = np.concatenate([work.sus[b * SZQ_BLOCK:b * SZQ_BLOCK + cnt[b]].astype(np.int64) + b * SZQ_BLOCK
                                  for b in blocks])
        s = sym.numpy()
        q_s = s[suspect].astype(np.float64) - radius
        new, changed, outlier_idx = _resolve(suspect, q_s, wt, radius, step32, eb, sym_hist, lib)
        s[suspect[changed]] = (new[changed] + radius).astype(np.int16)
    _clib.CALLS["sz.encode_quantize"] += 1
    return step32, radius, outlier_idx, sym_hist


def _misses_bound(q: np.ndarray, w: Tensor, radius: int, step32: np.float32, eb: float,
                  lib: Optional[ctypes.CDLL] = None) -> np.ndarray:
    """Per element: |q| > radius, or for some output dtype d the decoded value
    d(float32(q) * step32) is farther from w than max(eb, |d(w) - w|) (what an outlier gives)."""
    recon = torch.from_numpy(np.clip(q, -radius, radius).astype(np.float32)) * torch.tensor(step32)
    return (np.abs(q) > radius) | _exceeds(recon, w, eb, lib)


def _exceeds(v: Tensor, w: Tensor, eb: float, lib: Optional[ctypes.CDLL] = None) -> np.ndarray:
    """Per element: for some output dtype d, |d(v) - w| > max(eb, |d(w) - w|), compared in float64
    (by lb_szexc with `lib`: v and w widened to fp32 exactly, every cast to fp16/bf16 goes through fp32)."""
    if lib is not None:
        v32, w32 = v.float().contiguous(), w.float().contiguous()
        res = np.empty(w.numel(), dtype=np.uint8)
        lib.lb_szexc(v32.data_ptr(), w32.data_ptr(), w.numel(), eb, res.ctypes.data)
        return res.view(bool)
    out = np.zeros(w.numel(), dtype=bool)
    w64 = w.double()
    for d in FLOAT_DTYPES:
        floor = (w.to(d).double() - w64).abs().clamp(min=eb)
        out |= ((v.to(d).double() - w64).abs() > floor).numpy()
    return out


def _outlier_values(wt: Tensor, outlier_idx: np.ndarray, eb: float, dtype: torch.dtype,
                    lib: Optional[ctypes.CDLL] = None) -> Tensor:
    """The narrowest of bf16 / fp16 / w's dtype that keeps every outlier within the bound in every
    output dtype (bf16 usually does when the bound is not far below |w| / 256)."""
    vals = wt[torch.from_numpy(outlier_idx)].clone()
    if dtype == torch.float32 and len(vals):
        for narrow in (torch.bfloat16, torch.float16):
            if not _exceeds(vals.to(narrow), vals, eb, lib).any():
                return vals.to(narrow)
    return vals


def lane_bits(work: _Work, lengths: np.ndarray, numel: int, chunk: int, lanes: int) -> np.ndarray:
    """int64[n_lanes]: the bits of every lane of work.sym's symbols coded with `lengths`."""
    ln = np.ascontiguousarray(lengths, dtype=np.uint8)
    if work.lib is None:
        return _lane_bits(_gather(ln, work.sym.numpy(), work.u8()), numel, chunk, lanes)
    out = np.empty(-(-numel // chunk) * lanes, dtype=np.int64)
    work.lib.lb_szlb(work.sym.data_ptr(), numel, ln.ctypes.data, chunk, lanes, out.ctypes.data, _threads(numel))
    _clib.CALLS["sz.encode_lane_bits"] += 1
    return out


def pack_payload(lib: Optional[ctypes.CDLL], sym: Tensor, lengths: np.ndarray, lane_bits: np.ndarray, chunk: int,
                 lanes: int) -> tuple[np.ndarray, int]:
    """_pack_payload of the int16 symbols `sym`: by lb_szpack (given each lane's bits) when `lib` is set."""
    if lib is None:
        return _pack_payload(sym.numpy(), lengths, chunk, lanes)
    lengths = np.asarray(lengths)
    code = reversed_codes(lengths).astype(np.uint32) | (lengths.astype(np.uint32) << 16)
    start = np.zeros(len(lane_bits) + 1, dtype=np.int64)
    np.cumsum(lane_bits, out=start[1:])
    nbits = int(start[-1])
    words = np.zeros((nbits + 31) // 32, dtype=np.uint32)
    numel = sym.numel()
    lib.lb_szpack(sym.data_ptr(), numel, code.ctypes.data, chunk, lanes, start.ctypes.data, words.ctypes.data,
                  _threads(numel))
    _clib.CALLS["sz.encode_pack"] += 1
    return words, nbits


def _lane_bits(ln: np.ndarray, numel: int, chunk: int, lanes: int) -> np.ndarray:
    """int64[n_lanes]: the bits of every lane, from each element's code length `ln` (uint8)."""
    n_chunks = -(-numel // chunk)
    if n_chunks * chunk != numel:
        ln = np.concatenate([ln, np.zeros(n_chunks * chunk - numel, dtype=ln.dtype)])
    return ln.reshape(n_chunks, chunk // lanes, lanes).sum(axis=1, dtype=np.int64).reshape(-1)


def _pack_payload(sym: np.ndarray, lengths: np.ndarray, chunk: int, lanes: int) -> tuple[np.ndarray, int]:
    """The payload words: every element's code word (bit-reversed canonical code) in stream order
    (chunk by chunk, lane by lane, step by step)."""
    nsym = len(lengths)
    width = np.append(lengths.astype(np.uint8), 0)  # symbol nsym: the padding of a short last chunk
    rev = np.append(reversed_codes(lengths).astype(np.uint16), 0)
    numel = len(sym)
    n_chunks = -(-numel // chunk)
    s = torch.from_numpy(np.ascontiguousarray(sym, dtype=np.int16))
    if n_chunks * chunk != numel:
        s = torch.cat([s, torch.full((n_chunks * chunk - numel,), nsym, dtype=torch.int16)])
    s = s.view(n_chunks, chunk // lanes, lanes).transpose(1, 2).reshape(-1).numpy()
    return pack_lsb(_gather(rev, s, np.empty(len(s), np.uint16)), _gather(width, s, np.empty(len(s), np.uint8)))


def _gather(table: np.ndarray, idx: np.ndarray, out: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """out[i] = table[idx[i]], in blocks (numpy widens the index to int64: a small temporary is reused)."""
    for i in range(0, len(idx), block):
        np.take(table, idx[i:i + block], out=out[i:i + block], mode="clip")
    return out
