"""The fast CPU backend (lowbit/_cpu.py) against the pure-torch reference (LOWBIT_CPU_BACKEND=reference).

Dequantize must be bit-identical to the reference; matmuls and their gradients must match it within
the dtype tolerance of tests/helpers.py (fp32 accumulation: fp32 1e-5; bf16 uses a bf16 GEMM at large
M, fp16/bf16 1e-2). Every test checks with `_cpu.CALLS` that the path it names ran. Odd shapes: N=33,
K not a multiple of the block size (4-bit), M in 1, 3, 64, 300 (both sides of the fused/BLAS switch).
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings

import pytest
import torch

import lowbit
from lowbit import _cpu, _ops
from tests.helpers import TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = [1, 3, 64, 300]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fast")
    if _cpu.library() is None:
        pytest.skip("the fast CPU backend could not be built here (no C compiler); the reference runs instead")


@contextlib.contextmanager
def expect_calls(*names: str):
    """Fail unless each fast path in `names` ran inside the block (lowbit._cpu.CALLS grew)."""
    before = collections.Counter(_cpu.CALLS)
    yield
    ran = _cpu.CALLS - before
    missing = [n for n in names if not ran[n]]
    assert not missing, f"fast CPU path(s) {missing} did not run (ran: {dict(ran) or 'nothing'})"


def reference(fn, *args):
    old = os.environ["LOWBIT_CPU_BACKEND"]
    os.environ["LOWBIT_CPU_BACKEND"] = "reference"
    try:
        before = collections.Counter(_cpu.CALLS)
        out = fn(*args)
        assert _cpu.CALLS == before, "LOWBIT_CPU_BACKEND=reference must not run the fast path"
        return out
    finally:
        os.environ["LOWBIT_CPU_BACKEND"] = old


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def _path(m: int, dtype: torch.dtype, grad: bool = False, rows_ok: bool = True) -> str:
    limit = (_cpu.FUSED_M_GRAD if grad else _cpu.FUSED_M)[dtype]
    return "fused" if rows_ok and m <= limit else "gemm"


# ---------------------------------------------------------------- 4-bit LUT family


Q4_CASES = [  # (n, k, blocksize, quant_type, double_quant)
    (33, 128, 64, "nf4", True),
    (33, 130, 64, "fp4", False),  # K % blocksize != 0: blocks straddle rows (dequantize + BLAS)
    (40, 256, 32, "optimal", True),
    (24, 512, 128, "nf4", False),
]


@pytest.mark.parametrize("shape", [(33, 130), (1001,), (24, 512)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qt,bs", [("nf4", 64), ("fp4", 32), ("optimal", 128)])
def test_quantize_4bit_bit_identical(shape, dtype, qt, bs):
    w = torch.randn(shape).to(dtype)
    w.view(-1)[:bs] *= 1e-30  # a block of tiny values
    w.view(-1)[bs:2 * bs] = 0  # an all-zero block
    with expect_calls("nf4.quantize"):
        q = lowbit.quantize_4bit(w, bs, qt, True)
    r = reference(lowbit.quantize_4bit, w, bs, qt, True)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.code, r.code)
    assert all(torch.equal(a, b) for a, b in zip(q.scale_tensors(), r.scale_tensors()))


@pytest.mark.parametrize("n,k,bs,qt,dq", Q4_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_bit_identical(n, k, bs, qt, dq, dtype):
    q = lowbit.quantize_4bit(torch.randn(n, k), bs, qt, dq)
    with expect_calls("nf4.dequantize"):
        out = lowbit.dequantize_4bit(q, dtype)
    assert bits_equal(out, reference(lowbit.dequantize_4bit, q, dtype))


def test_dequantize_4bit_odd_numel_and_tiny_scales():
    # odd element count (a half-used last byte, a short last block), denormal and zero block scales
    w = torch.randn(7, 143)
    w[0, :64] *= 1e-39
    w[1, 64:128] = 0
    q = lowbit.quantize_4bit(w, 64, "nf4", False)
    for dtype in DTYPES:
        assert bits_equal(lowbit.dequantize_4bit(q, dtype), reference(lowbit.dequantize_4bit, q, dtype))


@pytest.mark.parametrize("n,k,bs,qt,dq", Q4_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_matmul_4bit_and_grad_x_vs_reference(n, k, bs, qt, dq, dtype, m):
    q = lowbit.quantize_4bit(torch.randn(n, k), bs, qt, dq)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    g = torch.randn(m, n).to(dtype)
    rows_ok = k % bs == 0
    fwd = {"fused": "nf4.gemv", "gemm": "nf4.dequant_gemm"}[_path(m, dtype, rows_ok=rows_ok)]
    bwd = {"fused": "nf4.grad_x", "gemm": "nf4.grad_x_gemm"}[_path(m, dtype, grad=True, rows_ok=rows_ok)]
    absmax, nabs, ncode, off = q.scale_tensors()
    args = (q.codes, absmax, q.code, bs)
    with expect_calls(fwd, bwd):
        y = _ops.matmul_4bit(x, *args, n, nabs, ncode, off, q.nested_blocksize, bias)
        gx = _ops.matmul_4bit_grad_x(g, *args, k, nabs, ncode, off, q.nested_blocksize)
    y_ref = reference(_ops.matmul_4bit, x, *args, n, nabs, ncode, off, q.nested_blocksize, bias)
    gx_ref = reference(_ops.matmul_4bit_grad_x, g, *args, k, nabs, ncode, off, q.nested_blocksize)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    assert gx.dtype == dtype and gx.shape == (m, k) and gx.is_contiguous()
    assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(gx, gx_ref) <= TOL[dtype]
    w64 = lowbit.dequantize_4bit(q, torch.float32).double()  # and against float64 math
    assert rel_err(y, x.double() @ w64.t() + bias.double()) <= TOL[dtype]
    assert rel_err(gx, g.double() @ w64) <= TOL[dtype]


def test_matmul_4bit_autograd_and_noncontiguous_input():
    q = lowbit.quantize_4bit(torch.randn(48, 256), 64, "nf4", True)
    x = torch.randn(256, 5).t().requires_grad_()  # a transposed view
    b = torch.randn(48, requires_grad=True)
    with expect_calls("nf4.gemv", "nf4.grad_x"):
        y = lowbit.matmul_4bit(x, q, b)
        gx, gb = torch.autograd.grad(y, (x, b), torch.ones_like(y))
    x64 = x.detach().double()
    w64 = lowbit.dequantize_4bit(q, torch.float32).double()
    assert rel_err(y, x64 @ w64.t() + b.detach().double()) <= 1e-6
    assert rel_err(gx, torch.ones(5, 48, dtype=torch.float64) @ w64) <= 1e-6


# ---------------------------------------------------------------- integer family


INT_CASES = [(2, None), (3, 32), (4, None), (4, 64), (3, 128)]


@pytest.mark.parametrize("bits,gs", INT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_dequantize_bit_identical(bits, gs, dtype):
    q = lowbit.quantize_int(torch.randn(33, 256), bits, gs)
    with expect_calls("int.dequantize"):
        out = lowbit.dequantize_int(q, dtype)
    assert bits_equal(out, reference(lowbit.dequantize_int, q, dtype))


@pytest.mark.parametrize("bits,gs", INT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_int_matmul_and_grads_vs_reference(bits, gs, dtype, m):
    n, k = 33, 256
    q = lowbit.quantize_int(torch.randn(n, k), bits, gs)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    g = torch.randn(m, n).to(dtype)
    w = (q.codes, q.scale, q.zeros, bits, q.group_len)
    fwd = {"fused": "int.gemv", "gemm": "int.dequant_gemm"}[_path(m, dtype)]
    bwd = {"fused": "int.grad_x", "gemm": "int.grad_x_gemm"}[_path(m, dtype, grad=True)]
    with expect_calls(fwd, bwd, "int.grad_scale"):
        y = _ops.int_matmul(x, *w, n, bias)
        gx = _ops.int_matmul_grad_x(g, *w, k)
        gs_ = _ops.int_matmul_grad_scale(g, x, q.codes, q.zeros, bits, q.group_len)
    assert y.dtype == dtype and gx.dtype == dtype and gs_.dtype == torch.float32
    assert rel_err(y, reference(_ops.int_matmul, x, *w, n, bias)) <= TOL[dtype]
    assert rel_err(gx, reference(_ops.int_matmul_grad_x, g, *w, k)) <= TOL[dtype]
    gs_ref = reference(_ops.int_matmul_grad_scale, g, x, q.codes, q.zeros, bits, q.group_len)
    assert rel_err(gs_, gs_ref) <= TOL[torch.float32]


def test_int_linear_training_step_matches_reference():
    layer = lowbit.IntLinear.from_linear(torch.nn.Linear(256, 40), bits=3, group_size=64)
    x = torch.randn(2, 5, 256)

    def step():
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), layer.scale.grad.clone()

    with expect_calls("int.gemv", "int.grad_scale"):
        y, gs = step()
    y_ref, gs_ref = reference(step)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(gs, gs_ref) <= 1e-5


# ---------------------------------------------------------------- threads, builds, switches


def test_threads_give_the_same_result(monkeypatch):
    # Fused kernels split output rows (columns for grad_x) between threads: results do not depend on
    # the thread count.
    monkeypatch.setattr(_cpu, "PARALLEL_MIN", 0)  # thread even this small weight
    q = lowbit.quantize_4bit(torch.randn(256, 512), 64, "nf4", True)
    qi = lowbit.quantize_int(torch.randn(256, 512), 4, None)
    x, g = torch.randn(3, 512), torch.randn(3, 256)
    absmax, nabs, ncode, off = q.scale_tensors()
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((lowbit.matmul_4bit(x, q), lowbit.dequantize_4bit(q), lowbit.matmul_int(x, qi),
                         lowbit.dequantize_int(qi), lowbit.quantize_4bit(x, 64, "nf4", False).codes,
                         _ops.matmul_4bit_grad_x(g, q.codes, absmax, q.code, 64, 512, nabs, ncode, off, 256),
                         _ops.int_matmul_grad_x(g, qi.codes, qi.scale, qi.zeros, 4, 512, 512)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("variant", ["generic", "no-gfni"])
def test_other_builds_match_reference(monkeypatch, variant):
    # The plain-C kernels (CPUs without AVX-512) and the AVX-512 ones without GFNI (e.g. Skylake-X),
    # built beside the default ones.
    import ctypes

    lib = ctypes.CDLL(str(_cpu.build(variant)))
    for name, args in _cpu._SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    monkeypatch.setitem(_cpu._STATE, "lib", lib)
    q = lowbit.quantize_4bit(torch.randn(33, 256), 32, "fp4", True)
    qi = lowbit.quantize_int(torch.randn(33, 256), 3, 64)
    x, g = torch.randn(3, 256), torch.randn(3, 33)
    absmax, nabs, ncode, off = q.scale_tensors()
    for dtype in DTYPES:
        assert bits_equal(lowbit.dequantize_4bit(q, dtype), reference(lowbit.dequantize_4bit, q, dtype))
        assert bits_equal(lowbit.dequantize_int(qi, dtype), reference(lowbit.dequantize_int, qi, dtype))
    with expect_calls("nf4.gemv", "nf4.grad_x", "int.gemv", "int.grad_x"):
        pairs = [(f, args) for f, args in [
            (_ops.matmul_4bit, (x, q.codes, absmax, q.code, 32, 33, nabs, ncode, off, 256, None)),
            (_ops.matmul_4bit_grad_x, (g, q.codes, absmax, q.code, 32, 256, nabs, ncode, off, 256)),
            (_ops.int_matmul, (x, qi.codes, qi.scale, qi.zeros, 3, 64, 33, None)),
            (_ops.int_matmul_grad_x, (g, qi.codes, qi.scale, qi.zeros, 3, 64, 256)),
        ]]
        outs = [f(*args) for f, args in pairs]
    for (f, args), out in zip(pairs, outs):
        assert rel_err(out, reference(f, *args)) <= 1e-5


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path):
    q = lowbit.quantize_4bit(torch.randn(16, 64), 64, "nf4", True)
    x = torch.randn(2, 64)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cpu, "_machine", lambda: "a machine never built for")  # no cached library either
    monkeypatch.setitem(_cpu._STATE, "tried", False)
    monkeypatch.setitem(_cpu._STATE, "lib", None)
    before = collections.Counter(_cpu.CALLS)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        y = lowbit.matmul_4bit(x, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        d = lowbit.dequantize_4bit(q)
    assert _cpu.CALLS == before
    assert torch.equal(y, reference(lowbit.matmul_4bit, x, q))
    assert torch.equal(d, reference(lowbit.dequantize_4bit, q))


def test_build_step_raising_falls_back(monkeypatch):
    def broken(variant="native"):
        raise OSError("compiler crashed")

    qi = lowbit.quantize_int(torch.randn(16, 64), 4, None)
    x = torch.randn(2, 64)
    monkeypatch.setattr(_cpu, "build", broken)
    monkeypatch.setitem(_cpu._STATE, "tried", False)
    monkeypatch.setitem(_cpu._STATE, "lib", None)
    with pytest.warns(RuntimeWarning, match="compiler crashed"):
        y = lowbit.matmul_int(x, qi)
    assert torch.equal(y, reference(lowbit.matmul_int, x, qi))


def test_backend_switch(monkeypatch):
    q = lowbit.quantize_4bit(torch.randn(16, 64), 64, "nf4", True)
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LOWBIT_CPU_BACKEND"):
        lowbit.dequantize_4bit(q)
    monkeypatch.delenv("LOWBIT_CPU_BACKEND")  # unset: the fast backend is the default
    with expect_calls("nf4.dequantize"):
        lowbit.dequantize_4bit(q)
    assert not _cpu.enabled(torch.empty(1, device="meta"))


def test_inconsistent_sizes_raise_instead_of_reading_out_of_bounds():
    q = lowbit.quantize_4bit(torch.randn(16, 64), 64, "nf4", False)
    with pytest.raises(ValueError, match="codes"):
        _ops.matmul_4bit(torch.randn(2, 64), q.codes[:-1], q.absmax, q.code, 64, 16, None, None, None, 256, None)
    qi = lowbit.quantize_int(torch.randn(16, 64), 3, 32)
    with pytest.raises(ValueError, match="scale"):
        _ops.int_matmul(torch.randn(2, 64), qi.codes, qi.scale[:-1], qi.zeros, 3, 32, 16, None)


def test_avx512_kernels_are_built_where_the_cpu_has_them():
    # A compile error in the AVX-512 code would otherwise go unnoticed: the build retries without
    # -march=native and every test still passes on the plain-C kernels.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not {"avx512f", "avx512bw", "avx512vl"} <= set(flags):
        pytest.skip("this CPU has no AVX-512")
    assert _cpu.library().lb_isa() == 1
