"""The SZ encoder's inner loops (lowbit.formats.sz.sz_compress calls them): quantize with the
exact per-element bound check, the outlier values, the lane lengths and the payload packing.
Plain numpy/torch on CPU tensors; the format itself is in sz.py."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._validate import FLOAT_DTYPES
from ._entropy import pack_lsb, reversed_codes

MAX_RADIUS = 511  # alphabet: codes -511..511 (1023 symbols); larger |code| are outliers
DTYPE_BIT = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 4}
_FLT_MAX = float(torch.finfo(torch.float32).max)


class _Work:
    """Buffers reused by the encoder's candidates (a fresh allocation costs more than the math)."""

    def __init__(self, n: int) -> None:
        self.q = torch.empty(n)
        self.a = torch.empty(n)
        self.b = torch.empty(n)
        self.h = torch.empty(n, dtype=torch.float16)
        self.hb = torch.empty(n, dtype=torch.bfloat16)
        self.sus = torch.empty(n, dtype=torch.bool)
        self.sym = torch.empty(n, dtype=torch.int16)  # the candidate's symbols
        self.kept = torch.empty(n, dtype=torch.int16)  # the best candidate's

    def u8(self) -> np.ndarray:
        return self.b.numpy().view(np.uint8)[: self.b.numel()]  # b is free once the codes are made

    def keep(self) -> None:
        self.sym, self.kept = self.kept, self.sym


def _dtype_mask(wt: Tensor, amax: float, eb: float) -> int:
    """Bit per output dtype: w itself is within the bound in that dtype (cheap sufficient test first)."""
    mask = 0
    for d, bits, sub in ((torch.float32, 24, 2.0**-150), (torch.float16, 11, 2.0**-25), (torch.bfloat16, 8, 2.0**-134)):
        cheap = amax * 2.0**-bits + sub <= eb and amax < 65504.0
        if cheap or float((wt.to(d).double() - wt.double()).abs().max()) <= eb:
            mask |= DTYPE_BIT[d]
    return mask


def _quantize(work: _Work, wt: Tensor, w32: Tensor, eb: float, step: float) -> tuple:
    """Codes for one step into work.sym (as symbols, code + radius; outliers carry the code 0):
    (the fp32 step, the radius, the outlier indices, the symbol histogram)."""
    step32 = np.float32(min(step, 2.0**127))
    step32 = max(step32, np.float32(2.0**-149))  # finite, non-zero (the per-element check keeps the bound)
    s = torch.tensor(float(step32), dtype=torch.float32)
    q, a, b, h = work.q, work.a, work.b, work.h
    torch.div(w32, s, out=q).round_()  # fp32 quotient: a midpoint case may round the other way; checked below
    # Alphabet radius: each symbol costs half a byte of code-length table, each |q| beyond the
    # radius an outlier (index + value); take the cheapest radius <= MAX_RADIUS.
    off = MAX_RADIUS + 1
    work.sym.copy_(torch.clamp(q, -off, off, out=a)).add_(off)
    hist = torch.bincount(work.sym, minlength=2 * off + 1).numpy()
    habs = hist[off:].copy()
    habs[1:] += hist[:off][::-1]
    beyond = len(q) - np.cumsum(habs)[: MAX_RADIUS + 1]
    r = np.arange(MAX_RADIUS + 1)
    radius = int(np.argmin((2 * r + 1) * 0.5 + beyond * (1.5 + wt.element_size() + 0.5)))
    q.clamp_(-radius, radius)
    sym_hist = hist[off - radius:off + radius + 1].copy()  # histogram of the clamped codes
    sym_hist[0] += hist[:off - radius].sum()
    sym_hist[-1] += hist[off + radius + 1:].sum()
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
    # The threshold as the largest fp32 not above it: rounded to nearest, a bound below the
    # smallest subnormal (1e-45) would become 1.4e-45 and hide a miss of exactly that size.
    limit = min(eb * (1.0 - 2.0**-16), _FLT_MAX)
    limit32 = np.float32(limit)
    if float(limit32) > limit:
        limit32 = np.nextafter(limit32, np.float32(0))
    torch.gt(a, float(limit32), out=work.sus)
    suspect = np.flatnonzero(work.sus.numpy())
    outlier_idx = np.zeros(0, dtype=np.int64)
    if len(suspect):
        st = torch.from_numpy(suspect)
        wt_s = wt[st]
        q_s = q[st].double().numpy()
        # First the exact check, then the other neighbour code (w near the midpoint of two codes),
        # then give up: outlier.
        fails = _misses_bound(q_s, wt_s, radius, step32, eb)
        x_s = wt_s.double().numpy() / float(step32)
        q_alt = q_s + np.where(x_s >= q_s, 1.0, -1.0)
        alt_ok = fails & ~_misses_bound(q_alt, wt_s, radius, step32, eb)
        q[torch.from_numpy(suspect[alt_ok])] = torch.from_numpy(q_alt[alt_ok]).float()
        out = fails & ~alt_ok
        outlier_idx = suspect[out].astype(np.int64)
        q[torch.from_numpy(outlier_idx)] = 0.0
        new = np.where(alt_ok, q_alt, np.where(out, 0.0, q_s))
        np.add.at(sym_hist, q_s.astype(np.int64) + radius, -1)
        np.add.at(sym_hist, new.astype(np.int64) + radius, 1)
    work.sym.copy_(q).add_(radius)
    return step32, radius, outlier_idx, sym_hist


def _misses_bound(q: np.ndarray, w: Tensor, radius: int, step32: np.float32, eb: float) -> np.ndarray:
    """Per element: |q| > radius, or for some output dtype d the decoded value
    d(float32(q) * step32) is farther from w than max(eb, |d(w) - w|) (what an outlier gives)."""
    recon = torch.from_numpy(np.clip(q, -radius, radius).astype(np.float32)) * torch.tensor(step32)
    return (np.abs(q) > radius) | _exceeds(recon, w, eb)


def _exceeds(v: Tensor, w: Tensor, eb: float) -> np.ndarray:
    """Per element: for some output dtype d, |d(v) - w| > max(eb, |d(w) - w|), compared in float64."""
    out = np.zeros(w.numel(), dtype=bool)
    w64 = w.double()
    for d in FLOAT_DTYPES:
        floor = (w.to(d).double() - w64).abs().clamp(min=eb)
        out |= ((v.to(d).double() - w64).abs() > floor).numpy()
    return out


def _outlier_values(wt: Tensor, outlier_idx: np.ndarray, eb: float, dtype: torch.dtype) -> Tensor:
    """The narrowest of bf16 / fp16 / w's dtype that keeps every outlier within the bound in every
    output dtype (bf16 usually does when the bound is not far below |w| / 256)."""
    vals = wt[torch.from_numpy(outlier_idx)].clone()
    if dtype == torch.float32 and len(vals):
        for narrow in (torch.bfloat16, torch.float16):
            if not _exceeds(vals.to(narrow), vals, eb).any():
                return vals.to(narrow)
    return vals


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
