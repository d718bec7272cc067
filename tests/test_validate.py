"""Non-finite weights are refused by every public quantizer, with the ValueError that names the problem.

A NaN or an infinity poisons the scale of its block (group, stream) and with it every value there, so
each quantizer checks its input first (`lowbit._validate.check_finite`). Only NaN and +inf used to be
tried: a check that looked at the max alone accepted -inf (quantize_int and sz_compress took it; in
quantize_4bit it surfaced as an IndexError deep in the reference). Here NaN, +inf and -inf, alone
among finite values or everywhere, in every float dtype, go into every public entry point that quantizes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit._validate import check_finite

MESSAGE = "contains NaN or Inf"
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name -> a function of a [32, 64] weight that quantizes it through one public entry point
QUANTIZERS = {
    "quantize_4bit nf4": lambda w: lowbit.quantize_4bit(w, 64, "nf4", True),
    "quantize_4bit fp4": lambda w: lowbit.quantize_4bit(w, 32, "fp4", False),
    "quantize_4bit optimal": lambda w: lowbit.quantize_4bit(w, 64, "optimal", True),
    "quantize_int rtn": lambda w: lowbit.quantize_int(w, 3, 32, "rtn"),
    "quantize_int mse": lambda w: lowbit.quantize_int(w, 2, None, "mse"),
    "sz_compress abs": lambda w: lowbit.sz_compress(w, 1e-3),
    "sz_compress rel": lambda w: lowbit.sz_compress(w, 1e-3, mode="rel"),
    "Linear4bit.from_linear": lambda w: lowbit.Linear4bit.from_linear(_linear(w)),
    "IntLinear.from_linear": lambda w: lowbit.IntLinear.from_linear(_linear(w), bits=4),
    "SZLinear.from_linear": lambda w: lowbit.SZLinear.from_linear(_linear(w), error_bound=1e-3),
    "replace_linear nf4": lambda w: lowbit.replace_linear(nn.Sequential(_linear(w)), "nf4", skip=()),
    "replace_linear int3": lambda w: lowbit.replace_linear(nn.Sequential(_linear(w)), "int3", skip=()),
    "replace_linear sz": lambda w: lowbit.replace_linear(nn.Sequential(_linear(w)), "sz", skip=(), error_bound=1e-3),
}


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _weights(value: float, dtype: torch.dtype):
    """The bad value alone (at a random place, the rest finite) and everywhere."""
    w = torch.randn(32, 64).to(dtype)
    i, j = int(torch.randint(0, 32, ())), int(torch.randint(0, 64, ()))
    w[i, j] = value
    yield "one", w
    yield "all", torch.full((32, 64), value, dtype=dtype)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bad", BAD)
def test_every_quantizer_refuses_non_finite_weights(quantizer, bad):
    for dtype in DTYPES:
        for where, w in _weights(BAD[bad], dtype):
            with pytest.raises(ValueError, match=MESSAGE):
                QUANTIZERS[quantizer](w)


@pytest.mark.parametrize("bad", BAD)
def test_check_finite_sees_every_non_finite_value(bad):
    for dtype in DTYPES:
        for where, w in _weights(BAD[bad], dtype):
            with pytest.raises(ValueError, match=MESSAGE):
                check_finite("w", w)
    both = torch.tensor([float("-inf"), 0.0, float("inf")])  # on both ends
    with pytest.raises(ValueError, match=MESSAGE):
        check_finite("w", both)


def test_check_finite_passes_extreme_finite_values():
    # the largest finite values, signed zeros and subnormals are valid weights
    for dtype in DTYPES:
        fi = torch.finfo(dtype)
        w = torch.tensor([fi.max, -fi.max, 0.0, -0.0, fi.tiny / 2, -fi.tiny / 2, 1.0], dtype=dtype)
        check_finite("w", w)
