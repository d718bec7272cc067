"""The SZ family: error-bounded weight compression (linear quantization + chunked canonical Huffman).

This file is the family's spec: the format object (`SZTensor`) and its byte format, the encoder
(`sz_compress`, CPU) and the two CPU decoders (the bit-by-bit reference and a vectorized one).

    c = sz_compress(w, 1e-3)            # |sz_decompress(c) - w| <= 1e-3, element by element
    c = sz_compress(w, 1e-2, "rel")     # bound = 1e-2 * (max(w) - min(w))
    blob = c.to_bytes(); c = SZTensor.from_bytes(blob)

Codes: q = round(w / (2 eb)) (no predictor), reconstruction float32(q) * float32(2 eb) rounded to
the output dtype. The codes are Huffman coded (canonical, code length <= 12 bits) in independent,
byte-aligned chunks of `chunk_size` symbols with a table of chunk offsets, so every chunk decodes
on its own (one GPU lane per chunk). Elements whose code is outside the alphabet (|q| > radius) or
whose reconstruction, rounded to fp32, fp16 or bf16, would miss the bound are stored exactly as
outliers (index + original value); in the stream they carry the code 0. See docs/sz.md.

Decoders, bit-identical: `decode_reference` (bit-by-bit canonical decode, the spec),
`decode_vectorized` (numpy pointer-jumping over a table lookup at every bit position) and the
Triton kernel in lowbit.kernels.sz (CUDA, or CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._validate import FLOAT_DTYPES, check_choice, check_finite, check_float_tensor, check_has_values
from ._entropy import (
    MAX_LEN,
    gaps,
    varint_decode,
    varint_encode,
    varint_len,
    canonical_codes,
    decode_table,
    huffman_lengths,
)

MAGIC = b"LBSZ"
VERSION = 1
MAX_RADIUS = 511  # alphabet: codes -511..511 (1023 symbols); larger |code| are outliers
MODES = ("abs", "rel")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_BIT = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 4}
_HEAD = struct.Struct("<4sBBBBB")  # magic, version, dtype, mode, ndim, max_len
_PARAMS = struct.Struct("<ddfIIB")  # error_bound, bound, step, chunk_size, radius, dtype_mask
_COUNT = struct.Struct("<QQB")  # outliers, bytes of their index gaps, value dtype
_CRC = struct.Struct("<I")


# --------------------------------------------------------------------------- container


@dataclass
class SZTensor:
    """A compressed tensor. Fields are numpy arrays (and one torch tensor for outlier values)."""

    shape: tuple
    dtype: torch.dtype  # dtype that was compressed; outlier values are stored in it
    mode: str
    error_bound: float  # the argument given to sz_compress
    bound: float  # absolute bound that holds element by element
    step: float  # float32 value of 2 * bound (the decoders multiply codes by it in fp32)
    chunk_size: int
    max_len: int
    radius: int
    dtype_mask: int  # bit 0/1/2: |out - w| <= bound holds for every element in fp32/fp16/bf16
    lengths: np.ndarray  # uint8[2 * radius + 1], Huffman code length per symbol (code = symbol - radius)
    offsets: np.ndarray  # int64[n_chunks + 1], byte offset of each chunk in payload
    outlier_idx: np.ndarray  # int64, strictly increasing flat indices
    outlier_val: Tensor  # values (self.dtype, or narrower when that keeps the bound), CPU
    payload: np.ndarray  # uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk_size)

    def bound_holds(self, dtype: torch.dtype) -> bool:
        """Whether max |decompress(dtype) - w| <= bound (else some w is not representable within
        the bound in `dtype` at all; those elements come out as w rounded to dtype)."""
        return bool(self.dtype_mask & DTYPE_BIT[dtype])

    @property
    def nbytes(self) -> int:
        """Exactly len(self.to_bytes())."""
        return (
            _HEAD.size + 8 * len(self.shape) + _PARAMS.size + (len(self.lengths) + 1) // 2 + _COUNT.size
            + varint_len(gaps(self.outlier_idx)) + len(self.outlier_idx) * self.outlier_val.element_size()
            + 4 * self.n_chunks + len(self.payload) + _CRC.size
        )

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to_bytes(self) -> bytes:
        lengths = np.zeros(2 * ((len(self.lengths) + 1) // 2), dtype=np.uint8)
        lengths[: len(self.lengths)] = self.lengths
        nibbles = (lengths[0::2] << 4) | lengths[1::2]
        gap_bytes = varint_encode(gaps(self.outlier_idx))
        vals = self.outlier_val.contiguous().view(torch.uint8)
        parts = [
            _HEAD.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], MODES.index(self.mode), len(self.shape), self.max_len),
            struct.pack(f"<{len(self.shape)}Q", *self.shape),
            _PARAMS.pack(self.error_bound, self.bound, self.step, self.chunk_size, self.radius, self.dtype_mask),
            nibbles.tobytes(),
            _COUNT.pack(len(self.outlier_idx), len(gap_bytes), DTYPE_CODES[self.outlier_val.dtype]),
            gap_bytes,
            vals.numpy().tobytes(),
            self.offsets[1:].astype("<u4").tobytes(),
            self.payload.tobytes(),
        ]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "SZTensor":
        """Parse and validate; raises ValueError on truncated, corrupted or unsupported input."""
        data = bytes(data)
        if len(data) < len(MAGIC) or data[:4] != MAGIC:
            raise ValueError(f"data is not an lowbit SZ stream: expected magic {MAGIC!r}, got {data[:4]!r}")
        if len(data) < _HEAD.size + _PARAMS.size + _COUNT.size + _CRC.size:
            raise ValueError(f"SZ stream truncated: {len(data)} bytes is shorter than the fixed header")
        (crc,) = _CRC.unpack_from(data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise ValueError(
                f"SZ stream corrupted or truncated: CRC32 mismatch over {len(data)} bytes "
                f"(stored {crc:#010x}, computed {zlib.crc32(data[:-4]):#010x})"
            )
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > len(data) - 4:
                raise ValueError(f"SZ stream truncated: need {n} bytes for {what} at offset {pos}, "
                                 f"have {len(data) - 4 - pos}")
            out = data[pos:pos + n]
            pos += n
            return out

        _, version, dcode, mcode, ndim, max_len = _HEAD.unpack(take(_HEAD.size, "header"))
        if version != VERSION:
            raise ValueError(f"unsupported SZ stream version {version} (this lowbit reads {VERSION})")
        if dcode not in CODE_DTYPES or mcode >= len(MODES):
            raise ValueError(f"SZ stream has invalid dtype code {dcode} or mode code {mcode}")
        shape = struct.unpack(f"<{ndim}Q", take(8 * ndim, "shape"))
        eb, bound, step, chunk, radius, mask = _PARAMS.unpack(take(_PARAMS.size, "parameters"))
        if radius > MAX_RADIUS:
            raise ValueError(f"SZ stream radius {radius} exceeds {MAX_RADIUS}")
        nsym = 2 * radius + 1
        nib = np.frombuffer(take((nsym + 1) // 2, "code lengths"), dtype=np.uint8)
        lengths = np.stack([nib >> 4, nib & 15], axis=1).reshape(-1)[:nsym].copy()
        nout, ngap, vcode = _COUNT.unpack(take(_COUNT.size, "outlier count"))
        dtype = CODE_DTYPES[dcode]
        numel = math.prod(shape)
        if vcode not in CODE_DTYPES or nout > numel:
            raise ValueError(f"SZ stream has invalid outlier dtype code {vcode} or count {nout}")
        idx = np.cumsum(varint_decode(np.frombuffer(take(ngap, "outlier indices"), dtype=np.uint8), nout))
        vdtype = CODE_DTYPES[vcode]
        raw = bytearray(take(nout * (4 if vdtype == torch.float32 else 2), "outlier values"))
        vals = torch.frombuffer(raw, dtype=vdtype) if nout else torch.empty(0, dtype=vdtype)
        if chunk <= 0:
            raise ValueError(f"SZ stream chunk_size must be positive, got {chunk}")
        n_chunks = -(-numel // chunk)
        ends = np.frombuffer(take(4 * n_chunks, "chunk offsets"), dtype="<u4").astype(np.int64)
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        payload = np.frombuffer(take(int(offsets[-1]), "payload"), dtype=np.uint8).copy()
        if pos != len(data) - 4:
            raise ValueError(f"SZ stream has {len(data) - 4 - pos} unexpected trailing bytes")
        c = cls(tuple(int(s) for s in shape), dtype, MODES[mcode], eb, bound, step, chunk, max_len, radius, mask,
                lengths, offsets, idx, vals, payload)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise ValueError unless the fields are consistent (so the decoders stay in bounds)."""
        def bad(msg: str):
            raise ValueError(f"invalid SZ stream: {msg}")

        if self.numel <= 0:
            bad(f"shape {self.shape} has no elements")
        if not 1 <= self.max_len <= MAX_LEN:
            bad(f"max_len {self.max_len} not in [1, {MAX_LEN}]")
        if self.chunk_size < 16 or self.chunk_size > 2**20 or self.chunk_size & (self.chunk_size - 1):
            bad(f"chunk_size {self.chunk_size} is not a power of two in [16, 2**20]")
        if not (math.isfinite(self.step) and self.step > 0 and math.isfinite(self.bound) and self.bound > 0):
            bad(f"step {self.step} / bound {self.bound} must be finite and positive")
        if len(self.lengths) != 2 * self.radius + 1 or int(self.lengths.max()) > self.max_len:
            bad("code lengths do not match the radius or exceed max_len")
        used = self.lengths[self.lengths > 0].astype(np.int64)
        if len(used) == 0 or np.sum(2.0 ** -used) > 1.0:
            bad("code lengths do not form a prefix code (Kraft sum > 1 or no symbols)")
        if len(self.offsets) != self.n_chunks + 1 or np.any(np.diff(self.offsets) < 0) or self.offsets[0] != 0:
            bad("chunk offsets are not non-decreasing from 0")
        if self.offsets[-1] != len(self.payload):
            bad("last chunk offset does not match the payload length")
        if len(self.outlier_idx) != self.outlier_val.numel() or self.outlier_val.dtype not in DTYPE_CODES:
            bad("outlier indices and values differ in count, or the values are not fp32/fp16/bf16")
        if len(self.outlier_idx) and (
            self.outlier_idx[0] < 0 or self.outlier_idx[-1] >= self.numel or np.any(np.diff(self.outlier_idx) <= 0)
        ):
            bad("outlier indices are not strictly increasing within [0, numel)")

    # tensors for the decoders
    def decoder_args(self, device=None) -> tuple:
        dev = torch.device("cpu") if device is None else torch.device(device)
        return (
            torch.from_numpy(self.payload).to(dev),
            torch.from_numpy(self.offsets).to(dev),
            torch.from_numpy(decode_table(self.lengths, self.max_len)).to(dev),
            torch.tensor([self.step], dtype=torch.float32, device=dev),
            torch.from_numpy(self.outlier_idx).to(dev),
            self.outlier_val.to(dev),
        )


# --------------------------------------------------------------------------- encoder


# Fractions by which the step may be narrowed below 2*eb (0 first: plain SZ quantization).
STEP_SHRINKS = (0.0, 0.01, 0.02, 0.04)


def check_error_bound(error_bound, mode: str = "abs") -> float:
    """A finite, positive bound as a float; a relative bound ("rel") must also be < 1 (a bound of
    the whole value range or more would let every element decode to one constant)."""
    if isinstance(error_bound, bool) or not isinstance(error_bound, (int, float)):
        raise TypeError(f"error_bound must be a float, got {type(error_bound).__name__}")
    eb = float(error_bound)
    if not (math.isfinite(eb) and eb > 0):
        raise ValueError(f"error_bound must be finite and > 0, got {error_bound!r}")
    if mode == "rel" and eb >= 1.0:
        raise ValueError(f"error_bound must be < 1 with mode='rel' (a fraction of the value range), got {error_bound!r}")
    return eb


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 16 or chunk_size > 2**20 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in [16, 2**20], got {chunk_size}")
    return chunk_size


def sz_compress(w: Tensor, error_bound: float, mode: str = "abs", chunk_size: int = 4096) -> SZTensor:
    """Compress `w` (fp32/fp16/bf16, finite, non-empty) so that every element decompresses within
    the bound: `error_bound` ("abs") or `error_bound * (max(w) - min(w))` ("rel").

    The bound holds element by element in fp32, fp16 and bf16 output wherever the dtype can hold
    w within the bound at all (`SZTensor.bound_holds(dtype)`); otherwise such elements come out
    as w rounded to that dtype."""
    check_float_tensor("w", w)
    check_has_values("w", w)
    check_choice("mode", mode, MODES)
    eb_arg = check_error_bound(error_bound, mode)
    check_chunk_size(chunk_size)
    check_finite("w", w)
    wt = w.detach().to("cpu").contiguous().reshape(-1)
    w64 = wt.double().numpy()
    if mode == "rel":
        rng = float(w64.max() - w64.min())
        # A constant tensor has no range: scale by its magnitude instead (or 1 for all zeros).
        eb = eb_arg * (rng if rng > 0 else max(float(np.abs(w64).max()), 1.0))
        if not (math.isfinite(eb) and eb > 0):
            raise ValueError(f"error_bound={error_bound!r} gives an absolute bound {eb} that is not finite and > 0")
    else:
        eb = eb_arg
    # The step (bin width) defaults to 2*eb; a slightly narrower one leaves room for the rounding
    # of reconstructions to bf16/fp16, which turns fewer elements into outliers (~30 bits each)
    # at ~1.44*shrink bits/param more for the codes. Try a few, keep the smallest stream.
    best = None
    for shrink in STEP_SHRINKS:
        c = _compress_with_step(w, wt, w64, mode, eb_arg, eb, chunk_size, 2.0 * eb * (1.0 - shrink))
        if best is None or c.nbytes < best.nbytes:
            best = c
    if best.nbytes > w.numel() * w.element_size():
        warnings.warn(
            f"sz_compress: the stream ({best.nbytes} bytes) is larger than the input ({w.numel() * w.element_size()} "
            f"bytes): error_bound={error_bound!r} is too tight for this tensor to compress", stacklevel=2)
    return best


def _compress_with_step(w: Tensor, wt: Tensor, w64: np.ndarray, mode: str, eb_arg: float, eb: float,
                        chunk_size: int, step: float) -> SZTensor:
    # step: float32, kept finite and non-zero (the per-element check below keeps the bound).
    step32 = np.float32(min(step, 2.0**127))
    step32 = max(step32, np.float32(2.0**-149))
    x = w64 / float(step32)
    q = np.rint(x)
    # Alphabet radius: each symbol costs half a byte of code-length table, each |q| beyond the
    # radius an outlier (index + value); take the cheapest radius <= MAX_RADIUS.
    hist = np.bincount(np.minimum(np.abs(q), MAX_RADIUS + 1).astype(np.int64), minlength=MAX_RADIUS + 2)
    beyond = len(q) - np.cumsum(hist)[: MAX_RADIUS + 1]
    r = np.arange(MAX_RADIUS + 1)
    radius = int(np.argmin((2 * r + 1) * 0.5 + beyond * (1.5 + wt.element_size() + 0.5)))
    # float32(q) * step32, rounded once (numpy and torch both multiply IEEE fp32, as the decoders do)
    recon = np.clip(q, -radius, radius).astype(np.float32) * step32
    # Elements that could miss the bound in some output dtype: out of range, past fp16's range, or
    # closer to the bound than rounding the reconstruction to bf16 (relative half ulp 2**-8) or to
    # fp16 (absolute half ulp 2**-25 among subnormals) could move them. The rest are safe.
    err = np.abs(recon.astype(np.float64) - w64)
    arec = np.abs(recon).astype(np.float64)
    suspect = np.flatnonzero((np.abs(q) > radius) | (arec >= 65504.0) | (err > eb - arec * 2.0**-8 - 2.0**-25))
    wt_s = wt[torch.from_numpy(suspect)]
    # First try the other neighbour code (w near the midpoint of two codes), then give up: outlier.
    q_s = q[suspect]
    fails = _misses_bound(q_s, wt_s, radius, step32, eb)
    q_alt = q_s + np.where(x[suspect] >= q_s, 1.0, -1.0)
    alt_ok = fails & ~_misses_bound(q_alt, wt_s, radius, step32, eb)
    q[suspect[alt_ok]] = q_alt[alt_ok]
    outlier_idx = suspect[fails & ~alt_ok].astype(np.int64)
    q[outlier_idx] = 0
    q = q.astype(np.int64)
    mask = 0
    amax = float(np.abs(w64).max())
    for d, bits, sub in ((torch.float32, 24, 2.0**-150), (torch.float16, 11, 2.0**-25), (torch.bfloat16, 8, 2.0**-134)):
        # Whether w itself is within the bound in dtype d (cheap sufficient test first).
        cheap = amax * 2.0**-bits + sub <= eb and amax < 65504.0
        if cheap or float((wt.to(d).double() - wt.double()).abs().max()) <= eb:
            mask |= DTYPE_BIT[d]
    sym = q + radius
    lengths = huffman_lengths(np.bincount(sym, minlength=2 * radius + 1), MAX_LEN)
    payload, offsets = _encode(sym, lengths, chunk_size)
    if offsets[-1] >= 2**32:
        raise ValueError("w is too large: the compressed payload must stay below 4 GiB")
    # Outlier values: the narrowest of bf16 / fp16 / w's dtype that keeps every outlier within the
    # bound in every output dtype (bf16 usually does when the bound is not far below |w| / 256).
    vals = wt[torch.from_numpy(outlier_idx)].clone()
    if w.dtype == torch.float32 and len(vals):
        for narrow in (torch.bfloat16, torch.float16):
            if not _exceeds(vals.to(narrow), vals, eb).any():
                vals = vals.to(narrow)
                break
    return SZTensor(
        tuple(w.shape), w.dtype, mode, eb_arg, eb, float(step32), chunk_size, MAX_LEN, radius, mask, lengths,
        offsets, outlier_idx, vals, payload,
    )


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


def _encode(sym: np.ndarray, lengths: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the code words of `sym` MSB first, each chunk starting on a byte boundary."""
    n = len(sym)
    codes = canonical_codes(lengths)
    ln = lengths.astype(np.int64)[sym]
    cw = codes[sym]
    n_chunks = -(-n // chunk)
    lp = np.zeros(n_chunks * chunk, dtype=np.int64)
    lp[:n] = ln
    lp = lp.reshape(n_chunks, chunk)
    chunk_bytes = (lp.sum(axis=1) + 7) // 8
    offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    np.cumsum(chunk_bytes, out=offsets[1:])
    pos = (offsets[:-1, None] * 8 + np.cumsum(lp, axis=1) - lp).reshape(-1)[:n]
    bits = np.zeros(int(offsets[-1]) * 8, dtype=np.uint8)
    for j in range(int(lengths.max())):
        m = ln > j
        bits[pos[m] + j] = (cw[m] >> (ln[m] - 1 - j)) & 1
    return np.packbits(bits), offsets


# --------------------------------------------------------------------------- decoders


def _reconstruct(codes: Tensor, step: float, outlier_idx: Tensor, outlier_val: Tensor, dtype: torch.dtype) -> Tensor:
    """float32(code) * float32(step), rounded to dtype; outliers overwrite their positions."""
    out = (codes.to(torch.float32) * torch.tensor(step, dtype=torch.float32, device=codes.device)).to(dtype)
    if outlier_idx.numel():
        out[outlier_idx] = outlier_val.to(dtype)
    return out


def decode_reference(c: SZTensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The spec: read each chunk bit by bit, MSB first, matching canonical code words. Slow."""
    dtype = c.dtype if dtype is None else dtype
    codes = canonical_codes(c.lengths)
    words = {(int(c.lengths[s]), int(codes[s])): s for s in np.flatnonzero(c.lengths)}
    bits = np.unpackbits(c.payload)
    out = np.zeros(c.numel, dtype=np.int64)
    for k in range(c.n_chunks):
        pos = int(c.offsets[k]) * 8
        end = int(c.offsets[k + 1]) * 8
        for i in range(k * c.chunk_size, min((k + 1) * c.chunk_size, c.numel)):
            word, ln = 0, 0
            while True:
                if pos >= end or ln >= c.max_len:
                    raise ValueError(f"invalid SZ stream: chunk {k} does not decode")
                word = (word << 1) | int(bits[pos])
                pos += 1
                ln += 1
                if (ln, word) in words:
                    break
            out[i] = words[(ln, word)] - c.radius
    flat = _reconstruct(torch.from_numpy(out), c.step, torch.from_numpy(c.outlier_idx), c.outlier_val, dtype)
    return flat.view(c.shape)


def _symbols_vectorized(payload: np.ndarray, offsets: np.ndarray, table: np.ndarray, numel: int, chunk: int,
                        max_len: int) -> np.ndarray:
    """Symbols of every chunk, vectorized: a table lookup at every bit position gives each position's
    successor; pointer jumping (successor of successor, ...) then walks all chunks at once."""
    bits = np.unpackbits(payload)
    nb = bits.size  # position nb is a sink: reads zeros, stays put
    padded = np.concatenate([bits, np.zeros(max_len + 1, dtype=np.uint8)])
    win = np.zeros(nb + 1, dtype=np.int32)
    for j in range(max_len):
        win = (win << 1) | padded[j:j + nb + 1]
    entry = table[win]
    jump = np.minimum(np.arange(nb + 1, dtype=np.int64) + (entry & 15), nb)  # 1 symbol ahead
    pos = np.minimum(offsets[:-1] * 8, nb)[None, :]  # [steps, n_chunks]
    steps = 1
    while steps < chunk:
        pos = np.concatenate([pos, jump[pos]], axis=0)
        steps *= 2
        if steps < chunk:
            jump = jump[jump]  # now `steps` symbols ahead
    return (entry[pos] >> 4).T.reshape(-1)[:numel]


def decode_vectorized(payload: Tensor, offsets: Tensor, table: Tensor, step: Tensor, outlier_idx: Tensor,
                      outlier_val: Tensor, numel: int, chunk_size: int, max_len: int, radius: int,
                      dtype: torch.dtype) -> Tensor:
    payload_np, offsets_np, table_np = payload.cpu().numpy(), offsets.cpu().numpy(), table.cpu().numpy()
    n_chunks = len(offsets_np) - 1
    # Groups of chunks of at most ~4 Mbit of payload each, to bound the per-bit-position arrays.
    group = max(1, (1 << 19) // max(1, int(offsets_np[-1]) // max(1, n_chunks) + 1))
    parts = []
    for g0 in range(0, n_chunks, group):
        g1 = min(n_chunks, g0 + group)
        sub = offsets_np[g0:g1 + 1]
        parts.append(_symbols_vectorized(payload_np[sub[0]:sub[-1]], sub - sub[0], table_np,
                                         min(g1 * chunk_size, numel) - g0 * chunk_size, chunk_size, max_len))
    sym = np.concatenate(parts)
    codes = torch.from_numpy(sym.astype(np.int32) - radius)
    out = _reconstruct(codes, float(step.cpu()[0]), outlier_idx.cpu(), outlier_val.cpu(), dtype)
    return out.to(payload.device)
