"""Reading SZ stream version 1 (lowbit <= 2026-11-26), so that old files and SZLinear checkpoints
still load: `parse` checks a v1 byte string exactly as v1's reader did and `symbols` decodes its
chunked, MSB-first Huffman payload. lowbit.formats.sz then re-packs the same codes (same
quantizer, step, code lengths and outliers) as a version-2 stream; nothing writes version 1.

v1 layout (little-endian): magic "LBSZ", version/dtype/mode/ndim/max_len (5 x u8), shape (ndim x
u64), error_bound/bound (2 x f64), step (f32), chunk_size/radius (2 x u32), dtype_mask (u8), code
lengths (4-bit nibbles, even symbol high), n_outliers/n_gap_bytes (2 x u64), value dtype (u8),
LEB128 outlier index gaps, outlier values, chunk end offsets (n_chunks x u32), payload (byte-
aligned chunks of MSB-first code words), CRC32 of everything before it.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from ._entropy import MAX_LEN, decode_table, kraft_sum, varint_decode

_HEAD = struct.Struct("<4sBBBBB")
_PARAMS = struct.Struct("<ddfIIB")
_COUNT = struct.Struct("<QQB")
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
MAX_RADIUS = 511


def parse(data: bytes) -> dict:
    """The fields of a v1 stream (CRC already checked by the caller); ValueError when inconsistent."""
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data) - 4:
            raise ValueError(f"SZ stream (v1) truncated: need {n} bytes for {what} at offset {pos}, "
                             f"have {len(data) - 4 - pos}")
        out = data[pos:pos + n]
        pos += n
        return out

    _, _, dcode, mcode, ndim, max_len = _HEAD.unpack(take(_HEAD.size, "header"))
    if dcode not in DTYPES or mcode > 1:
        raise ValueError(f"SZ stream (v1) has invalid dtype code {dcode} or mode code {mcode}")
    shape = tuple(int(s) for s in struct.unpack(f"<{ndim}Q", take(8 * ndim, "shape")))
    eb, bound, step, chunk, radius, mask = _PARAMS.unpack(take(_PARAMS.size, "parameters"))
    if radius > MAX_RADIUS:
        raise ValueError(f"SZ stream (v1) radius {radius} exceeds {MAX_RADIUS}")
    nsym = 2 * radius + 1
    nib = np.frombuffer(take((nsym + 1) // 2, "code lengths"), dtype=np.uint8)
    lengths = np.stack([nib >> 4, nib & 15], axis=1).reshape(-1)[:nsym].copy()
    nout, ngap, vcode = _COUNT.unpack(take(_COUNT.size, "outlier count"))
    numel = math.prod(shape)
    if vcode not in DTYPES or nout > numel:
        raise ValueError(f"SZ stream (v1) has invalid outlier dtype code {vcode} or count {nout}")
    idx = np.cumsum(varint_decode(np.frombuffer(take(ngap, "outlier indices"), dtype=np.uint8), nout))
    vdtype = DTYPES[vcode]
    raw = bytearray(take(nout * (4 if vdtype == torch.float32 else 2), "outlier values"))
    vals = torch.frombuffer(raw, dtype=vdtype) if nout else torch.empty(0, dtype=vdtype)
    if chunk < 16 or chunk > 2**20 or chunk & (chunk - 1):
        raise ValueError(f"SZ stream (v1) chunk_size {chunk} is not a power of two in [16, 2**20]")
    if numel <= 0:
        raise ValueError(f"SZ stream (v1) shape {shape} has no elements")
    n_chunks = -(-numel // chunk)
    ends = np.frombuffer(take(4 * n_chunks, "chunk offsets"), dtype="<u4").astype(np.int64)
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    payload = np.frombuffer(take(int(offsets[-1]), "payload"), dtype=np.uint8).copy()
    if pos != len(data) - 4:
        raise ValueError(f"SZ stream (v1) has {len(data) - 4 - pos} unexpected trailing bytes")
    fields = dict(shape=shape, dtype=DTYPES[dcode], mode=("abs", "rel")[mcode], error_bound=eb, bound=bound,
                  step=step, chunk_size=chunk, max_len=max_len, radius=radius, dtype_mask=mask, lengths=lengths,
                  offsets=offsets, outlier_idx=idx, outlier_val=vals, payload=payload)
    check(fields)
    return fields


def check(f: dict) -> None:
    """v1's consistency checks (so that the decoder below stays in bounds)."""
    numel = math.prod(f["shape"])
    if not 1 <= f["max_len"] <= MAX_LEN:
        raise ValueError(f"invalid SZ stream (v1): max_len {f['max_len']} not in [1, {MAX_LEN}]")
    lengths = f["lengths"]
    if len(lengths) != 2 * f["radius"] + 1 or int(lengths.max()) > f["max_len"]:
        raise ValueError("invalid SZ stream (v1): code lengths do not match the radius or exceed max_len")
    if not lengths.any() or kraft_sum(lengths) > 1.0:
        raise ValueError("invalid SZ stream (v1): code lengths do not form a prefix code")
    off = f["offsets"]
    if len(off) != -(-numel // f["chunk_size"]) + 1 or off[0] != 0 or np.any(np.diff(off) < 0):
        raise ValueError("invalid SZ stream (v1): chunk offsets are not non-decreasing from 0")
    if off[-1] != len(f["payload"]):
        raise ValueError("invalid SZ stream (v1): last chunk offset does not match the payload length")
    idx = f["outlier_idx"]
    if len(idx) != f["outlier_val"].numel():
        raise ValueError("invalid SZ stream (v1): outlier indices and values differ in count")
    if len(idx) and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
        raise ValueError("invalid SZ stream (v1): outlier indices are not strictly increasing within [0, numel)")


def symbols(payload: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, numel: int, chunk: int,
            max_len: int) -> np.ndarray:
    """The symbol of every element (int64), by v1's vectorized decoder: a table lookup at every bit
    position gives its successor; pointer jumping walks all chunks at once."""
    table = decode_table(lengths, max_len)
    n_chunks = len(offsets) - 1
    group = max(1, (1 << 19) // max(1, int(offsets[-1]) // max(1, n_chunks) + 1))
    parts = []
    for g0 in range(0, n_chunks, group):
        g1 = min(n_chunks, g0 + group)
        sub = offsets[g0:g1 + 1]
        bits = np.unpackbits(payload[sub[0]:sub[-1]])
        nb = bits.size
        padded = np.concatenate([bits, np.zeros(max_len + 1, dtype=np.uint8)])
        win = np.zeros(nb + 1, dtype=np.int32)
        for j in range(max_len):
            win = (win << 1) | padded[j:j + nb + 1]
        entry = table[win]
        jump = np.minimum(np.arange(nb + 1, dtype=np.int64) + (entry & 15), nb)
        pos = np.minimum((sub[:-1] - sub[0]) * 8, nb)[None, :]
        steps = 1
        while steps < chunk:
            pos = np.concatenate([pos, jump[pos]], axis=0)
            steps *= 2
            if steps < chunk:
                jump = jump[jump]
        parts.append((entry[pos] >> 4).T.reshape(-1)[:min(g1 * chunk, numel) - g0 * chunk])
    return np.concatenate(parts).astype(np.int64)


def read(data: bytes) -> dict:
    """parse + symbols: the v1 fields and `symbols` (int64 per element)."""
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError("SZ stream corrupted or truncated: CRC32 mismatch")
    f = parse(data)
    f["symbols"] = symbols(f["payload"], f["offsets"], f["lengths"], math.prod(f["shape"]), f["chunk_size"],
                           f["max_len"])
    return f
