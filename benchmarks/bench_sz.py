"""pytest-benchmark: the SZ codec on the CPU (encoder and vectorized decoder; `make bench`)."""

from __future__ import annotations

from lowbit import sz_compress, sz_decompress


def test_sz_compress(benchmark, w):
    c = benchmark.pedantic(sz_compress, args=(w, 0.0025), rounds=5, iterations=1, warmup_rounds=1)
    assert 3.0 < c.bits_per_param < 6.0


def test_sz_decompress(benchmark, w, rounds):
    c = sz_compress(w, 0.0025)
    d = benchmark.pedantic(sz_decompress, args=(c,), **rounds)
    assert float((d - w).abs().max()) <= 0.0025
