"""blockfp (MXFP4 / NVFP4) Triton kernels in the interpreter (lowbit.kernels.blockfp), called through their
launchers, against W decoded here in float64 from the documented byte layout (not lowbit's decoder):
the words GEMV (M <= 4), the dot GEMM, grad_x, the dequantize kernel and the CPU defaults.

Weights are random bytes (every E2M1 code, -0 included; scale bytes over the valid range, nvfp4's
E4M3 subnormals 1..7 forced in), N = 70 (not a multiple of any tile: the last N tile is masked),
K = 256 (several K steps and tiles per program, splits > 1)."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import blockfp as bfp
from tests.helpers import TOL, expect_launches, rel_err

interp = pytest.mark.interp  # skipped where TRITON_INTERPRET is off (tests/conftest.py)
pytestmark = interp
K_ = pytest.importorskip("lowbit.kernels.blockfp")

# The spec's E2M1 values (lowbit.formats.blockfp's docstring), written out: index = 4-bit code.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)
BLOCK = {"mxfp4": 32, "nvfp4": 16}
N, K = 70, 256
C, G = K_.MatmulConfig, K_.GradXConfig


def oracle_weight(packed: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, block: int) -> torch.Tensor:
    """W [n, k] in float64 from the bytes: element 2j of a row is the LOW nibble of byte j, its factor
    table[scale byte of block k // block]."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()
    factor = table.double()[scales.long()].repeat_interleave(block, dim=1)
    return E2M1[codes] * factor


def make_weight(qt: str, n: int = N, k: int = K, scale_bytes=None, max_code: int = 15):
    """(QuantBlockFP, scale table) from random bytes. Scale bytes: mxfp4 127 +- 6 (products stay in
    fp16's range), nvfp4 0x00..0x7E (every E4M3 byte but NaN; 1..7 subnormal) unless given."""
    block = BLOCK[qt]
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    if max_code < 15:  # magnitudes <= max_code, either sign
        codes = (codes & 7).clamp(max=max_code) | (codes & 8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    if scale_bytes is None:
        scale_bytes = torch.arange(121, 134) if qt == "mxfp4" else torch.arange(0, 0x7F)
    scales = scale_bytes[torch.randint(0, len(scale_bytes), (n, k // block))].to(torch.uint8)
    if qt == "nvfp4" and scale_bytes.max() >= 7:
        scales[:7, 0] = torch.arange(1, 8, dtype=torch.uint8)  # the E4M3 subnormals, in some block for sure
    g = torch.tensor(10.0) if qt == "nvfp4" else None
    q = bfp.QuantBlockFP(qt, (n, k), packed.contiguous(), scales.contiguous(), g)
    bfp.validate(q)
    return q, bfp.scale_table(q)


def run_forward(q, table, x, bias, cfg):
    return K_.matmul_blockfp(x, q.packed, q.scales, table, q.block, q.out_features, bias, config=cfg)


def bias_like(w64, dtype):
    """A bias as large as the products (|x @ W^T| ~ sqrt(K) mean|W| for x ~ N(0, 1)): one far smaller would
    pass unnoticed if dropped, at bf16's tolerance."""
    return (torch.randn(w64.shape[0]) * float(w64.abs().mean()) * w64.shape[1] ** 0.5).to(dtype)


def expected(x, w64, bias):
    y = x.double() @ w64.t()
    return y if bias is None else y + bias.double()


def test_oracle_matches_the_format_reference():
    """The test's own decoder agrees with lowbit.formats.blockfp.dequantize_blockfp bit for bit (a cross-check
    of the oracle: both read the documented layout)."""
    for qt in ("mxfp4", "nvfp4"):
        q, table = make_weight(qt)
        assert torch.equal(oracle_weight(q.packed, q.scales, table, q.block).float(), bfp.dequantize_blockfp(q))


WORDS_CASES = [  # (quant type, dtype, M, config, bias): the interpreter table's two words configs first
    ("nvfp4", torch.bfloat16, 1, K_.INTERPRETER_FORWARD[0], True),
    ("mxfp4", torch.bfloat16, 4, K_.INTERPRETER_FORWARD[1], True),
    ("mxfp4", torch.float16, 2, C("words", 4, 32, 32, 1, 1, 1), False),
    ("nvfp4", torch.float32, 3, C("words", 4, 32, 32, 4, 1, 1), True),
    ("nvfp4", torch.float16, 4, C("words", 4, 64, 64, 1, 1, 1), False),
]


@pytest.mark.parametrize("qt,dtype,m,cfg,bias", WORDS_CASES)
def test_words_gemv_against_float64(qt, dtype, m, cfg, bias):
    """The words GEMV at M = 1..4, one and two 32-code tiles per step, splits 1/2/4 (counter-reduced in
    the launch), a masked last row tile, bias or not, both quant types and every activation dtype.
    Catches: nibble order, an nvfp4 tile's two blocks scaled by the wrong factor, a dropped split
    partial or bias, rows of the last tile lost. Called twice when split: the counters must reset."""
    assert cfg.kind == "words"
    q, table = make_weight(qt)
    w64 = oracle_weight(q.packed, q.scales, table, q.block)
    b = bias_like(w64, dtype) if bias else None
    for _ in range(2 if cfg.split_k > 1 else 1):
        x = torch.randn(m, K, dtype=dtype)
        with expect_launches("blockfp.words"):
            y = run_forward(q, table, x, b, cfg)
        assert y.dtype == dtype and y.shape == (m, N)
        assert rel_err(y, expected(x, w64, b)) <= TOL[dtype]
    from lowbit.kernels._common import WORKSPACES

    assert all(int(c.abs().sum()) == 0 for _, c in WORKSPACES.values())


DOT_CASES = [  # (quant type, dtype, M, config index in INTERPRETER_FORWARD, bias)
    ("nvfp4", torch.float32, 5, 2, True),
    ("mxfp4", torch.bfloat16, 40, 2, False),
    ("mxfp4", torch.float16, 17, 3, True),
    ("nvfp4", torch.bfloat16, 33, 3, True),
]


@pytest.mark.parametrize("qt,dtype,m,ci,bias", DOT_CASES)
def test_dot_forward_against_float64(qt, dtype, m, ci, bias):
    """The tiled tl.dot kernel, M = 5..40 (several M tiles in grouped order), both dot configs of the
    interpreter table: a 32-column tile (one mxfp4 block: the per-row scale; two nvfp4 blocks: per
    column pair) split in two, and a 64-column tile. Catches: swapped even/odd halves, the scale of
    the wrong block, a dropped split-K partial, a dropped bias, the masked last N tile."""
    cfg = K_.INTERPRETER_FORWARD[ci]
    assert cfg.kind == "dot"
    q, table = make_weight(qt)
    w64 = oracle_weight(q.packed, q.scales, table, q.block)
    x = torch.randn(m, K, dtype=dtype)
    b = bias_like(w64, dtype) if bias else None
    with expect_launches("blockfp.dot", absent=("blockfp.dequantize",)):
        y = run_forward(q, table, x, b, cfg)
    assert y.dtype == dtype and y.shape == (m, N)
    assert rel_err(y, expected(x, w64, b)) <= TOL[dtype]


GRAD_X_CASES = [("nvfp4", torch.bfloat16, 0), ("mxfp4", torch.float32, 0), ("mxfp4", torch.float16, 1),
                ("nvfp4", torch.float32, 1)]


@pytest.mark.parametrize("qt,dtype,ci", GRAD_X_CASES)
def test_grad_x_against_float64(qt, dtype, ci):
    """gx = g @ W with each interpreter grad_x config (32- and 64-column output tiles, N split in two or
    not, N = 70 masked). Catches: even/odd output columns interleaved the wrong way, wrong block scale,
    a dropped N split, masked W rows read as data."""
    cfg = K_.INTERPRETER_GRAD_X[ci]
    q, table = make_weight(qt)
    w64 = oracle_weight(q.packed, q.scales, table, q.block)
    g = torch.randn(9, N, dtype=dtype)
    with expect_launches("blockfp.grad_x"):
        gx = K_.matmul_blockfp_grad_x(g, q.packed, q.scales, table, q.block, K, config=cfg)
    assert gx.dtype == dtype and gx.shape == (9, K)
    assert rel_err(gx, g.double() @ w64) <= TOL[dtype]


def test_the_cases_cover_every_interpreter_config():
    """A config added to the interpreter tables must be added to a case above."""
    words = {c[3] for c in WORDS_CASES}
    dots = {K_.INTERPRETER_FORWARD[c[3]] for c in DOT_CASES}
    assert set(K_.INTERPRETER_FORWARD) <= words | dots
    assert set(range(len(K_.INTERPRETER_GRAD_X))) == {c[2] for c in GRAD_X_CASES}


def test_cpu_defaults_pick_words_dot_grad_x_and_dequant():
    """config=None on CPU: M <= 4 takes the words GEMV, M = 5 the dot kernel, grad_x its kernel; nvfp4 with
    K = 48 (not a multiple of 32: no words tile, no 16-column dot half) falls back to DEQUANT (dequantize
    kernel + torch), still exact. Catches a default that silently takes another path."""
    q, table = make_weight("nvfp4")
    w64 = oracle_weight(q.packed, q.scales, table, q.block)
    for m, kind in ((1, "words"), (4, "words"), (5, "dot")):
        x = torch.randn(m, K)
        with expect_launches(f"blockfp.{kind}", absent=("blockfp.dequantize",)):
            y = run_forward(q, table, x, None, None)
        assert rel_err(y, expected(x, w64, None)) <= TOL[torch.float32], m
    q48, t48 = make_weight("nvfp4", n=24, k=48)
    w48 = oracle_weight(q48.packed, q48.scales, t48, 16)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    b = torch.randn(24, dtype=torch.bfloat16)
    with expect_launches("blockfp.dequantize", absent=("blockfp.words", "blockfp.dot")):
        y = run_forward(q48, t48, x, b, None)
    assert y.dtype == torch.bfloat16 and rel_err(y, expected(x, w48, b)) <= TOL[torch.bfloat16]
    g = torch.randn(6, 24)
    with expect_launches("blockfp.dequantize", absent=("blockfp.grad_x",)):
        gx = K_.matmul_blockfp_grad_x(g, q48.packed, q48.scales, t48, 16, 48)
    assert rel_err(gx, g.double() @ w48) <= TOL[torch.float32]


@pytest.mark.parametrize("qt", ["mxfp4", "nvfp4"])
def test_extreme_scale_bytes_every_kernel(qt):
    """Scale bytes at the ends of the valid range, fp32 activations scaled so that the results stay finite:
    mxfp4 E8M0 bytes 0..3 (2^-127, an fp32 subnormal, ..) and 250..254 (2^127 with codes <= 1.5), nvfp4
    E4M3 bytes 1..7 (subnormal) and 0x78..0x7E (448).
    Each element's error is bounded by 1e-5 of |x| @ |W|^T (the size of the terms it sums, whatever their
    scale and cancellation). Catches a factor decoded in another precision or a kernel that applies it
    in a range that overflows or flushes to zero."""
    lo, hi = (torch.arange(0, 4), torch.arange(250, 255)) if qt == "mxfp4" else (torch.arange(1, 8), torch.arange(0x78, 0x7F))
    for pool, x_scale in ((lo, 2.0**40 if qt == "mxfp4" else 1.0), (hi, 2.0**-40 if qt == "mxfp4" else 1.0)):
        q, table = make_weight(qt, n=40, scale_bytes=pool, max_code=3 if qt == "mxfp4" else 15)
        w64 = oracle_weight(q.packed, q.scales, table, q.block)
        assert torch.isfinite(w64).all()
        for cfg, m in ((K_.INTERPRETER_FORWARD[0], 1), (K_.INTERPRETER_FORWARD[3], 6)):
            x = torch.randn(m, K) * x_scale
            with expect_launches(f"blockfp.{cfg.kind}"):
                y = run_forward(q, table, x, None, cfg)
            assert_within_terms(y, x, w64.t())
        g = torch.randn(5, 40) * x_scale
        with expect_launches("blockfp.grad_x"):
            gx = K_.matmul_blockfp_grad_x(g, q.packed, q.scales, table, q.block, K, config=K_.INTERPRETER_GRAD_X[0])
        assert_within_terms(gx, g, w64)


def assert_within_terms(out, a, b, tol=1e-5):
    """|out - a @ b| <= tol * (|a| @ |b|) element by element, in float64 (out finite)."""
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(out).all()
    err = (out.double() - a64 @ b64).abs() / (a64.abs() @ b64.abs())
    assert float(err.max()) <= tol, float(err.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_kernel_is_bit_exact(dtype):
    """The DEQUANT path's kernel reproduces the format's reference bit for bit in every dtype (one fp32
    product per element, rounded once). Catches nibble order, block index, masking of the tail."""
    for qt in ("mxfp4", "nvfp4"):
        q, table = make_weight(qt, n=13)  # 13 * 256 elements: the last 1024-element program is partial
        with expect_launches("blockfp.dequantize"):
            w = K_.dequantize_blockfp(q.packed, q.scales, table, q.block, 13, K, dtype)
        assert w.dtype == dtype and torch.equal(w, bfp.dequantize_blockfp(q, dtype))


def test_words_gemv_takes_codes_at_an_odd_byte_offset():
    """packed may be a view that starts at an odd byte (valid uint8 storage): the words GEMV must not read
    it as misaligned int32 words (the launcher copies it). Catches a launcher that views it as is."""
    q, table = make_weight("mxfp4")
    buf = torch.zeros(q.packed.numel() + 1, dtype=torch.uint8)
    buf[1:] = q.packed.reshape(-1)
    odd = buf[1:].view(N, K // 2)
    x = torch.randn(1, K)
    with expect_launches("blockfp.words"):
        y = K_.matmul_blockfp(x, odd, q.scales, table, 32, N, None, config=K_.INTERPRETER_FORWARD[0])
    assert rel_err(y, expected(x, oracle_weight(q.packed, q.scales, table, 32), None)) <= TOL[torch.float32]


def test_explicit_configs_that_do_not_fit_are_refused():
    q, table = make_weight("nvfp4", n=8, k=96)
    with pytest.raises(ValueError, match="does not serve"):
        run_forward(q, table, torch.randn(5, 96), None, C("words", 4, 32, 32, 1, 1, 1))  # M = 5 > 4
    with pytest.raises(ValueError, match="does not serve"):
        run_forward(q, table, torch.randn(1, 96), None, C("words", 4, 32, 64, 1, 1, 1))  # 96 % 64
    with pytest.raises(ValueError, match="does not serve"):
        K_.matmul_blockfp_grad_x(torch.randn(2, 8), q.packed, q.scales, table, 16, 96, config=G(16, 64, 16, 1, 4, 1))
