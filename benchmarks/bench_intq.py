"""pytest-benchmark: the int2/3/4 family on the CPU reference path (`make bench`)."""

from __future__ import annotations

import pytest
import torch

import lowbit


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128), (2, 64)])
def test_quantize_int(benchmark, w, bits, group_size, rounds, close):
    q = benchmark.pedantic(lowbit.quantize_int, args=(w, bits, group_size), **rounds)
    close(lowbit.dequantize_int(q, torch.float32), w, {4: 0.2, 3: 0.3, 2: 0.7}[bits])


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128)])
def test_matmul_int(benchmark, w, x, bits, group_size, rounds, close):
    q = lowbit.quantize_int(w, bits, group_size)
    y = benchmark.pedantic(lowbit.matmul_int, args=(x, q), **rounds)
    close(y, x @ lowbit.dequantize_int(q, torch.float32).t(), 1e-5)
