"""The fast CPU backend (lowbit/_cpu.py) against the pure-torch reference (LOWBIT_CPU_BACKEND=reference).

Dequantize must be bit-identical to the reference; matmuls and their gradients must match it within
the dtype tolerance of tests/helpers.py (fp32 accumulation: fp32 1e-5; bf16 uses a bf16 GEMM at large
M, fp16/bf16 1e-2). Every test checks with `_cpu.CALLS` that the path it names ran. Odd shapes: N=33,
K not a multiple of the block size (4-bit), M in 1, 3, 64, 300 (both sides of the fused/BLAS switch).
"""

from __future__ import annotations

import collections
import os
import warnings

import pytest
import torch

import lowbit
from lowbit import _clib, _cpu, _ops
from tests.helpers import TOL, expect_calls, rel_err, use_cpu_build

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = [1, 3, 64, 300]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fast")
    if _cpu.library() is None:
        pytest.skip("the fast CPU backend could not be built here (no C compiler); the reference runs instead")


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


# (bits, group_size, K). Codes are packed fields (format version 3); int3 rows are quads of 4 chunks of 32 codes,
# the last one short when K / 32 % 4 != 0 (K = 160, 224, 288: r = 1, 3, 1), decoded a whole quad at a time where
# the group length is a multiple of 128 and chunk by chunk elsewhere.
INT_CASES = [(2, None, 256), (3, 32, 256), (4, None, 256), (4, 64, 256), (3, 128, 256), (3, None, 160),
             (3, 32, 224), (3, 64, 192), (3, 128, 384), (2, 96, 288), (4, None, 96), (2, 32, 160)]


@pytest.mark.parametrize("bits,gs,k", INT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_dequantize_bit_identical(bits, gs, k, dtype):
    q = lowbit.quantize_int(torch.randn(33, k), bits, gs)
    with expect_calls("int.dequantize"):
        out = lowbit.dequantize_int(q, dtype)
    assert bits_equal(out, reference(lowbit.dequantize_int, q, dtype))


def test_int_dequantize_rectangles_and_every_code():
    # lb_dqi on sub-rectangles (what the chunked GEMM paths ask for), with every code value in every position
    from lowbit.formats import intq

    for bits, gs, k in INT_CASES:
        n = 9
        codes = (torch.arange(n * k) * 7 + torch.arange(n * k) // 5).remainder(2**bits).view(n, k)
        g = k // (gs or k)
        qi = intq.QuantInt(intq.pack_codes(codes, bits), torch.rand(n, g) + 0.5,
                           torch.randint(0, 2**bits, (n, g), dtype=torch.uint8), torch.Size((n, k)), torch.float32,
                           bits, gs)
        if gs is None:
            qi.scale, qi.zeros = qi.scale.view(n), qi.zeros.view(n)
        full = intq.reference_weight(qi.codes, qi.scale, qi.zeros, bits, qi.group_len, n, k)
        w = _cpu._WI(qi.codes, qi.scale, qi.zeros, bits, qi.group_len, n, k)
        for n0, nr, k0, kc in [(0, n, 0, k), (2, 5, 32, k - 64), (n - 1, 1, k - 32, 32)]:
            for dtype in DTYPES:
                out = torch.empty(nr, kc, dtype=dtype)
                w.rect(n0, nr, k0, kc, out)
                assert bits_equal(out, full[n0:n0 + nr, k0:k0 + kc].to(dtype)), (bits, gs, k, n0, k0, dtype)


@pytest.mark.parametrize("bits,gs,k", INT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_int_matmul_and_grads_vs_reference(bits, gs, k, dtype, m):
    n = 33
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
    use_cpu_build(monkeypatch, variant)
    q = lowbit.quantize_4bit(torch.randn(33, 256), 32, "fp4", True)
    qi = lowbit.quantize_int(torch.randn(33, 256), 3, 64)
    x, g = torch.randn(3, 256), torch.randn(3, 33)
    absmax, nabs, ncode, off = q.scale_tensors()
    for dtype in DTYPES:
        assert bits_equal(lowbit.dequantize_4bit(q, dtype), reference(lowbit.dequantize_4bit, q, dtype))
        assert bits_equal(lowbit.dequantize_int(qi, dtype), reference(lowbit.dequantize_int, qi, dtype))
    for bits, gs, k in INT_CASES:  # every integer layout and decode path, on these kernels too
        qk = lowbit.quantize_int(torch.randn(17, k), bits, gs)
        xk, gk = torch.randn(2, k), torch.randn(2, 17)
        bf16 = torch.bfloat16
        assert bits_equal(lowbit.dequantize_int(qk, bf16), reference(lowbit.dequantize_int, qk, bf16))
        wk = (qk.codes, qk.scale, qk.zeros, bits, qk.group_len)
        with expect_calls("int.gemv", "int.grad_x", "int.grad_scale"):
            outs = (_ops.int_matmul(xk, *wk, 17, None), _ops.int_matmul_grad_x(gk, *wk, k),
                    _ops.int_matmul_grad_scale(gk, xk, qk.codes, qk.zeros, bits, qk.group_len))
        refs = (reference(_ops.int_matmul, xk, *wk, 17, None), reference(_ops.int_matmul_grad_x, gk, *wk, k),
                reference(_ops.int_matmul_grad_scale, gk, xk, qk.codes, qk.zeros, bits, qk.group_len))
        assert all(rel_err(o, r) <= 1e-5 for o, r in zip(outs, refs)), (bits, gs, k)
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
    monkeypatch.setattr(_clib, "_machine", lambda: "a machine never built for")  # no cached library either
    monkeypatch.setitem(_clib._STATE, "tried", False)
    monkeypatch.setitem(_clib._STATE, "lib", None)
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
    monkeypatch.setattr(_clib, "build", broken)
    monkeypatch.setitem(_clib._STATE, "tried", False)
    monkeypatch.setitem(_clib._STATE, "lib", None)
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


# ---------------------------------------------------------------- SZ family (stream v2 decoder, lb_szd)


def _sz_stream(shape, eb=2e-3, chunk_size=4096, outliers=True, seed=0):
    from lowbit.formats import sz

    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    if outliers and w.numel() > 1:
        w.view(-1)[:: max(1, w.numel() // 5)] *= 400  # codes outside the alphabet: stored exactly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny tensor's stream is larger than the tensor
        return sz.sz_compress(w, eb, chunk_size=chunk_size)


SZ_CASES = [  # (shape, chunk_size): the layout each gives
    ((40, 30), 64),  # 2 lanes per chunk (K = 30): the plain-C lanes only, a short last chunk
    ((20, 37), 16),  # odd K: the flat layout, 32 lanes; the last chunk's lanes have unequal counts
    ((1001,), 16),  # 1-D: flat, 32 lanes of 16
    ((1001,), 4096),  # 1-D: one lane
    ((64, 96), 16),  # 32 lanes over 5 rows per chunk, 13 chunks: lockstep groups span chunks
    ((1,), 4096),  # one element
    ((3, 1), 4096),
]


@pytest.mark.parametrize("shape,chunk_size", SZ_CASES)
def test_sz_decode_bit_identical_to_reference(shape, chunk_size):
    from lowbit.formats import sz

    c = _sz_stream(shape, chunk_size=chunk_size)
    assert c.numel < 8 or len(c.outlier_idx)
    for dtype in DTYPES:
        with expect_calls("sz.decode"):
            out = lowbit.sz_decompress(c, dtype=dtype, allow_unbounded=True)
        assert bits_equal(out, sz.decode_reference(c, dtype)), (shape, dtype)


def test_sz_decode_large_threads_and_int64_offsets(monkeypatch):
    # Past SZ_PARALLEL_MIN: both threads; the same bits with one. int64 lane offsets (streams past 2**31 bits).
    from lowbit.formats import sz

    c = _sz_stream((256, 1024), eb=1e-3)
    args = c.decoder_args()
    old = torch.get_num_threads()
    try:
        for dtype in DTYPES:
            ref = sz.decode_vectorized(*args, c.numel, c.chunk_size, c.max_len, c.radius, dtype)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                with expect_calls("sz.decode"):
                    outs.append(_ops.sz_decode(*args, c.numel, c.chunk_size, c.max_len, c.radius, dtype, True))
            wide = (args[0], args[1].to(torch.int64), *args[2:])
            outs.append(_ops.sz_decode(*wide, c.numel, c.chunk_size, c.max_len, c.radius, dtype, False))
            assert all(bits_equal(o, ref) for o in outs), dtype
        ran = _cpu.CALLS["sz.decode"]
        out = _ops.sz_decode(*args, c.numel, c.chunk_size, c.max_len, c.radius, torch.float64, True)
        assert _cpu.CALLS["sz.decode"] == ran  # not an output dtype of the kernels: the numpy decoder
        assert torch.equal(out, sz.decode_vectorized(*args, c.numel, c.chunk_size, c.max_len, c.radius, torch.float64))
    finally:
        torch.set_num_threads(old)


def test_sz_version_1_stream_and_szlinear_forward():
    import torch.nn.functional as F
    import zlib

    from tests.test_sz import V1_BLOB, V1_DECODED_CRC
    from lowbit.formats import sz

    c = sz.SZTensor.from_bytes(V1_BLOB)  # re-packed as version 2
    for dtype, crc in V1_DECODED_CRC.items():
        with expect_calls("sz.decode"):
            out = lowbit.sz_decompress(c, dtype=dtype)
        assert zlib.crc32(out.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy().tobytes()) == crc
        assert bits_equal(out, sz.decode_reference(c, dtype))
    layer = lowbit.SZLinear.from_linear(torch.nn.Linear(96, 40), error_bound=2e-3)
    x = torch.randn(3, 96)
    with expect_calls("sz.decode"):
        y = layer(x)
    w = sz.decode_vectorized(*layer.to_sz().decoder_args(), 40 * 96, layer._chunk, layer._max_len, layer._radius,
                             torch.float32).view(40, 96)
    assert torch.equal(y, F.linear(x, w, layer.bias))


def test_sz_lying_lane_lengths_raise_as_the_numpy_decoder():
    import dataclasses

    import numpy as np

    from lowbit.formats import sz

    c = _sz_stream((40, 64), chunk_size=16)
    lb = c.lane_bits.copy()
    a = next(i for i in range(len(lb) - 1) if lb[i] != lb[i + 1])
    for moved in (1, -1, 5, lb[a + 1] - lb[a]):
        bad = lb.copy()
        bad[a] += moved
        bad[a + 1] -= moved  # the total is kept: the stream parses
        c2 = sz.SZTensor.from_bytes(dataclasses.replace(c, lane_bits=np.asarray(bad)).to_bytes())
        args = (*c2.decoder_args(), c2.numel, c2.chunk_size, c2.max_len, c2.radius, torch.float32)
        with pytest.raises(ValueError) as want:
            sz.decode_vectorized(*args)
        for check in (True, False):  # like the numpy decoder, the C decoder always checks (it costs nothing)
            with pytest.raises(ValueError) as got:
                _ops.sz_decode(*args, check)
            assert str(got.value) == str(want.value)
        with pytest.raises(ValueError, match="lane"):
            lowbit.sz_decompress(c2)
    p, start, *rest = c.decoder_args()
    start = start.clone()
    start[3] = 32 * p.numel() + 1  # past the payload: refused before decoding
    with pytest.raises(ValueError, match="lane 3 starts at bit"):
        _ops.sz_decode(p, start, *rest, c.numel, c.chunk_size, c.max_len, c.radius, torch.float32, True)
    with pytest.raises(ValueError, match="lane_start"):
        _ops.sz_decode(p, start[:-1], *rest, c.numel, c.chunk_size, c.max_len, c.radius, torch.float32, True)


def test_sz_generic_build_matches_reference(monkeypatch):
    # The plain-C decoder (CPUs without AVX-512), which AVX-512 builds also use for lanes not in octets.
    from lowbit.formats import sz

    use_cpu_build(monkeypatch, "generic")
    for shape, chunk_size in [((20, 37), 16), ((64, 96), 16)]:
        c = _sz_stream(shape, chunk_size=chunk_size)
        for dtype in DTYPES:
            with expect_calls("sz.decode"):
                out = lowbit.sz_decompress(c, dtype=dtype, allow_unbounded=True)
            assert bits_equal(out, sz.decode_reference(c, dtype))


def test_sz_no_compiler_falls_back_to_the_numpy_decoder(monkeypatch, tmp_path):
    from lowbit.formats import sz

    c = _sz_stream((20, 37), chunk_size=16)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_clib, "_machine", lambda: "a machine never built for")
    monkeypatch.setitem(_clib._STATE, "tried", False)
    monkeypatch.setitem(_clib._STATE, "lib", None)
    before = collections.Counter(_cpu.CALLS)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out = lowbit.sz_decompress(c, dtype=torch.bfloat16, allow_unbounded=True)
    assert _cpu.CALLS == before
    assert bits_equal(out, sz.decode_reference(c, torch.bfloat16))


# ---------------------------------------------------------------- fused GEMVs across K tiles
# lb_mv4 walks K in tiles of kt = min(256 bs, max(bs, 8192 / min(M, 4) // bs * bs)) columns (8192 at M=1,
# 2688 at M=3 and bs 64, 2048 at M >= 4) and adds each tile's sums into y; lb_mvi tiles by
# max(128, 8192 / min(M, 4) // 128 * 128); the transposes (lb_mv4t, lb_mvit) by 2048 / M columns. The cases
# above stop at K = 512, inside one tile: a kernel that overwrote y with the last tile's sum instead of
# adding to it (relative error 0.7) passed them. These shapes cross 2-4 tiles (the last one partial at
# M=3), with M=5 also running a 4-row and a 1-row pass; the oracle decodes the bytes itself (float64).

KTILE_CASES = [(1, 24576), (3, 8192), (4, 6144), (5, 6144)]  # (M, K): 3, 4 (the last partial), 3, 3 tiles


def _variant_lib(monkeypatch, variant):
    use_cpu_build(monkeypatch, variant)


@pytest.mark.parametrize("variant", ["native", "generic"])  # the AVX-512 kernels and the plain-C ones
@pytest.mark.parametrize("m,k", KTILE_CASES)
def test_fused_4bit_gemv_accumulates_across_k_tiles(monkeypatch, variant, m, k):
    from tests.helpers import nf4_oracle_weight

    _variant_lib(monkeypatch, variant)
    n = 6
    for bs, qt, dq in ((64, "nf4", True), (32, "fp4", False)):  # bs 64: the unrolled AVX-512 rows; 32: the others
        q = lowbit.quantize_4bit(torch.randn(n, k), bs, qt, dq)
        w64 = nf4_oracle_weight(q)
        x, g = torch.randn(m, k), torch.randn(m, n)
        absmax, nabs, ncode, off = q.scale_tensors()
        with expect_calls("nf4.gemv", "nf4.grad_x"):
            y = _ops.matmul_4bit(x, q.codes, absmax, q.code, bs, n, nabs, ncode, off, q.nested_blocksize, None)
            gx = _ops.matmul_4bit_grad_x(g, q.codes, absmax, q.code, bs, k, nabs, ncode, off, q.nested_blocksize)
        assert rel_err(y, x.double() @ w64.t()) <= TOL[torch.float32], (bs, qt)
        assert rel_err(gx, g.double() @ w64) <= TOL[torch.float32], (bs, qt)


@pytest.mark.parametrize("variant", ["native", "generic"])
@pytest.mark.parametrize("m,k", KTILE_CASES)
def test_fused_int_gemv_accumulates_across_k_tiles(monkeypatch, variant, m, k):
    from tests.helpers import int_oracle_weight as oracle_weight

    _variant_lib(monkeypatch, variant)
    n = 5
    for bits, gs in ((4, 128), (3, None), (2, 64)):  # int3 per row: a quad-less tail at no K here; groups of 128
        q = lowbit.quantize_int(torch.randn(n, k), bits, gs)
        w64 = oracle_weight(q)
        x, g = torch.randn(m, k), torch.randn(m, n)
        w = (q.codes, q.scale, q.zeros, bits, q.group_len)
        with expect_calls("int.gemv", "int.grad_x"):
            y = _ops.int_matmul(x, *w, n, None)
            gx = _ops.int_matmul_grad_x(g, *w, k)
        assert rel_err(y, x.double() @ w64.t()) <= TOL[torch.float32], (bits, gs)
        assert rel_err(gx, g.double() @ w64) <= TOL[torch.float32], (bits, gs)


@pytest.mark.parametrize("chunk_rows", [None, 7, 33])  # one chunk (y = x @ W^T direct); 5 chunks, ragged last; 1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["nf4", "int3"])
def test_dequant_gemm_chunking_vs_float64(monkeypatch, chunk_rows, dtype, family):
    # The large-M path dequantizes CHUNK_BYTES of rows at a time. A weight that fits one chunk takes a direct
    # x @ W^T; others write y^T chunk by chunk. Catches a wrong chunk offset, a dropped last chunk, a bias added
    # twice or not at all, a transposed or non-contiguous result on either side.
    n, k, m = 33, 256, 70
    if chunk_rows is not None:
        itemsize = 2 if dtype == torch.bfloat16 else 4
        monkeypatch.setattr(_cpu, "CHUNK_BYTES", chunk_rows * k * itemsize)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    if family == "nf4":
        q = lowbit.quantize_4bit(torch.randn(n, k), 64, "nf4", True)
        absmax, nabs, ncode, off = q.scale_tensors()
        w64 = lowbit.dequantize_4bit(q, torch.float32).double()
        with expect_calls("nf4.dequant_gemm"):
            y = _ops.matmul_4bit(x, q.codes, absmax, q.code, 64, n, nabs, ncode, off, q.nested_blocksize, bias)
    else:
        q = lowbit.quantize_int(torch.randn(n, k), 3, 64)
        w64 = reference(_ops.int_dequantize, q.codes, q.scale, q.zeros, 3, q.group_len, n, k, torch.float32).double()
        with expect_calls("int.dequant_gemm"):
            y = _ops.int_matmul(x, q.codes, q.scale, q.zeros, 3, q.group_len, n, bias)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    assert rel_err(y, x.double() @ w64.t() + bias.double()) <= TOL[dtype]
