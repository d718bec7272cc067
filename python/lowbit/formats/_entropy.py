"""Entropy-coding helpers of the SZ format: length-limited canonical Huffman codes, the decode
table, and LEB128 varints for outlier index gaps. Pure numpy; the byte format is in sz.py."""

from __future__ import annotations

import heapq

import numpy as np

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
    """int32[2**max_len]: for every max_len-bit window, symbol << 4 | length of the code it starts with.

    Windows no code word starts (incomplete codes) map to symbol 0, length 1; only a corrupted
    stream reaches them, and from_bytes rejects those by CRC before any decoder runs."""
    codes = canonical_codes(lengths)
    table = np.full(1 << max_len, 1, dtype=np.int32)
    for s in np.flatnonzero(lengths):
        ln = int(lengths[s])
        start = int(codes[s]) << (max_len - ln)
        table[start:start + (1 << (max_len - ln))] = (int(s) << 4) | ln
    return table


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
