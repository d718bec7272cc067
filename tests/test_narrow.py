"""QuantLinear.narrow: a tensor-parallel rank's part of a layer, cut from the stored codes and scales.

Oracle: the float64 decode of the whole layer's storage (the reference dequantizers in lowbit.formats), sliced;
the narrowed layer must decode to exactly that slice (nothing re-quantized), its forward must match x @ slice^T,
and the row-parallel pieces' partial sums must add up to the whole layer's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.nn import IntLinear, Linear4bit, SZLinear

from .helpers import int_oracle_weight, nf4_oracle_weight


def _lin(n: int, k: int) -> nn.Linear:
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k))
        lin.bias.copy_(torch.randn(n))
    return lin


def _decode64(m) -> torch.Tensor:
    """The layer's weight decoded from its bytes by the tests' own oracles (tests/helpers.py), float64."""
    return (nf4_oracle_weight if isinstance(m, Linear4bit) else int_oracle_weight)(m.quantized_weight)


CASES = [
    ("nf4 dq", lambda lin: Linear4bit.from_linear(lin, quant_type="nf4", blocksize=64, double_quant=True), 64),
    ("fp4", lambda lin: Linear4bit.from_linear(lin, quant_type="fp4", blocksize=32, double_quant=False), 32),
    ("int4 g128 ragged", lambda lin: IntLinear.from_linear(lin, bits=4, group_size=128), 128),
    ("int3 per-row", lambda lin: IntLinear.from_linear(lin, bits=3), 128),
    ("int3 g128", lambda lin: IntLinear.from_linear(lin, bits=3, group_size=128), 128),
    ("int2 g64", lambda lin: IntLinear.from_linear(lin, bits=2, group_size=64), 64),
]


@pytest.mark.parametrize("name,make,unit", CASES, ids=[c[0] for c in CASES])
def test_narrow_rows_and_columns_decode_to_the_slice(name, make, unit):
    n, k = 96, 576  # k = 4 x 128 + 64: int4 g128's last group is ragged
    m = make(_lin(n, k))
    full = _decode64(m)
    x = torch.randn(5, k)
    # rows: two ranks of a column-parallel split, and an odd slice
    for start, length in [(0, 48), (48, 48), (7, 13)]:
        part = m.narrow(0, start, length)
        assert (part.out_features, part.in_features) == (length, k)
        torch.testing.assert_close(_decode64(part), full[start:start + length], rtol=0, atol=0)
        want = x.double() @ full[start:start + length].T + m.bias.detach().double()[start:start + length]
        torch.testing.assert_close(part(x).double(), want, rtol=1e-5, atol=1e-4)
    # columns: a row-parallel split into pieces at multiples of the block/group; partial sums add up
    cuts = [0, 2 * unit, k] if unit != 128 else [0, 256, 512, k]  # 512:576 is a ragged tail group / quad
    total = torch.zeros(5, n, dtype=torch.float64)
    for a, b in zip(cuts, cuts[1:]):
        part = m.narrow(1, a, b - a)
        assert part.bias is None and (part.out_features, part.in_features) == (n, b - a)
        torch.testing.assert_close(_decode64(part), full[:, a:b], rtol=0, atol=0)
        total += part(x[:, a:b].contiguous()).double()
    torch.testing.assert_close(total + m.bias.detach().double(), x.double() @ full.T + m.bias.detach().double(),
                               rtol=1e-5, atol=1e-4)


def test_narrow_refuses_cuts_inside_a_block_group_or_stream():
    lin = _lin(64, 256)
    with pytest.raises(ValueError, match="would split a block"):
        Linear4bit.from_linear(lin, blocksize=64).narrow(1, 32, 64)
    with pytest.raises(ValueError, match="would split a group"):
        IntLinear.from_linear(lin, bits=4, group_size=128).narrow(1, 64, 128)
    with pytest.raises(ValueError, match="32-column chunk"):
        IntLinear.from_linear(lin, bits=4).narrow(1, 16, 32)
    with pytest.raises(ValueError, match="multiple of 128"):
        IntLinear.from_linear(lin, bits=3).narrow(1, 64, 64)
    with pytest.raises(ValueError, match="cannot be split"):
        SZLinear.from_linear(lin, error_bound=0.05).narrow(0, 0, 32)
    with pytest.raises(ValueError, match="blocks that cross rows"):
        Linear4bit.from_linear(_lin(8, 96), blocksize=64).narrow(0, 0, 4)
    m = IntLinear.from_linear(lin, bits=4)
    with pytest.raises(ValueError, match="outside"):
        m.narrow(0, 60, 8)
    with pytest.raises(ValueError, match="dim must be"):
        m.narrow(2, 0, 8)
    with pytest.raises(TypeError, match="start must be an int"):
        m.narrow(0, 1.0, 8)
    assert m.narrow(0, 0, 64) is m
