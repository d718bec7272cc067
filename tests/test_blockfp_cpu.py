"""The block-FP family's C backend (lowbit/_blockfp_cpu.py, lowbit/csrc/blockfp.c): MXFP4 / NVFP4 dequantize, the fused
decode-GEMV (small M), the dequantize + BLAS path (large M) and grad_x, on the AVX-512 kernels and the plain-C ones.

Oracle, independent of the code under test: W decoded here in float64 from the documented layout (the 16 E2M1
values written out, byte j = code 2j | code 2j+1 << 4, E8M0 = 2.0 ** (byte - 127), E4M3 from its bit fields divided
by the global scale in fp32). Dequantize must be bit-identical to formats.blockfp.dequantize_blockfp (and to the
oracle rounded once); matmuls are checked element by element against float64 math:
|y - ref| <= TOL[dtype] * (|x| @ |W|^T + |bias|) + the dtype's smallest subnormal, a bound that does not depend on
the scale of a row (scale bytes span E8M0's range here). Random inputs are fresh every run (tests/conftest.py's
seed). Outputs the C kernels write are NaN-filled first (LOWBIT_POISON=1, set by tests/conftest.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from lowbit import _blockfp_cpu, _clib, _cpu
from lowbit.formats.blockfp import QuantBlockFP, dequantize_blockfp, scale_table
from tests.helpers import expect_calls, use_cpu_build

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = {"mxfp4": 32, "nvfp4": 16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Element-wise bound relative to |x| @ |W|^T: fp32 accumulation (K <= 8k); bf16: the large-M path's bf16 GEMM rounds
# W to bf16 (2^-9) and y (2^-9); fp16: y rounded (2^-11), x exact in both.
TOL = {torch.float32: 3e-5, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
# Scale bytes drawn per block: "narrow" keeps every block of a row within 2^3 of the others (an error in any
# one block shows), "wide" spans the format (E8M0 2^-127 .. 2^103: up to 2^103 so that y stays finite; E4M3: 0,
# the subnormals 1..7, up to 448).
SCALE_RANGE = {("mxfp4", "narrow"): (124, 130), ("mxfp4", "wide"): (0, 230),
               ("nvfp4", "narrow"): (0x30, 0x48), ("nvfp4", "wide"): (0x00, 0x7E)}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fast")
    if not _blockfp_cpu.enabled(torch.empty(0)):
        pytest.skip("the fast CPU backend could not be built here (no C compiler)")
    assert os.environ.get("LOWBIT_POISON") == "1", "tests/conftest.py sets LOWBIT_POISON=1: outputs start as NaN"


# ---------------------------------------------------------------- weights and the oracle


def e4m3_value(byte: int) -> float:
    exp, man = (byte >> 3) & 15, byte & 7
    v = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return -v if byte & 0x80 else v


def make_weight(qt: str, n: int, k: int, scale_range: str = "narrow", gscale: float | None = None):
    """(packed, scales, table, block, q): every code equally likely (-0 included), scale bytes uniform in the range,
    the table from formats.blockfp.scale_table (checked against the oracle's own factors)."""
    block = BLOCK[qt]
    lo, hi = SCALE_RANGE[(qt, scale_range)]
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = torch.randint(lo, hi + 1, (n, k // block), dtype=torch.uint8)
    g = None
    if qt == "nvfp4":
        g = torch.tensor(gscale if gscale is not None else math.exp(torch.empty(()).uniform_(-2, 7).item()),
                         dtype=torch.float32)
    q = QuantBlockFP(qt, (n, k), packed, scales, g)
    table = scale_table(q)
    assert torch.equal(table[lo:hi + 1], oracle_factors(qt, g)[lo:hi + 1]), "scale_table disagrees with the oracle"
    return packed, scales, table, block, q


def oracle_factors(qt: str, g) -> torch.Tensor:
    """fp32 [256] factor of each valid scale byte, from the formats' definitions (not from lowbit)."""
    if qt == "mxfp4":
        return torch.tensor([2.0 ** (b - 127) for b in range(256)], dtype=torch.float64).float()
    return torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float32) / g


def oracle_weight(qt: str, q: QuantBlockFP) -> torch.Tensor:
    """W [n, k] float64: E2M1[code] * factor, codes unpacked low nibble first (exact: 3 bits times 24)."""
    n, k = q.shape
    p = q.packed.long()
    codes = torch.empty(n, k, dtype=torch.long)
    codes[:, 0::2], codes[:, 1::2] = p & 15, p >> 4
    f = oracle_factors(qt, q.global_scale).double()[q.scales.long()]
    return torch.tensor(E2M1, dtype=torch.float64)[codes] * f.repeat_interleave(BLOCK[qt], dim=1)


def assert_close(out: torch.Tensor, a: torch.Tensor, b64: torch.Tensor, dtype, bias=None, transpose=True):
    """out vs a @ b64^T (+ bias) (transpose) or a @ b64, element by element, relative to |a| @ |b|."""
    a64 = a.double()
    ref = a64 @ (b64.t() if transpose else b64)
    bound = a64.abs() @ (b64.abs().t() if transpose else b64.abs())
    if bias is not None:
        ref, bound = ref + bias.double(), bound + bias.double().abs()
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    err = (out.double() - ref).abs()
    ok = err <= TOL[dtype] * bound + TINY[dtype]
    if not bool(ok.all()):
        i = tuple(int(t) for t in (~ok).nonzero()[0])
        raise AssertionError(f"{int((~ok).sum())} of {ok.numel()} elements off; first {i}: got {float(out[i])}, "
                             f"want {float(ref[i])} (bound {float(TOL[dtype] * bound[i])})")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def noncontiguous(m: int, k: int, dtype) -> torch.Tensor:
    x = torch.randn(m, 2 * k).to(dtype)[:, ::2]
    assert not x.is_contiguous()
    return x


# ---------------------------------------------------------------- dequantize

SHAPES = {"mxfp4": [(1, 32 * 3), (7, 32 * 5), (577, 576)], "nvfp4": [(1, 16 * 3), (7, 16 * 5), (577, 576)]}


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_identical_every_scale_byte_and_code(qt, dtype):
    # Every valid scale byte (E8M0 0..254 incl. 2^-127; E4M3 0, the subnormals 1..7, up to 448) and every code
    # (-0 included, whose sign must survive): bit for bit the reference, and the oracle rounded once.
    lo, hi = (0, 254) if qt == "mxfp4" else (0, 0x7E)
    for n, k in SHAPES[qt]:
        packed, scales, table, block, q = make_weight(qt, n, k, "wide")
        flat = scales.view(-1)
        flat[: min(flat.numel(), hi - lo + 1)] = torch.arange(lo, hi + 1, dtype=torch.uint8)[: flat.numel()]
        packed.view(-1)[:8] = torch.tensor([0x80, 0x08, 0x88, 0x01, 0x10, 0xF7, 0x7F, 0x9A], dtype=torch.uint8)
        with expect_calls("blockfp.dequantize"):
            w = _blockfp_cpu.dequantize(packed, scales, table, block, n, k, dtype)
        assert bits_equal(w, dequantize_blockfp(q, dtype)), (n, k)
        assert bits_equal(w, oracle_weight(qt, q).float().to(dtype)), (n, k)
        # bytes 0x80, 0x08, 0x88: codes 0, 8 (-0), 8, 0, 8, 8 (low nibble first)
        assert torch.signbit(w[0, :6]).tolist() == [False, True, True, False, True, True]


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
def test_dequantize_rectangles(qt):
    # The chunked paths dequantize row ranges and column ranges; unaligned ranges take the scalar head/tail.
    n, k = 9, 6 * 32
    packed, scales, table, block, q = make_weight(qt, n, k, "narrow")
    full = dequantize_blockfp(q)
    w = _blockfp_cpu._WB(packed, scales, table, block, n, k)
    for n0, nr, k0, kc in [(0, 9, 0, k), (2, 5, 32, 64), (3, 1, 16, 48), (1, 7, 5, 100), (8, 1, 0, 33), (0, 2, 191, 1)]:
        out = torch.full((nr, kc), float("nan"))
        w.rect(n0, nr, k0, kc, out)
        assert bits_equal(out, full[n0:n0 + nr, k0:k0 + kc].contiguous()), (n0, nr, k0, kc)


# ---------------------------------------------------------------- GEMV (small M)


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype,scale_range", [(torch.float32, "narrow"), (torch.float32, "wide"),
                                               (torch.bfloat16, "narrow"), (torch.bfloat16, "wide"),
                                               (torch.float16, "narrow")])  # fp16 can not hold y for wide scales
def test_gemv_vs_float64(qt, dtype, scale_range):
    block = BLOCK[qt]
    shapes = [(1, block * 3), (7, block * 5), (577, 576), (33, block * 45)]
    for i, (n, k) in enumerate(shapes):
        packed, scales, table, block, q = make_weight(qt, n, k, scale_range)
        w64 = oracle_weight(qt, q)
        for m in (1, 2, 3, 4, 5, 8, _blockfp_cpu.FUSED_M[dtype]):
            x = noncontiguous(m, k, dtype) if (m + i) % 2 else torch.randn(m, k).to(dtype)
            bias = None if m % 3 == 1 else torch.randn(n).to((torch.float32, dtype)[m % 2])
            with expect_calls("blockfp.gemv"):
                y = _blockfp_cpu.matmul(x, packed, scales, table, block, n, bias)
            assert y.is_contiguous()
            assert_close(y, x, w64, dtype, bias)


@pytest.mark.parametrize("variant", ["native", "generic"])  # the AVX-512 kernels and the plain-C ones
@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
def test_gemv_k_tiles_tails_and_both_builds(monkeypatch, variant, qt):
    # K past one tile of x (8192 / min(M, 4) columns, then 32-column steps; nvfp4 rows ending in a 16-column half
    # step), M not a multiple of 4, fp32 / bf16 x read directly by C, the bias added once.
    use_cpu_build(monkeypatch, variant)
    assert variant == "native" or _clib.library().lb_isa() == 0
    block = BLOCK[qt]
    for m, k in ((1, block * 515 if qt == "nvfp4" else 32 * 257), (3, block * 173), (5, block * 193), (2, block * 7)):
        n = 6
        packed, scales, table, block, q = make_weight(qt, n, k, "narrow")
        w64 = oracle_weight(qt, q)
        for dtype in (torch.float32, torch.bfloat16):
            x, bias = torch.randn(m, k).to(dtype), torch.randn(n)
            with expect_calls("blockfp.gemv", "blockfp.dequantize"):
                y = _blockfp_cpu.matmul(x, packed, scales, table, block, n, bias)
                w = _blockfp_cpu.dequantize(packed, scales, table, block, n, k, dtype)
            assert_close(y, x, w64, dtype, bias)
            assert bits_equal(w, dequantize_blockfp(q, dtype))


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
def test_generic_build_wide_scales_and_odd_shapes(monkeypatch, qt):
    use_cpu_build(monkeypatch, "generic")
    assert _clib.library().lb_isa() == 0
    block = BLOCK[qt]
    for n, k in ((1, block * 3), (7, block * 5), (577, 576)):
        packed, scales, table, block, q = make_weight(qt, n, k, "wide")
        w64 = oracle_weight(qt, q)
        for m in (1, 4, 6):
            x = noncontiguous(m, k, torch.float16 if m == 4 else torch.float32)
            if m == 4:  # fp16 x and y: scales that keep y finite
                scales.clamp_(*SCALE_RANGE[(qt, "narrow")])
                w64 = oracle_weight(qt, q)
            bias = torch.randn(n) if m > 1 else None
            with expect_calls("blockfp.gemv"):
                y = _blockfp_cpu.matmul(x, packed, scales, table, block, n, bias)
            assert_close(y, x, w64, x.dtype, bias)


def test_threads_give_the_same_result(monkeypatch):
    # Threads split N; each output element is computed the same way whoever computes it.
    monkeypatch.setattr(_cpu, "PARALLEL_MIN", 0)
    packed, scales, table, block, q = make_weight("nvfp4", 101, 16 * 41, "wide")
    x = torch.randn(3, 16 * 41)
    old, outs = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((_blockfp_cpu.matmul(x, packed, scales, table, block, 101, None),
                         _blockfp_cpu.dequantize(packed, scales, table, block, 101, 16 * 41, torch.bfloat16)))
    finally:
        torch.set_num_threads(old)
    assert all(bits_equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
    assert_close(outs[0][0], x, oracle_weight("nvfp4", q), torch.float32)


# ---------------------------------------------------------------- large M (dequantize + BLAS) and grad_x


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [None, 7])  # one chunk (x @ W^T direct); 83 chunks of 7 rows, ragged last
def test_large_m_chunked_vs_float64(monkeypatch, qt, dtype, chunk_rows):
    n, k, m = 577, 576, _blockfp_cpu.FUSED_M[dtype] + 1 + (40 if chunk_rows else 0)
    if chunk_rows is not None:
        monkeypatch.setattr(_cpu, "CHUNK_BYTES", chunk_rows * k * (2 if dtype == torch.bfloat16 else 4))
    packed, scales, table, block, q = make_weight(qt, n, k, "narrow")
    if dtype == torch.float32:  # wide but normal: keep BLAS products out of fp32 subnormals
        scales.copy_(torch.randint(30, 231, scales.shape) if qt == "mxfp4" else torch.randint(0, 0x7F, scales.shape))
    w64 = oracle_weight(qt, q)
    x = noncontiguous(m, k, dtype)
    for bias in (None, torch.randn(n).to(dtype)):
        with expect_calls("blockfp.dequant_gemm"):
            y = _blockfp_cpu.matmul(x, packed, scales, table, block, n, bias)
        assert y.is_contiguous()
        assert_close(y, x, w64, dtype, bias)


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_x_vs_float64(monkeypatch, qt, dtype):
    block = BLOCK[qt]
    for n, k, m, chunk_cols in ((7, block * 5, 1, None), (577, 576, 3, None), (33, block * 45, 20, 64)):
        if chunk_cols:  # 64-column chunks, the last one ragged (nvfp4: 16 columns)
            monkeypatch.setattr(_cpu, "CHUNK_BYTES", chunk_cols * n * (2 if dtype == torch.bfloat16 else 4))
        packed, scales, table, block, q = make_weight(qt, n, k, "narrow")
        g = noncontiguous(m, n, dtype)
        with expect_calls("blockfp.grad_x_gemm"):
            gx = _blockfp_cpu.grad_x(g, packed, scales, table, block, k)
        assert gx.is_contiguous()
        assert_close(gx, g, oracle_weight(qt, q), dtype, transpose=False)


# ---------------------------------------------------------------- edges and checks


def test_empty_inputs_and_bad_sizes():
    packed, scales, table, block, q = make_weight("mxfp4", 5, 64)
    assert _blockfp_cpu.matmul(torch.randn(0, 64), packed, scales, table, block, 5, None).shape == (0, 5)
    assert _blockfp_cpu.grad_x(torch.randn(0, 5), packed, scales, table, block, 64).shape == (0, 64)
    with pytest.raises(ValueError, match="packed must be uint8"):
        _blockfp_cpu.matmul(torch.randn(2, 64), packed[:4], scales, table, block, 5, None)
    with pytest.raises(ValueError, match="scales must be uint8"):
        _blockfp_cpu.matmul(torch.randn(2, 64), packed, scales[:, :1], table, block, 5, None)
    with pytest.raises(ValueError, match="multiple of the block"):
        _blockfp_cpu.dequantize(packed, scales, table, 32, 10, 32 + 16, torch.float32)
    with pytest.raises(ValueError, match="block must be 16"):
        _blockfp_cpu.dequantize(packed, scales, table, 64, 5, 64, torch.float32)
    with pytest.raises(ValueError, match="256 values"):
        _blockfp_cpu.dequantize(packed, scales, table[:16], block, 5, 64, torch.float32)
    with pytest.raises(ValueError, match="bias must have 5"):
        _blockfp_cpu.matmul(torch.randn(2, 64), packed, scales, table, block, 5, torch.randn(4))


def test_gemv_allocation_failure_raises_memory_error():
    lib = _clib.library()
    with pytest.raises(MemoryError, match="lb_blockfp_gemv: out of memory"):
        lib.lb_blockfp_gemv(None, 0, 1 << 20, 1 << 40, None, None, None, 32, 1, None, None, 1)
