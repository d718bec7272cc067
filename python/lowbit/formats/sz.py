"""The SZ family: error-bounded weight compression (linear quantization + canonical Huffman coded in
many interleaved lanes).

This file is the family's spec: the format object (`SZTensor`) and its byte format (version 2),
the encoder (`sz_compress`, CPU) and the two CPU decoders (the bit-by-bit reference and a
vectorized one). Version-1 streams still load: they are re-packed as version 2 (`_sz_v1.py`).

    c = sz_compress(w, 1e-3)            # |sz_decompress(c) - w| <= 1e-3, element by element
    c = sz_compress(w, 1e-2, "rel")     # bound = 1e-2 * (max(w) - min(w))
    blob = c.to_bytes(); c = SZTensor.from_bytes(blob)

Codes: q = round(w / step) with step = float32(2 eb) (or up to 4 % narrower, whichever stream is
smallest), no predictor; reconstruction float32(q) * step rounded to the output dtype. Elements
whose code is outside the alphabet or whose reconstruction, rounded to fp32, fp16 or bf16, would
miss the bound are stored exactly as outliers (index + value) and carry the code 0.

Stream layout (version 2): the flat tensor is cut into chunks of `chunk_size` elements (whole rows
of a 2-D weight when they fit), and every chunk is coded by `lanes` interleaved lanes: lane j
codes the elements j, j + lanes, j + 2 lanes, ... of its chunk, one canonical Huffman code word
(<= 12 bits) per element, written LSB first into little-endian u32 words, lane after lane with no
padding. An index holds each lane's length in bits, so a GPU thread per lane starts at the prefix
sum and stores contiguous outputs with its neighbours at every step. See docs/sz.md.

Decoders, bit-identical: `decode_reference` (bit-by-bit canonical decode, the spec),
`decode_vectorized` (numpy, all lanes in lockstep with a 12-bit table) and the Triton kernel in
lowbit.kernels.sz (CUDA, or CPU under TRITON_INTERPRET=1). The encoder's inner loops are in
_sz_encode.py (numpy/torch, and the same in C in lowbit/csrc/sz_encode.c, used when the CPU
kernels are built: the same bytes), the version-1 reader in _sz_v1.py.

This file is over 500 lines: the container, its byte format, the layout rule and the two CPU
decoders are one spec, read together.
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

from .._validate import check_choice, check_finite, check_float_tensor, check_has_values
from . import _sz_v1
from ._sz_columns import REFS as IMPORTANCE_REFS
from ._sz_columns import (DEFAULT_ALPHA, MAX_SHIFT, check_alpha, check_columns, check_exponents, check_input_moments,
                          column_bounds, column_exponents, pow2, scale_columns)
from ._sz_encode import (DTYPE_BIT, MAX_RADIUS, _dtype_mask, _lane_bits, _outlier_values, _pack_payload, _quantize,
                         _Work, code_lengths, fast_library, lane_bits, pack_payload)
from ._entropy import (
    MAX_LEN,
    canonical_codes,
    decode_table_lsb,
    gaps,
    kraft_sum,
    pack_fixed,
    unpack_fixed,
    varint_decode,
    varint_encode,
    varint_len,
)

MAGIC = b"LBSZ"
VERSION = 2  # written; version 1 is still read (and re-packed as 2)
MAX_LANES = 1024  # lanes per chunk
MAX_LANE_SYMBOLS = 1 << 22
TARGET_LANES = 32768  # lanes the layout aims at (GPU parallelism) when the tensor is big enough
MODES = ("abs", "rel")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_HEAD = struct.Struct("<4sBBBBB")  # magic, version, dtype, mode, ndim, max_len (same in v1)
_PARAMS = struct.Struct("<ddfIBQIQ")  # error_bound, bound, step, radius, dtype_mask, chunk, lanes, payload bits
_COUNT = struct.Struct("<QQB")  # outliers, bytes of their index gaps, value dtype
_INDEX = struct.Struct("<IB")  # lane length prediction (1/256 bit per symbol), residual width
_CRC = struct.Struct("<I")


# --------------------------------------------------------------------------- layout


SMALL_TENSOR = 1 << 21  # elements; below, a GPU decode takes microseconds whatever the layout


def lane_target(numel: int) -> int:
    """Symbols per lane the encoder aims at: the most (the smallest lane index, 16 bits / S per
    element) that still gives TARGET_LANES lanes, 256..1024. Tensors below SMALL_TENSOR elements
    can not fill a GPU anyway: 1024 (the index then costs ~0.008 bits/param)."""
    if numel < SMALL_TENSOR:
        return 1024
    for s in (1024, 512):
        if numel >= TARGET_LANES * s:
            return s
    return 256


def choose_layout(shape: tuple, max_symbols: int = 1 << 20) -> tuple[int, int]:
    """(chunk_size, lanes) for a tensor of `shape`, at most `max_symbols` symbols per lane.

    2-D and up, K = shape[-1]: lanes = a power of two dividing K (>= 32 when K allows, so that a
    warp's stores are contiguous), chunks of whole rows, about the target symbols per lane. When
    K has no fitting power of two (odd K much longer than the target), and for 1-D tensors, the
    flat layout: up to 32 lanes over chunks of lanes * target elements."""
    numel = math.prod(shape)
    s_t = max(1, min(lane_target(numel), max_symbols))
    if len(shape) >= 2:
        k = int(shape[-1])
        rows = numel // k
        p2 = min(k & -k, MAX_LANES)
        want = 1 << max(0, round(math.log2(max(k / s_t, 1.0))))
        lanes = min(p2, max(32, want))
        g = min(rows, max(1, s_t * lanes // k))  # rows per chunk
        if g * k // lanes <= 2 * s_t:
            return g * k, lanes
    lanes = 1 << int(math.log2(max(1, min(32, numel // s_t))))
    return lanes * s_t, lanes


def lane_counts(numel: int, chunk: int, lanes: int) -> np.ndarray:
    """int64[n_chunks * lanes]: symbols of every lane (all chunk // lanes but in a short last chunk)."""
    n_chunks = -(-numel // chunk)
    counts = np.full((n_chunks, lanes), chunk // lanes, dtype=np.int64)
    last = numel - (n_chunks - 1) * chunk
    counts[-1] = np.maximum((last - np.arange(lanes) + lanes - 1) // lanes, 0)
    return counts.reshape(-1)


def _index_params(lane_bits: np.ndarray, counts: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(rate, width, residuals) of the lane index: lane length = (count * rate >> 8) + residual,
    rate the lowest bits per symbol of any lane in 1/256 bit, residuals `width` bits each."""
    full = counts > 0
    rate = int(np.min((lane_bits[full] * 256) // counts[full])) if full.any() else 0
    res = lane_bits - ((counts * rate) >> 8)
    return rate, int(res.max(initial=0)).bit_length(), res


def _offsets(lane_bits: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lane_bits) + 1, dtype=np.int64)
    np.cumsum(lane_bits, out=out[1:])
    return out.astype(np.int32) if out[-1] < 2**31 else out


# --------------------------------------------------------------------------- container


@dataclass
class SZTensor:
    """A compressed tensor (stream version 2). Arrays are numpy; outlier values a CPU tensor."""

    shape: tuple
    dtype: torch.dtype  # dtype that was compressed
    mode: str
    error_bound: float  # the argument given to sz_compress
    bound: float  # absolute bound that holds element by element
    step: float  # float32 value of the bin width (the decoders multiply codes by it in fp32)
    radius: int
    dtype_mask: int  # bit 0/1/2: |out - w| <= bound holds for every element in fp32/fp16/bf16
    lengths: np.ndarray  # uint8[2 * radius + 1], code length per symbol (code = symbol - radius)
    chunk_size: int  # elements per chunk
    lanes: int  # interleaved lanes per chunk
    lane_bits: np.ndarray  # int64[n_chunks * lanes], bits of every lane, in stream order
    outlier_idx: np.ndarray  # int64, strictly increasing flat indices
    outlier_val: Tensor  # values (self.dtype, or narrower when that keeps the bound), CPU
    payload: np.ndarray  # uint32 words, LSB first
    payload_bits: int
    max_len: int = MAX_LEN

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk_size)

    @property
    def n_lanes(self) -> int:
        return self.n_chunks * self.lanes

    @property
    def lane_symbols(self) -> int:
        return self.chunk_size // self.lanes

    def lane_start(self) -> np.ndarray:
        """[n_lanes + 1]: bit offset of every lane in the payload, then the total; int32 when the
        payload has fewer than 2**31 bits (what the decoders keep in device memory), else int64."""
        return _offsets(self.lane_bits)

    def bound_holds(self, dtype: torch.dtype) -> bool:
        """Whether max |decompress(dtype) - w| <= bound (else some w is not representable within
        the bound in `dtype` at all; those elements come out as w rounded to dtype)."""
        return bool(self.dtype_mask & DTYPE_BIT[dtype])

    @property
    def index_nbytes(self) -> int:
        """Bytes of the lane index in to_bytes() (its 5-byte header included)."""
        _, width, _ = _index_params(self.lane_bits, lane_counts(self.numel, self.chunk_size, self.lanes))
        return _INDEX.size + (len(self.lane_bits) * width + 7) // 8

    @property
    def nbytes(self) -> int:
        """Exactly len(self.to_bytes())."""
        return (
            _HEAD.size + 8 * len(self.shape) + _PARAMS.size + (len(self.lengths) + 1) // 2 + _COUNT.size
            + varint_len(gaps(self.outlier_idx)) + len(self.outlier_idx) * self.outlier_val.element_size()
            + self.index_nbytes + 4 * ((self.payload_bits + 31) // 32) + _CRC.size
        )

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to_bytes(self) -> bytes:
        self.validate()
        lengths = np.zeros(2 * ((len(self.lengths) + 1) // 2), dtype=np.uint8)
        lengths[: len(self.lengths)] = self.lengths
        nibbles = (lengths[0::2] << 4) | lengths[1::2]
        rate, width, index = lane_index(self)
        parts = [
            _HEAD.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], MODES.index(self.mode), len(self.shape), self.max_len),
            struct.pack(f"<{len(self.shape)}Q", *self.shape),
            _PARAMS.pack(self.error_bound, self.bound, self.step, self.radius, self.dtype_mask, self.chunk_size,
                         self.lanes, self.payload_bits),
            nibbles.tobytes(),
            _COUNT.pack(len(self.outlier_idx), varint_len(gaps(self.outlier_idx)), DTYPE_CODES[self.outlier_val.dtype]),
            varint_encode(gaps(self.outlier_idx)),
            self.outlier_val.contiguous().view(torch.uint8).numpy().tobytes(),
            _INDEX.pack(rate, width),
            index.tobytes(),
            self.payload.astype("<u4").tobytes(),
        ]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "SZTensor":
        """Parse and validate; raises ValueError on truncated, corrupted or unsupported input.
        Version-1 streams are re-packed as version 2 (same codes, same values)."""
        data = bytes(data)
        if len(data) < len(MAGIC) or data[:4] != MAGIC:
            raise ValueError(f"data is not an lowbit SZ stream: expected magic {MAGIC!r}, got {data[:4]!r}")
        if len(data) < _HEAD.size + _CRC.size + 16:
            raise ValueError(f"SZ stream truncated: {len(data)} bytes is shorter than the fixed header")
        (crc,) = _CRC.unpack_from(data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise ValueError(
                f"SZ stream corrupted or truncated: CRC32 mismatch over {len(data)} bytes "
                f"(stored {crc:#010x}, computed {zlib.crc32(data[:-4]):#010x})"
            )
        version = data[4]
        if version == 1:
            return from_v1(_sz_v1.parse(data))
        if version != VERSION:
            raise ValueError(f"unsupported SZ stream version {version} (this lowbit reads 1 and {VERSION})")
        return cls._parse_v2(data)

    @classmethod
    def _parse_v2(cls, data: bytes) -> "SZTensor":
        pos = 0
        end = len(data) - 4

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > end:
                raise ValueError(f"SZ stream truncated: need {n} bytes for {what} at offset {pos}, have {end - pos}")
            out = data[pos:pos + n]
            pos += n
            return out

        _, _, dcode, mcode, ndim, max_len = _HEAD.unpack(take(_HEAD.size, "header"))
        if dcode not in CODE_DTYPES or mcode >= len(MODES):
            raise ValueError(f"SZ stream has invalid dtype code {dcode} or mode code {mcode}")
        shape = tuple(int(s) for s in struct.unpack(f"<{ndim}Q", take(8 * ndim, "shape")))
        eb, bound, step, radius, mask, chunk, lanes, nbits = _PARAMS.unpack(take(_PARAMS.size, "parameters"))
        numel = math.prod(shape)
        # Every element costs >= 1 bit of payload: this bounds every array below by the input size.
        if numel <= 0 or numel > nbits or (nbits + 31) // 32 * 4 > end - pos:
            raise ValueError(f"SZ stream truncated or inconsistent: shape {shape} with {nbits} payload bits "
                             f"and {end - pos} bytes left")
        if radius > MAX_RADIUS:
            raise ValueError(f"SZ stream radius {radius} exceeds {MAX_RADIUS}")
        if not (1 <= lanes <= MAX_LANES and 1 <= chunk and chunk % lanes == 0 and chunk // lanes <= MAX_LANE_SYMBOLS):
            raise ValueError(f"SZ stream has an invalid layout: chunk_size {chunk}, lanes {lanes}")
        nsym = 2 * radius + 1
        nib = np.frombuffer(take((nsym + 1) // 2, "code lengths"), dtype=np.uint8)
        lengths = np.stack([nib >> 4, nib & 15], axis=1).reshape(-1)[:nsym].copy()
        nout, ngap, vcode = _COUNT.unpack(take(_COUNT.size, "outlier count"))
        if vcode not in CODE_DTYPES or nout > numel:
            raise ValueError(f"SZ stream has invalid outlier dtype code {vcode} or count {nout}")
        idx = np.cumsum(varint_decode(np.frombuffer(take(ngap, "outlier indices"), dtype=np.uint8), nout))
        vdtype = CODE_DTYPES[vcode]
        raw = bytearray(take(nout * (4 if vdtype == torch.float32 else 2), "outlier values"))
        vals = torch.frombuffer(raw, dtype=vdtype) if nout else torch.empty(0, dtype=vdtype)
        rate, width = _INDEX.unpack(take(_INDEX.size, "lane index"))
        if width > 32 or rate > 256 * MAX_LEN:
            raise ValueError(f"SZ stream has an invalid lane index (rate {rate}, width {width})")
        n_lanes = -(-numel // chunk) * lanes
        index = np.frombuffer(take((n_lanes * width + 7) // 8, "lane index"), dtype=np.uint8)
        lane_bits = lane_bits_from_index(index, numel, chunk, lanes, rate, width)
        payload = np.frombuffer(take((nbits + 31) // 32 * 4, "payload"), dtype="<u4").astype(np.uint32)
        if pos != end:
            raise ValueError(f"SZ stream has {end - pos} unexpected trailing bytes")
        c = cls(shape, CODE_DTYPES[dcode], MODES[mcode], eb, bound, step, radius, mask, lengths, chunk, lanes,
                lane_bits, idx, vals, payload, nbits, max_len)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise ValueError unless the fields are consistent (so the decoders stay in bounds)."""
        def bad(msg: str):
            raise ValueError(f"invalid SZ stream: {msg}")

        numel = self.numel
        if numel <= 0:
            bad(f"shape {self.shape} has no elements")
        if not 1 <= self.max_len <= MAX_LEN:
            bad(f"max_len {self.max_len} not in [1, {MAX_LEN}]")
        if not (math.isfinite(self.step) and self.step > 0 and math.isfinite(self.bound) and self.bound > 0):
            bad(f"step {self.step} / bound {self.bound} must be finite and positive")
        lengths = self.lengths
        if len(lengths) != 2 * self.radius + 1 or int(lengths.max()) > self.max_len:
            bad("code lengths do not match the radius or exceed max_len")
        used = int(np.count_nonzero(lengths))
        # A complete code (Kraft sum 1) decodes every bit pattern; a lone symbol has the code "0".
        if used == 0 or (used > 1 and kraft_sum(lengths) != 1.0) or (used == 1 and int(lengths.max()) != 1):
            bad("code lengths do not form a complete prefix code")
        if not (1 <= self.lanes <= MAX_LANES and self.chunk_size >= 1 and self.chunk_size % self.lanes == 0
                and self.chunk_size // self.lanes <= MAX_LANE_SYMBOLS):
            bad(f"layout chunk_size {self.chunk_size} / lanes {self.lanes}")
        counts = lane_counts(numel, self.chunk_size, self.lanes)
        lb = np.asarray(self.lane_bits)
        min_len = int(lengths[lengths > 0].min())
        if lb.shape != counts.shape or np.any(lb < counts * min_len) or np.any(lb > counts * self.max_len):
            bad("lane lengths do not fit their symbol counts (a lane would overrun or stop short)")
        if int(lb.sum()) != self.payload_bits or len(self.payload) != (self.payload_bits + 31) // 32:
            bad("lane lengths do not add up to the payload")
        if self.payload_bits % 32 and int(self.payload[-1]) >> (self.payload_bits % 32):
            bad("payload padding bits are not zero")
        if used == 1 and np.any(self.payload):
            bad("a one-symbol code with non-zero payload bits")
        if len(self.outlier_idx) != self.outlier_val.numel() or self.outlier_val.dtype not in DTYPE_CODES:
            bad("outlier indices and values differ in count, or the values are not fp32/fp16/bf16")
        if len(self.outlier_idx) and (
            self.outlier_idx[0] < 0 or self.outlier_idx[-1] >= numel or np.any(np.diff(self.outlier_idx) <= 0)
        ):
            bad("outlier indices are not strictly increasing within [0, numel)")

    # tensors for the decoders: (payload, lane_start, table, step, outlier_idx, outlier_val), then the
    # op takes numel, chunk_size, max_len, radius (lanes = (lane_start.numel() - 1) // n_chunks)
    def decoder_args(self, device=None) -> tuple:
        dev = torch.device("cpu") if device is None else torch.device(device)
        return (
            torch.from_numpy(self.payload.view(np.int32)).to(dev),
            torch.from_numpy(self.lane_start()).to(dev),
            torch.from_numpy(decode_table_lsb(self.lengths, self.max_len)).to(dev),
            torch.tensor([self.step], dtype=torch.float32, device=dev),
            torch.from_numpy(self.outlier_idx).to(dev),
            self.outlier_val.to(dev),
        )


def lane_index(c: SZTensor) -> tuple[int, int, np.ndarray]:
    """(rate, width, bytes) of c's lane index as the byte format stores it (SZLinear keeps these)."""
    rate, width, res = _index_params(c.lane_bits, lane_counts(c.numel, c.chunk_size, c.lanes))
    return rate, width, np.frombuffer(pack_fixed(res, width), dtype=np.uint8).copy()


def lane_bits_from_index(index: np.ndarray, numel: int, chunk: int, lanes: int, rate: int, width: int) -> np.ndarray:
    """The lane lengths that a lane index (lane_index's rate, width and bytes) holds."""
    if not (1 <= lanes <= MAX_LANES and chunk >= 1 and chunk % lanes == 0 and 0 <= width <= 32):
        raise ValueError(f"invalid SZ stream: layout chunk_size {chunk} / lanes {lanes}, index width {width}")
    counts = lane_counts(numel, chunk, lanes)
    nbits = len(counts) * width
    if len(index) != (nbits + 7) // 8 or (nbits % 8 and int(index[-1]) >> (nbits % 8)):
        raise ValueError(f"invalid SZ stream: lane index of {len(index)} bytes for {len(counts)} lanes of {width} bits "
                         "(or non-zero padding bits)")
    return ((counts * rate) >> 8) + unpack_fixed(index, len(counts), width)


def from_buffers(shape: tuple, payload: Tensor, lane_index: Tensor, lengths: Tensor, outlier_idx: Tensor,
                 outlier_val: Tensor, step: Tensor, meta: Tensor, bounds: Tensor, lane_start: Tensor) -> SZTensor:
    """The SZTensor held in SZLinear's buffers (validated). meta: stream version, chunk_size, lanes,
    max_len, radius, dtype code, mode code, dtype mask, payload bits, index rate, index width."""
    version, chunk, lanes, max_len, radius, dcode, mcode, mask, nbits, _, _ = (int(v) for v in meta.cpu())
    if version != VERSION or dcode not in CODE_DTYPES or mcode >= len(MODES):
        raise ValueError(f"invalid SZ stream buffers: version {version}, dtype code {dcode}, mode code {mcode}")
    eb, bound = (float(v) for v in bounds.cpu())
    c = SZTensor(tuple(shape), CODE_DTYPES[dcode], MODES[mcode], eb, bound, float(step.cpu()[0]), radius, mask,
                 lengths.cpu().numpy().copy(), chunk, lanes, np.diff(lane_start.cpu().numpy().astype(np.int64)),
                 outlier_idx.cpu().numpy().copy(), outlier_val.cpu().clone(),
                 payload.cpu().numpy().view(np.uint32).copy(), nbits, max_len)
    c.validate()
    return c


def lane_start_and_table(numel: int, lane_index: Tensor, lengths: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """(lane_start, decode table) for SZLinear's buffers (CPU tensors)."""
    _, chunk, lanes, max_len, _, _, _, _, _, rate, width = (int(v) for v in meta.cpu())
    start = _offsets(lane_bits_from_index(lane_index.cpu().numpy(), numel, chunk, lanes, rate, width))
    if not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"invalid SZ stream buffers: max_len {max_len}")
    return torch.from_numpy(start), torch.from_numpy(decode_table_lsb(lengths.cpu().numpy(), max_len))


def from_v1_buffers(shape: tuple, payload: Tensor, offsets: Tensor, lengths: Tensor, outlier_idx: Tensor,
                    outlier_val: Tensor, step: Tensor, meta: Tensor, bounds: Tensor) -> SZTensor:
    """A stream-version-1 SZLinear's buffers (meta: chunk_size, max_len, radius, dtype code, mode code,
    dtype mask), re-packed as version 2."""
    if meta.numel() != 6:
        raise ValueError("an SZ stream-version-1 checkpoint with unreadable meta; re-encode the weights")
    chunk, max_len, radius, dcode, mcode, mask = (int(v) for v in meta.cpu())
    if dcode not in CODE_DTYPES or mcode >= len(MODES):
        raise ValueError(f"invalid SZ stream (v1) buffers: dtype code {dcode}, mode code {mcode}")
    f = dict(shape=tuple(shape), dtype=CODE_DTYPES[dcode], mode=MODES[mcode], error_bound=float(bounds[0]),
             bound=float(bounds[1]), step=float(step.cpu()[0]), chunk_size=chunk, max_len=max_len, radius=radius,
             dtype_mask=mask, lengths=lengths.cpu().numpy(), offsets=offsets.cpu().numpy(),
             outlier_idx=outlier_idx.cpu().numpy(), outlier_val=outlier_val.cpu(), payload=payload.cpu().numpy())
    _sz_v1.check(f)
    return from_v1(f)


def from_v1(f: dict) -> SZTensor:
    """A version-1 stream's fields (lowbit.formats._sz_v1), re-packed as version 2: same codes,
    code lengths, step and outliers, so every decoder gives the values v1's decoders gave."""
    sym = f["symbols"] if "symbols" in f else _sz_v1.symbols(
        f["payload"], f["offsets"], f["lengths"], math.prod(f["shape"]), f["chunk_size"], f["max_len"])
    return _pack(f["shape"], f["dtype"], f["mode"], f["error_bound"], f["bound"], f["step"], f["radius"],
                 f["dtype_mask"], f["lengths"], sym, f["outlier_idx"], f["outlier_val"], *choose_layout(f["shape"]))


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

    chunk_size: the most symbols one lane may code (a power of two in [16, 2**20]); the layout
    uses 256-1024 (`choose_layout`), fewer when this is smaller.

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
    w32 = wt.float()
    lo, hi = (float(v) for v in torch.aminmax(w32))
    amax = max(abs(lo), abs(hi))
    if mode == "rel":
        rng = hi - lo
        # A constant tensor has no range: scale by its magnitude instead (docs/sz.md). Not by
        # max(amax, 1): that made the bound of w = 0.001 everywhere 1e-2 instead of 1e-5, and every
        # value decoded to 0. An all-zero tensor, with no scale at all, takes error_bound itself.
        eb = eb_arg * (rng if rng > 0 else amax if amax > 0 else 1.0)
        if not (math.isfinite(eb) and eb > 0):
            raise ValueError(f"error_bound={error_bound!r} gives an absolute bound {eb} that is not finite and > 0")
    else:
        eb = eb_arg
    lib = fast_library()  # the C kernels, else numpy/torch: the same bytes
    mask = _dtype_mask(wt, amax, eb, lib, w32)
    chunk, lanes = choose_layout(tuple(w.shape), chunk_size)
    # The step (bin width) defaults to 2*eb; a slightly narrower one leaves room for the rounding
    # of reconstructions to bf16/fp16, which turns fewer elements into outliers (~30 bits each)
    # at ~1.44*shrink bits/param more for the codes. Try a few, keep the smallest stream.
    work = _Work(wt.numel(), lib)
    n_lanes = -(-wt.numel() // chunk) * lanes
    best = None
    for shrink in STEP_SHRINKS:
        step32, radius, outlier_idx, hist = _quantize(work, wt, w32, eb, 2.0 * eb * (1.0 - shrink))
        lengths = code_lengths(lib, hist)
        nbits = int((hist * lengths).sum())
        vals = _outlier_values(wt, outlier_idx, eb, w.dtype, lib)
        c = SZTensor(tuple(w.shape), w.dtype, mode, eb_arg, eb, float(step32), radius, mask, lengths, chunk, lanes,
                     np.zeros(n_lanes, dtype=np.int64), outlier_idx, vals,
                     np.zeros((nbits + 31) // 32, dtype=np.uint32), nbits)
        if best is not None and c.nbytes >= best.nbytes:
            continue  # its size with an empty lane index is already no smaller
        c.lane_bits = lane_bits(work, lengths, wt.numel(), chunk, lanes)
        if best is None or c.nbytes < best.nbytes:
            best = c
            work.keep()
    c = best
    c.payload, nbits = pack_payload(work.lib, work.kept, c.lengths, c.lane_bits, chunk, lanes)
    assert nbits == c.payload_bits
    del work
    if c.nbytes > w.numel() * w.element_size():
        warnings.warn(
            f"sz_compress: the stream ({c.nbytes} bytes) is larger than the input ({w.numel() * w.element_size()} "
            f"bytes): error_bound={error_bound!r} is too tight for this tensor to compress", stacklevel=2)
    return c


def _pack(shape, dtype, mode, error_bound, bound, step, radius, mask, lengths, sym, outlier_idx, outlier_val,
          chunk, lanes) -> SZTensor:
    """An SZTensor from per-element symbols and a code (the layout given)."""
    numel = math.prod(shape)
    lengths = np.asarray(lengths, dtype=np.uint8)
    lane_bits = _lane_bits(lengths[sym], numel, chunk, lanes)
    payload, nbits = _pack_payload(sym, lengths, chunk, lanes)
    c = SZTensor(tuple(shape), dtype, mode, error_bound, bound, step, radius, mask, lengths, chunk, lanes, lane_bits,
                 np.asarray(outlier_idx, dtype=np.int64), outlier_val, payload, nbits)
    c.validate()
    return c


# --------------------------------------------------------------------------- decoders


def _reconstruct(codes: Tensor, step: float, outlier_idx: Tensor, outlier_val: Tensor, dtype: torch.dtype) -> Tensor:
    """float32(code) * float32(step), rounded to dtype; outliers overwrite their positions."""
    out = (codes.to(torch.float32) * torch.tensor(step, dtype=torch.float32, device=codes.device)).to(dtype)
    if outlier_idx.numel():
        out[outlier_idx] = outlier_val.to(dtype)
    return out


def decode_reference(c: SZTensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The spec: every lane read bit by bit (bit i of the payload is bit i % 32 of word i // 32),
    matching canonical code words MSB first; each lane must end exactly at its recorded length. Slow."""
    dtype = c.dtype if dtype is None else dtype
    codes = canonical_codes(c.lengths)
    words = {(int(c.lengths[s]), int(codes[s])): s for s in np.flatnonzero(c.lengths)}
    payload = [int(x) for x in c.payload]
    start = c.lane_start()
    counts = lane_counts(c.numel, c.chunk_size, c.lanes)
    out = np.zeros(c.numel, dtype=np.int64)
    for lane in range(len(counts)):
        chunk, j = divmod(lane, c.lanes)
        pos, end = int(start[lane]), int(start[lane + 1])
        for i in range(int(counts[lane])):
            word, ln = 0, 0
            while True:
                if pos >= end or ln >= c.max_len:
                    raise ValueError(f"invalid SZ stream: lane {lane} does not decode within its length")
                word = (word << 1) | ((payload[pos >> 5] >> (pos & 31)) & 1)
                pos += 1
                ln += 1
                if (ln, word) in words:
                    break
            out[chunk * c.chunk_size + j + i * c.lanes] = words[(ln, word)] - c.radius
        if pos != end:
            raise ValueError(f"invalid SZ stream: lane {lane} ends at bit {pos}, its length says {end}")
    flat = _reconstruct(torch.from_numpy(out), c.step, torch.from_numpy(c.outlier_idx), c.outlier_val, dtype)
    return flat.view(c.shape)


def _lockstep(words: np.ndarray, start: np.ndarray, counts: np.ndarray, table: np.ndarray,
              max_len: int) -> np.ndarray:
    """Table entries (symbol << 4 | length), [steps, lanes]: every lane decodes one symbol per step.

    A lane reads the 64 bits at its position (two words), shifts, masks max_len bits and looks
    them up. Lanes with fewer symbols decode on past their end into zero padding (ignored)."""
    steps = int(counts.max(initial=0))
    n = len(counts)
    pad = max_len * steps // 32 + 3  # a lane can run at most max_len bits per step past the payload
    w = np.zeros(len(words) + pad, dtype=np.uint64)
    w[:len(words)] = words
    pair = w[:-1] | (w[1:] << np.uint64(32))
    pos = start[:-1].astype(np.uint64)
    ends = np.empty(n, dtype=np.int64)
    capture = {int(k): counts == k for k in np.unique(counts)}
    ent = np.empty((steps, n), dtype=np.uint16)
    tab = table.astype(np.uint64)
    wmask = np.uint64((1 << max_len) - 1)
    v = np.empty(n, dtype=np.uint64)
    e = np.empty(n, dtype=np.uint64)
    for i in range(steps):
        if i in capture:
            ends[capture[i]] = pos[capture[i]]
        np.take(pair, pos >> np.uint64(5), out=v)
        v >>= pos & np.uint64(31)
        v &= wmask
        np.take(tab, v, out=e)
        ent[i] = e
        e &= np.uint64(15)
        pos += e
    if steps in capture:
        ends[capture[steps]] = pos[capture[steps]]
    if not np.array_equal(ends, start[1:]):
        lane = int(np.flatnonzero(ends != start[1:])[0])
        raise ValueError(f"invalid SZ stream: lane {lane} ends at bit {ends[lane]}, its length says {start[lane + 1]}")
    return ent


def decode_vectorized(payload: Tensor, lane_start: Tensor, table: Tensor, step: Tensor, outlier_idx: Tensor,
                      outlier_val: Tensor, numel: int, chunk_size: int, max_len: int, radius: int,
                      dtype: torch.dtype) -> Tensor:
    """The CPU decoder behind sz_decompress and SZLinear (arguments as SZTensor.decoder_args)."""
    start = lane_start.cpu().numpy().astype(np.int64)
    n_chunks = -(-numel // chunk_size)
    lanes = (len(start) - 1) // n_chunks
    counts = lane_counts(numel, chunk_size, lanes)
    ent = _lockstep(payload.cpu().numpy().view(np.uint32), start, counts, table.cpu().numpy().view(np.uint16),
                    max_len)
    codes = torch.from_numpy((ent >> 4).view(np.int16)).sub_(radius)  # [steps, n_chunks * lanes]
    codes = codes.view(-1, n_chunks, lanes).transpose(0, 1).reshape(-1)[:numel]
    out = _reconstruct(codes, float(step.cpu()[0]), outlier_idx.cpu(), outlier_val.cpu(), dtype)
    return out.to(payload.device)
