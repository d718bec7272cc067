"""lowbit.functional: argument checks of the public quantize / dequantize functions, and the SZ
decode policy (a dtype that cannot hold the bound raises unless the caller opts in)."""

from __future__ import annotations

import pytest
import torch

import lowbit


def test_sz_decode_to_fp16_past_its_range_raises_unless_opted_in():
    w = torch.randn(32, 32) * 10
    w[3, 5] = 7e4  # past fp16's 65504
    c = lowbit.sz_compress(w, 1e-2)
    assert not c.bound_holds(torch.float16)
    with pytest.raises(ValueError, match="dtype=float16 cannot hold"):
        lowbit.sz_decompress(c, dtype=torch.float16)
    out = lowbit.sz_decompress(c, dtype=torch.float16, allow_unbounded=True)
    assert torch.isinf(out[3, 5])  # what the opt-in accepts
    assert float((lowbit.sz_decompress(c).double() - w.double()).abs().max()) <= c.bound


def test_szlinear_forward_in_a_dtype_that_breaks_the_bound_raises():
    lin = torch.nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight[0, 0] = 1e5
    m = lowbit.SZLinear.from_linear(lin, error_bound=1e-2).half()
    with pytest.raises(ValueError, match="float16 cannot hold"):
        m(torch.randn(2, 32, dtype=torch.float16))


def test_sz_relative_bound_of_one_or_more_is_rejected():
    for eb in (1.0, 3.0):
        with pytest.raises(ValueError, match="error_bound must be < 1 with mode='rel'"):
            lowbit.sz_compress(torch.randn(10), eb, mode="rel")


def test_sz_stream_larger_than_the_input_warns():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="larger than the input"):
        lowbit.sz_compress(w, 1e-9)


@pytest.mark.parametrize("call,match", [
    (lambda: lowbit.dequantize_4bit(lowbit.quantize_4bit(torch.randn(4, 64)), torch.int8), "dtype must be one of"),
    (lambda: lowbit.dequantize_4bit(lowbit.quantize_4bit(torch.randn(4, 64)), "float16"), "dtype must be a torch.dtype"),
    (lambda: lowbit.dequantize_int(lowbit.quantize_int(torch.randn(4, 64)), torch.float64), "dtype must be one of"),
    (lambda: lowbit.sz_decompress(lowbit.sz_compress(torch.randn(8), 0.1), device="tpu9"), "device must be"),
    (lambda: lowbit.quantize_4bit(torch.randn(4, 64), blocksize=48), "blocksize must be a power of two"),
    (lambda: lowbit.quantize_int(torch.randn(4, 40)), "in_features must be a multiple of 32"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_sz_bound_below_the_smallest_subnormal():
    """Found by the property test: with a bound under fp32's smallest subnormal (1.4e-45) the
    encoder's fp32 suspect filter rounded the bound up and let a miss of 1.4e-45 through."""
    import warnings

    w = torch.tensor([0.0, 1e-45, -1e-45, 3e-45], dtype=torch.float32)
    for eb in (0.75 * 1.401298464324817e-45, 1e-46):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stream is larger than 16 bytes: expected here
            c = lowbit.sz_compress(w, eb)
        assert float((lowbit.sz_decompress(c).double() - w.double()).abs().max()) <= c.bound
