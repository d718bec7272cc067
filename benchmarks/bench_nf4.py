"""pytest-benchmark: the 4-bit LUT family on the CPU reference path (`make bench` collects bench_*.py
through benchmarks/conftest.py). Small shapes, bounded rounds; each benchmark also checks its
result, so a broken op fails instead of timing garbage."""

from __future__ import annotations

import pytest
import torch

import lowbit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit(benchmark, w, quant_type, rounds):
    q = benchmark.pedantic(lowbit.quantize_4bit, args=(w, 64, quant_type, True), **rounds)
    assert q.shape == w.shape and q.codes.numel() == w.numel() // 2


def test_quantize_4bit_optimal(benchmark, w, close):
    q = benchmark.pedantic(lowbit.quantize_4bit, args=(w, 64, "optimal", True), rounds=3, iterations=1,
                           warmup_rounds=0)
    close(lowbit.dequantize_4bit(q, torch.float32), w, 0.15)


def test_dequantize_4bit(benchmark, w, rounds, close):
    q = lowbit.quantize_4bit(w, 64, "nf4", True)
    d = benchmark.pedantic(lowbit.dequantize_4bit, args=(q, torch.float32), **rounds)
    close(d, w, 0.15)


@pytest.mark.parametrize("m", [1, 16])
def test_matmul_4bit(benchmark, w, x, m, rounds, close):
    q = lowbit.quantize_4bit(w, 64, "nf4", True)
    xm = x[:m].contiguous()
    y = benchmark.pedantic(lowbit.matmul_4bit, args=(xm, q), **rounds)
    close(y, xm @ lowbit.dequantize_4bit(q, torch.float32).t(), 1e-5)


def test_dense_matmul_baseline(benchmark, w, x, rounds):
    y = benchmark.pedantic(torch.matmul, args=(x, w.t()), **rounds)
    assert y.shape == (x.shape[0], w.shape[0])
