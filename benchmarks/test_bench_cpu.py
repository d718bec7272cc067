"""pytest-benchmark suite for the CPU reference paths (run by `make bench`:
`pytest benchmarks -q --benchmark-only`). Small shapes, bounded rounds: the whole suite takes
well under a minute on 2 CPU cores. Each benchmark also checks its result, so a broken op fails
instead of timing garbage."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import sz_compress, sz_decompress

K, N = 1024, 512  # weight [N, K]
ROUNDS = dict(rounds=10, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def w():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, K, generator=g) * 0.02


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, K, generator=g)


def _close(y, ref, tol):
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err < tol, err


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit(benchmark, w, quant_type):
    q = benchmark.pedantic(lowbit.quantize_4bit, args=(w, 64, quant_type, True), **ROUNDS)
    assert q.shape == w.shape and q.codes.numel() == w.numel() // 2


def test_quantize_4bit_optimal(benchmark, w):
    q = benchmark.pedantic(lowbit.quantize_4bit, args=(w, 64, "optimal", True), rounds=3, iterations=1,
                           warmup_rounds=0)
    _close(lowbit.dequantize_4bit(q, torch.float32), w, 0.15)


def test_dequantize_4bit(benchmark, w):
    q = lowbit.quantize_4bit(w, 64, "nf4", True)
    d = benchmark.pedantic(lowbit.dequantize_4bit, args=(q, torch.float32), **ROUNDS)
    _close(d, w, 0.15)


@pytest.mark.parametrize("m", [1, 16])
def test_matmul_4bit_reference(benchmark, w, x, m):
    q = lowbit.quantize_4bit(w, 64, "nf4", True)
    xm = x[:m].contiguous()
    y = benchmark.pedantic(lowbit.matmul_4bit, args=(xm, q), **ROUNDS)
    _close(y, xm @ lowbit.dequantize_4bit(q, torch.float32).t(), 1e-5)


def test_dense_matmul_baseline(benchmark, w, x):
    y = benchmark.pedantic(torch.matmul, args=(x, w.t()), **ROUNDS)
    assert y.shape == (x.shape[0], N)


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128), (2, 64)])
def test_quantize_int(benchmark, w, bits, group_size):
    q = benchmark.pedantic(lowbit.quantize_int, args=(w, bits, group_size), **ROUNDS)
    _close(lowbit.dequantize_int(q, torch.float32), w, {4: 0.2, 3: 0.3, 2: 0.7}[bits])


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128)])
def test_matmul_int(benchmark, w, x, bits, group_size):
    q = lowbit.quantize_int(w, bits, group_size)
    y = benchmark.pedantic(lowbit.matmul_int, args=(x, q), **ROUNDS)
    _close(y, x @ lowbit.dequantize_int(q, torch.float32).t(), 1e-5)


def test_sz_compress(benchmark, w):
    c = benchmark.pedantic(sz_compress, args=(w, 0.0025), rounds=5, iterations=1, warmup_rounds=1)
    assert 3.0 < c.bits_per_param < 6.0


def test_sz_decompress(benchmark, w):
    c = sz_compress(w, 0.0025)
    d = benchmark.pedantic(sz_decompress, args=(c,), **ROUNDS)
    assert float((d - w).abs().max()) <= 0.0025
