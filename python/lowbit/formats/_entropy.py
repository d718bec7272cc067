"""Entropy-coding helpers of the SZ format: length-limited canonical Huffman codes, their decode
tables, LSB-first bit packing into u32 words, and LEB128 varints for outlier index gaps. Pure
numpy; the byte format is in sz.py."""

from __future__ import annotations

import heapq

import numpy as np
import torch

MAX_LEN = 12  # longest Huffman code, bits (the decoders peek this many bits)


def _huffman_depths(freq: np.ndarray) -> np.ndarray:
    """Code lengths of a Huffman code for positive weights `freq` (at least two of them)."""
    n = len(freq)
    heap = [(int(w), i) for i, w in enumerate(freq)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    nxt = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt))
        nxt += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # internal nodes are numbered after their children
        depth[i] = depth[parent[i]] + 1
    return np.array(depth[:n], dtype=np.int64)


def huffman_lengths(freq: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Per-symbol code lengths (0 = unused) of a Huffman code limited to `max_len` bits.

    Over-long codes are fixed by halving the counts (keeping them >= 1) and rebuilding, which
    converges to a balanced code; with <= 1023 symbols that is at most 10 bits."""
    lengths = np.zeros(len(freq), dtype=np.uint8)
    present = np.flatnonzero(freq)
    if len(present) == 1:
        lengths[present] = 1
    elif len(present) > 1:
        f = freq[present].astype(np.int64)
        while True:
            d = _huffman_depths(f)
            if d.max() <= max_len:
                break
            f = np.maximum(f >> 1, 1)
        lengths[present] = d
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical (DEFLATE-style) code words: by increasing length, then symbol, counting up."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def decode_table(lengths: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """int32[2**max_len]: for every max_len-bit window read MSB first (stream v1), symbol << 4 |
    length of the code it starts with. Windows no code word starts map to symbol 0, length 1."""
    codes = canonical_codes(lengths)
    table = np.full(1 << max_len, 1, dtype=np.int32)
    for s in np.flatnonzero(lengths):
        ln = int(lengths[s])
        start = int(codes[s]) << (max_len - ln)
        table[start:start + (1 << (max_len - ln))] = (int(s) << 4) | ln
    return table


def reversed_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code words bit-reversed within their length: what an LSB-first stream holds,
    so that the first bit read is the code word's most significant bit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    rev = np.zeros_like(codes)
    for b in range(int(lengths.max(initial=0))):
        rev |= ((codes >> b) & 1) << np.maximum(lengths - 1 - b, 0)
    return np.where(lengths > 0, rev, 0)


def decode_table_lsb(lengths: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """int16[2**max_len] for LSB-first streams (v2): entry w (the next max_len stream bits, the
    first in bit 0) = symbol << 4 | length of the code word w starts with. Windows that start no
    code word (only an incomplete code has them) map to 0: length 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rev = reversed_codes(lengths)
    table = np.zeros(1 << max_len, dtype=np.int16)
    w = np.arange(1 << max_len, dtype=np.int64)
    for s in np.flatnonzero(lengths):  # longest codes first would not matter: a prefix code
        ln = int(lengths[s])
        table[(w & ((1 << ln) - 1)) == rev[s]] = (int(s) << 4) | ln
    return table


def kraft_sum(lengths: np.ndarray) -> float:
    used = np.asarray(lengths, dtype=np.int64)
    used = used[used > 0]
    return float(np.sum(2.0 ** -used))


# --------------------------------------------------------------------------- LSB-first bit packing


def pack_lsb(values: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint32 words, bit count): values[i] (< 2**widths[i], widths <= 32) written back to back,
    the first value in the lowest bits of word 0. Zero-width items take no room."""
    widths = torch.from_numpy(np.ascontiguousarray(widths))
    if widths.numel() == 0:
        return np.zeros(0, dtype=np.uint32), 0
    pos = torch.cumsum(widths, 0, dtype=torch.int64)
    nbits = int(pos[-1])
    pos -= widths
    n_words = (nbits + 31) // 32
    v = torch.from_numpy(np.ascontiguousarray(values).astype(np.int64, copy=False)) << (pos & 31)
    # acc[k]: the items starting in word k, as a 64-bit window from word k (disjoint fields: the sum
    # is their OR, below 2**63); bits past 32 belong to word k + 1.
    acc = torch.zeros(n_words + 1, dtype=torch.int64).index_add_(0, pos >> 5, v)
    words = acc & 0xFFFFFFFF
    words[1:] |= acc[:-1] >> 32
    return words[:n_words].numpy().astype(np.uint32), nbits


def unpack_fixed(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """int64[count]: `count` unsigned fields of `width` bits (0..32) packed LSB first in bytes."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    b = np.zeros(len(data) + 8, dtype=np.uint8)
    b[:len(data)] = data
    pos = np.arange(count, dtype=np.int64) * width
    byte = pos >> 3
    v = np.zeros(count, dtype=np.uint64)
    for k in range(5):  # a field of <= 32 bits at any bit offset spans <= 5 bytes
        v |= b[byte + k].astype(np.uint64) << np.uint64(8 * k)
    return ((v >> (pos & 7).astype(np.uint64)) & np.uint64((1 << width) - 1)).astype(np.int64)


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """The bytes of unpack_fixed: fields of `width` bits, LSB first, zero padded to a byte."""
    words, nbits = pack_lsb(np.asarray(values, dtype=np.uint64), np.full(len(values), width, dtype=np.int64))
    return words.astype("<u4").tobytes()[:(nbits + 7) // 8]


# --------------------------------------------------------------------------- outlier indices


def gaps(idx: np.ndarray) -> np.ndarray:
    """Strictly increasing indices -> first index, then differences (>= 1)."""
    return np.diff(np.asarray(idx, dtype=np.int64), prepend=0)


def varint_len(v: np.ndarray) -> int:
    nb = np.ones(len(v), dtype=np.int64)
    t = np.asarray(v, dtype=np.uint64) >> np.uint64(7)
    while t.any():
        nb += t > 0
        t >>= np.uint64(7)
    return int(nb.sum())


def varint_encode(v: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, least significant first, high bit set on all but the last byte."""
    v = np.asarray(v, dtype=np.uint64)
    nb = np.ones(len(v), dtype=np.int64)
    t = v >> np.uint64(7)
    while t.any():
        nb += t > 0
        t >>= np.uint64(7)
    out = np.zeros(int(nb.sum()), dtype=np.uint8)
    start = np.cumsum(nb) - nb
    for k in range(int(nb.max(initial=0))):
        m = nb > k
        byte = (v[m] >> np.uint64(7 * k)) & np.uint64(0x7F)
        out[start[m] + k] = byte.astype(np.uint8) | np.where(nb[m] - 1 > k, 0x80, 0).astype(np.uint8)
    return out.tobytes()


def varint_decode(b: np.ndarray, count: int) -> np.ndarray:
    ends = np.flatnonzero(b < 0x80)  # the last byte of every number
    if len(ends) != count or (len(b) and ends[-1] != len(b) - 1):
        raise ValueError(f"invalid SZ stream: outlier index bytes do not hold {count} numbers")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    nb = ends - starts + 1
    if count and nb.max() > 9:
        raise ValueError("invalid SZ stream: outlier index gap overflows 63 bits")
    v = np.zeros(count, dtype=np.int64)
    for k in range(int(nb.max(initial=0))):
        m = nb > k
        v[m] |= (b[starts[m] + k] & 0x7F).astype(np.int64) << (7 * k)
    return v
