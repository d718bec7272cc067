"""Int groups that do not divide K ("any shape"): the row's last group is ragged (shorter).

SmolLM2-135M has K = 576 in six of its seven matrices; Llama, Qwen, Gemma and Phi widths (576, 896,
1536, 2560, 3072, 11008, 14336, 18944) are multiples of 32 but not all of 128 or 256. With
group_size L the scale and zero tensors have G = ceil(K / L) groups per row, column k uses group
k // L, and the last group's range covers only its real columns.

Every numeric check compares against a float64 oracle built here from docs/int.md's byte layout (codes
decoded bit by bit, one column at a time; group index k // L), independently of lowbit's unpacking, its
reference and its padding; gradients against float64 autograd through that oracle.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from tests.helpers import TOL, expect_launches, rel_err, triton_on_cpu, use_cpu_build
from tests.test_intq import decode_q  # the layout oracle (docs/int.md), one copy

import lowbit
from lowbit import IntLinear, QuantInt, _cpu, _ops, dequantize_int, matmul_int, quantize_int

SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in, out): q/o, k/v, gate/up, down
WIDTHS = [576, 896, 1536, 2560, 3072, 11008, 14336, 18944]  # real in_features of Llama/Qwen/Gemma/Phi
GROUPS = [32, 64, 128, 256, None]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# float64 oracle from docs/int.md
# ----------------------------------------------------------------------------------------------


def group_of(q: QuantInt) -> torch.Tensor:
    """int64 [K]: the group of each column, k // L (L = K for per-row scales)."""
    n, k = q.shape
    return torch.arange(k) // (k if q.group_size is None else q.group_size)


def oracle_int(q: QuantInt) -> torch.Tensor:
    """(Q - z) float64 [N, K]: z of column k's group k // L."""
    n, k = q.shape
    z = q.zeros.reshape(n, -1).double()
    return torch.from_numpy(decode_q(q.codes, q.bits)).double() - z[:, group_of(q)]


def oracle_weight(q: QuantInt, scale: torch.Tensor | None = None) -> torch.Tensor:
    """W = s * (Q - z) float64 [N, K]; `scale` (e.g. a float64 leaf for autograd) defaults to q.scale."""
    n, k = q.shape
    s = (q.scale if scale is None else scale).reshape(n, -1)
    return oracle_int(q) * s.double()[:, group_of(q)]


def n_groups(k: int, gs) -> int:
    return 1 if gs is None else math.ceil(k / gs)


def ragged(k: int, gs) -> bool:
    return gs is not None and k % gs != 0


def grads_vs_float64(x: torch.Tensor, q: QuantInt, bias: torch.Tensor | None, tol: float) -> None:
    """y, dL/dx and dL/ds of matmul_int against float64 autograd through the oracle, for a random dL/dy."""
    scale = q.scale.clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    y = matmul_int(xx, q, scale, bias)
    gy = torch.randn(y.shape).to(y.dtype)
    y.backward(gy)
    s64 = q.scale.double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y64 = x64 @ oracle_weight(q, s64).t() + (0 if bias is None else bias.double())
    y64.backward(gy.double())
    assert rel_err(y, y64.detach()) <= tol
    assert rel_err(xx.grad, x64.grad) <= tol
    assert rel_err(scale.grad, s64.grad) <= tol
    if ragged(q.in_features, q.group_size):  # the ragged group's own gradient, not just the whole tensor's
        assert rel_err(scale.grad[:, -1], s64.grad[:, -1]) <= tol


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "reference")


# ----------------------------------------------------------------------------------------------
# format: group count, exact storage, validation
# ----------------------------------------------------------------------------------------------


def test_every_real_width_takes_every_usual_group_size():
    """The widths are multiples of 32 (the packed layout's only need): every usual group size is accepted, with
    ceil(K / L) groups per row and exact storage: codes + G fp32 scales + G uint8 zeros per row."""
    for k in WIDTHS:
        assert k % 32 == 0
        for gs in GROUPS:
            for bits in (2, 3, 4):
                n = 3
                q = quantize_int(torch.randn(n, k), bits, gs)
                g = n_groups(k, gs)
                assert q.n_groups == g
                assert q.scale.shape == ((n,) if gs is None else (n, g)) and q.zeros.shape == q.scale.shape
                assert q.codes.shape == (n, k // 32, bits)
                assert q.nbytes == n * k * bits // 8 + 5 * n * g
                assert q.bits_per_param == pytest.approx(bits + 40 * g / k, rel=1e-12)
    # e.g. SmolLM2's K = 576 in groups of 128: 4 whole groups and one of 64, int3 at 3 + 200/576 bits
    q = quantize_int(torch.randn(4, 576), 3, 128)
    assert q.scale.shape == (4, 5) and q.bits_per_param == pytest.approx(3 + 200 / 576)


@pytest.mark.parametrize("gs", [48, 16, 0, -32, 100])
def test_group_size_must_still_be_a_multiple_of_32_and_says_why(gs):
    with pytest.raises(ValueError, match=r"multiple of 32 \(the kernels decode 32 codes at a time"):
        quantize_int(torch.randn(4, 576), 3, gs)
    with pytest.raises(ValueError, match="multiple of 32"):
        IntLinear(576, 8, bits=3, group_size=gs)


def test_in_features_must_still_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="in_features must be a multiple of 32"):
        quantize_int(torch.randn(4, 600), 3, 128)


def test_group_larger_than_k_is_one_ragged_group():
    q = quantize_int(torch.randn(5, 96), 4, 256)
    assert q.scale.shape == (5, 1) and q.bits_per_param == pytest.approx(4 + 40 / 96)
    x = torch.randn(3, 96)
    assert rel_err(matmul_int(x, q), x.double() @ oracle_weight(q).t()) <= TOL[torch.float32]


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,gs", [(576, 128), (576, 256), (160, 64), (896, 256), (1536, 1024)])
def test_ragged_group_is_quantized_from_its_real_columns_only(k, gs, bits, method):
    """The last group's scale, zero and codes are exactly those of its real columns quantized alone (a row
    of its own): nothing past K widens its range or changes its clipping search."""
    n = 6
    w = torch.randn(n, k)
    tail0 = (k // gs) * gs
    w[:, tail0:] *= 0.01  # a tail far narrower than the rest: a range taken over anything else would show
    q = quantize_int(w, bits, gs, method)
    alone = quantize_int(w[:, tail0:].contiguous(), bits, None, method)
    assert torch.equal(q.scale[:, -1], alone.scale) and torch.equal(q.zeros[:, -1], alone.zeros)
    assert np.array_equal(decode_q(q.codes, bits)[:, tail0:], decode_q(alone.codes, bits))
    # and the whole groups are those of the group-dividing prefix
    head = quantize_int(w[:, :tail0].contiguous(), bits, gs, method)
    assert torch.equal(q.scale[:, :-1], head.scale) and torch.equal(q.zeros[:, :-1], head.zeros)
    if method == "rtn":  # every element within half a step of its group's scale
        err = (oracle_weight(q) - w.double()).abs()
        step = q.scale.double()[:, group_of(q)]
        assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-7).all())


# ----------------------------------------------------------------------------------------------
# reference (LOWBIT_CPU_BACKEND=reference) against float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", SMOLLM2)
def test_reference_smollm2_shapes_vs_float64(k, n, reference_backend):
    for bits in (2, 3, 4):
        for gs in GROUPS:
            q = quantize_int(torch.randn(n, k), bits, gs)
            w64 = oracle_weight(q)
            assert rel_err(dequantize_int(q, torch.float32), w64) <= TOL[torch.float32], (bits, gs)
            for dtype in DTYPES:
                x = torch.randn(3, k).to(dtype)
                b = torch.randn(n).to(dtype)
                y = matmul_int(x, q, bias=b)
                assert y.dtype == dtype
                assert rel_err(y, x.double() @ w64.t() + b.double()) <= TOL[dtype], (bits, gs, dtype)


@pytest.mark.parametrize("k", WIDTHS)
def test_reference_real_widths_vs_float64(k, reference_backend):
    n = 8 + k % 29  # 8..36 rows: small N, the real K
    for bits in (2, 3, 4):
        for gs in GROUPS + [384]:  # 384: ragged on every width but 1536 and 3072
            for method in (("rtn", "mse") if gs == 128 else ("rtn",)):
                q = quantize_int(torch.randn(n, k), bits, gs, method)
                w64 = oracle_weight(q)
                for dtype in DTYPES:
                    x = torch.randn(2, k).to(dtype)
                    assert rel_err(matmul_int(x, q), x.double() @ w64.t()) <= TOL[dtype], (bits, gs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,gs", [(576, 128), (576, 256), (896, 128), (1536, 1024), (160, 64), (2560, 256)])
def test_reference_grads_vs_float64(k, gs, dtype, reference_backend):
    for bits in (2, 3, 4):
        q = quantize_int(torch.randn(24, k), bits, gs)
        grads_vs_float64(torch.randn(5, k).to(dtype), q, torch.randn(24).to(dtype), TOL[dtype])


def test_reference_grad_scale_of_the_ragged_group_only(reference_backend):
    """dL/ds of the ragged group is the sum over its real columns: a loss that sees only those columns'
    contribution gives zero gradient to every other group and the exact float64 value to it."""
    n, k, gs = 7, 576, 128
    q = quantize_int(torch.randn(n, k), 3, gs)
    x = torch.zeros(4, k)
    x[:, 512:] = torch.randn(4, 64)  # only the ragged group's columns
    scale = q.scale.clone().requires_grad_(True)
    gy = torch.randn(4, n)
    matmul_int(x, q, scale).backward(gy)
    expect = ((gy.double().t() @ x.double()) * oracle_int(q))[:, 512:].sum(1)
    assert torch.equal(scale.grad[:, :4], torch.zeros(n, 4))
    assert rel_err(scale.grad[:, 4], expect) <= TOL[torch.float32]


def test_ops_opcheck_and_empty_batch_on_ragged_groups():
    """The registered ops (schema, fake shapes: ceil(K/L) groups, autograd, dynamic shapes) on a ragged
    layout, and dL/ds of an empty batch: zeros of the real [N, G] shape."""
    from lowbit._ops import int_dequantize, int_matmul, int_matmul_grad_scale, int_matmul_grad_x

    n, k = 24, 576
    q = quantize_int(torch.randn(n, k), 3, 128)
    w = (q.codes, q.scale, q.zeros, 3, 128)
    x, g = torch.randn(3, k), torch.randn(3, n)
    torch.library.opcheck(int_dequantize.op, (*w, n, k, torch.float32))
    torch.library.opcheck(int_matmul.op, (x, *w, n, torch.randn(n)))
    torch.library.opcheck(int_matmul_grad_x.op, (g, *w, k))
    torch.library.opcheck(int_matmul_grad_scale.op, (g, x, q.codes, q.zeros, 3, 128))
    empty = _ops.int_matmul_grad_scale(torch.zeros(0, n), torch.zeros(0, k), q.codes, q.zeros, 3, 128)
    assert empty.shape == (n, 5) and not bool(empty.any())


# ----------------------------------------------------------------------------------------------
# C backend (LOWBIT_CPU_BACKEND=fast): the AVX-512 build and the plain-C one against the reference
# ----------------------------------------------------------------------------------------------


def _variant(monkeypatch, variant: str) -> None:
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fast")
    if _cpu.library() is None:
        pytest.skip("the fast CPU backend could not be built here (no C compiler)")
    use_cpu_build(monkeypatch, variant)


def _reference(monkeypatch, fn, *args):
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", "reference")
    try:
        before = collections.Counter(_cpu.CALLS)
        out = fn(*args)
        assert _cpu.CALLS == before
        return out
    finally:
        monkeypatch.setenv("LOWBIT_CPU_BACKEND", "fast")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


# (bits, group_size, K, N): SmolLM2's shapes (int3 g128 on 576: whole quads but not the whole-quad decode,
# K % 128 != 0), real widths, and small ragged cases (int3 g256 on 384: the whole-quad decode with a ragged
# group; g384 on 512: a ragged group longer than half the group)
C_CASES = [(3, 128, 576, 576), (4, 128, 576, 192), (2, 64, 576, 40), (3, 256, 1536, 24), (4, 256, 896, 17),
           (2, 128, 2560, 9), (3, 256, 3072, 8), (4, 128, 11008, 8), (3, 256, 384, 33), (3, 384, 512, 33),
           (4, 384, 512, 33), (2, 96, 160, 33), (3, None, 576, 33), (4, 1024, 1536, 10), (4, 384, 11008, 8),
           (3, 384, 14336, 8), (2, 384, 18944, 8)]


@pytest.mark.parametrize("variant", ["native", "generic"])  # the AVX-512 kernels and the plain-C ones
@pytest.mark.parametrize("bits,gs,k,n", C_CASES)
def test_c_backend_vs_reference(monkeypatch, variant, bits, gs, k, n):
    _variant(monkeypatch, variant)
    q = quantize_int(torch.randn(n, k), bits, gs)
    w = (q.codes, q.scale, q.zeros, bits, q.group_len)
    for dtype in DTYPES:  # dequantize: bit-identical to the reference
        before = _cpu.CALLS["int.dequantize"]
        out = dequantize_int(q, dtype)
        assert _cpu.CALLS["int.dequantize"] == before + 1
        assert _bits_equal(out, _reference(monkeypatch, dequantize_int, q, dtype)), dtype
    assert rel_err(dequantize_int(q, torch.float32), oracle_weight(q)) <= TOL[torch.float32]
    for m, dtype in [(1, torch.float32), (3, torch.bfloat16), (4, torch.float16), (40, torch.float32)]:
        # m = 40: above FUSED_M, the dequantize-then-BLAS paths
        x, g = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
        before = collections.Counter(_cpu.CALLS)
        y = _ops.int_matmul(x, *w, n, None)
        gx = _ops.int_matmul_grad_x(g, *w, k)
        gs_ = _ops.int_matmul_grad_scale(g, x, q.codes, q.zeros, bits, q.group_len)
        ran = _cpu.CALLS - before
        assert ran["int.gemv"] + ran["int.dequant_gemm"] == 1 and ran["int.grad_x"] + ran["int.grad_x_gemm"] == 1
        assert ran["int.grad_scale"] == 1
        assert gs_.shape == q.scale.reshape(n, -1).shape
        assert rel_err(y, _reference(monkeypatch, _ops.int_matmul, x, *w, n, None)) <= TOL[dtype], (m, dtype)
        assert rel_err(gx, _reference(monkeypatch, _ops.int_matmul_grad_x, g, *w, k)) <= TOL[dtype], (m, dtype)
        gs_ref = _reference(monkeypatch, _ops.int_matmul_grad_scale, g, x, q.codes, q.zeros, bits, q.group_len)
        assert rel_err(gs_, gs_ref) <= TOL[torch.float32], (m, dtype)
        if ragged(k, gs):
            assert rel_err(gs_[:, -1], gs_ref[:, -1]) <= TOL[torch.float32], (m, dtype)
        # and against float64
        assert rel_err(y, x.double() @ oracle_weight(q).t()) <= TOL[dtype], (m, dtype)


@pytest.mark.parametrize("variant", ["native", "generic"])
def test_c_backend_grads_vs_float64_autograd(monkeypatch, variant):
    _variant(monkeypatch, variant)
    for bits, gs, k in [(3, 128, 576), (4, 256, 896), (2, 64, 160), (3, 256, 384)]:
        q = quantize_int(torch.randn(20, k), bits, gs)
        before = _cpu.CALLS["int.grad_scale"]
        grads_vs_float64(torch.randn(3, k), q, torch.randn(20), TOL[torch.float32])
        assert _cpu.CALLS["int.grad_scale"] == before + 1


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (small ragged shapes: the interpreter is slow)
# ----------------------------------------------------------------------------------------------

STEP = {2: 64, 3: 128, 4: 32}  # codes per row per step of the words GEMV


# (bits, group_size, K, the interpreter table's launcher at M = 1): the words GEMV on a ragged group for each
# width (int4 K=160 g128: 128 + 32; int2 K=192 g128: 128 + 64; int3 K=384 g256: 256 + 128); where K or the
# group is not whole words steps, the gemv (64-wide K-tiles, split 2: K % 128 == 0) or a 32-wide tl.dot tile;
# groups shorter than a tile; K=576 g128 once
TRITON_CASES = [(4, 128, 160, "words"), (2, 128, 192, "words"), (3, 256, 384, "words"), (3, 128, 160, "dot"),
                (2, 64, 96, "dot"), (4, 32, 96, "words"), (3, 128, 576, "dot"), (2, 128, 576, "words"),
                (3, 256, 640, "words"), (3, 192, 640, "gemv")]


@pytest.mark.interp
@pytest.mark.parametrize("bits,gs,k,kind", TRITON_CASES)
def test_triton_forward_m1_and_grads(bits, gs, k, kind):
    n = 24
    q = quantize_int(torch.randn(n, k), bits, gs)
    w64 = oracle_weight(q)
    launcher = f"intq.{kind}"
    for dtype in DTYPES:
        x, b = torch.randn(1, k).to(dtype), torch.randn(n).to(dtype)
        with triton_on_cpu(launcher):
            y = matmul_int(x, q, bias=b)
        assert y.dtype == dtype
        assert rel_err(y, x.double() @ w64.t() + b.double()) <= TOL[dtype], dtype
    with triton_on_cpu(launcher, "intq.grad_x", "intq.grad_scale"):
        grads_vs_float64(torch.randn(1, k), q, torch.randn(n), TOL[torch.float32])


@pytest.mark.interp
@pytest.mark.parametrize("bits,gs,k", [(3, 128, 160), (4, 64, 160), (2, 128, 192), (3, 256, 384)])
def test_triton_gemm_and_grads(bits, gs, k):
    n = 24
    q = quantize_int(torch.randn(n, k), bits, gs)
    for dtype in (torch.float32, torch.bfloat16):
        with triton_on_cpu("intq.dot", "intq.grad_x", "intq.grad_scale"):
            grads_vs_float64(torch.randn(20, k).to(dtype), q, torch.randn(n).to(dtype), TOL[dtype])


@pytest.mark.interp
def test_triton_explicit_configs_on_ragged_groups():
    """Every scale mode of the tile kernels on a ragged last group, the words GEMV with a split-K boundary
    inside a group, and grad_scale with its K-tile from the config (it divides the group and K) or 32."""
    from lowbit.kernels import intq as km

    C, G, S = km.MatmulConfig, km.GradXConfig, km.GradScaleConfig
    n, k = 20, 320  # groups of 128: 128 + 128 + 64
    for bits, gs in [(3, 128), (4, 128), (2, 96)]:
        q = quantize_int(torch.randn(n, k), bits, gs)
        glen, w64 = q.group_len, oracle_weight(q)
        x, g = torch.randn(5, k), torch.randn(5, n)
        configs = [C("dot", 16, 32, 64, 1, 4, 1),  # K-tile inside a group (128 % 64) or per-chunk scales (96)
                   C("dot", 16, 16, 32, 2, 4, 1),  # split-K over the ragged group
                   C("gemv", 8, 32, 64, 5, 4, 1)]  # K = 5 tiles of 64: the last split is the ragged group
        for cfg in configs:
            with expect_launches(f"intq.{cfg.kind}"):
                y = km.matmul_int(x, q.codes, q.scale, q.zeros, bits, glen, n, None, config=cfg)
            assert rel_err(y, x.double() @ w64.t()) <= TOL[torch.float32], (bits, cfg)
        if bits == 4:  # int4 words, split 2: each split 160 codes, the second starting inside group 1
            for m in (1, 3):
                with expect_launches("intq.words"):
                    y = km.matmul_int(x[:m], q.codes, q.scale, q.zeros, bits, glen, n, None,
                                      config=C("words", 4, 16, 0, 2, 1, 1))
                assert rel_err(y, x[:m].double() @ w64.t()) <= TOL[torch.float32]
        for gcfg in [G(16, 64, 16, 2, 4, 1), G(16, 32, 32, 1, 4, 1)]:
            with expect_launches("intq.grad_x"):
                gx = km.matmul_int_grad_x(g, q.codes, q.scale, q.zeros, bits, glen, k, config=gcfg)
            assert rel_err(gx, g.double() @ w64) <= TOL[torch.float32], (bits, gcfg)
        expect = torch.zeros(n, q.n_groups, dtype=torch.float64)
        expect.index_add_(1, group_of(q), (g.double().t() @ x.double()) * oracle_int(q))
        for scfg in [S(16, 64, 16, 4, 1), S(16, 32, 4, 4, 1), S(32, 128, 16, 4, 1)]:
            with expect_launches("intq.grad_scale"):
                gs_ = km.matmul_int_grad_scale(g, x, q.codes, q.zeros, bits, glen, config=scfg)
            assert gs_.shape == (n, q.n_groups)
            assert rel_err(gs_, expect) <= TOL[torch.float32], (bits, scfg)
            assert rel_err(gs_[:, -1], expect[:, -1]) <= TOL[torch.float32], (bits, scfg)


# ----------------------------------------------------------------------------------------------
# IntLinear, replace_linear, state dicts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_intlinear_group_128_on_a_576_wide_linear(bits):
    lin = torch.nn.Linear(576, 40)
    layer = IntLinear.from_linear(lin, bits=bits, group_size=128)
    assert layer.scale.shape == (40, 5) and layer.zeros.shape == (40, 5)
    assert layer.bits_per_param == pytest.approx(bits + 200 / 576)
    q = layer.quantized_weight
    assert q.n_groups == 5
    x = torch.randn(6, 576)
    ref = x.double() @ oracle_weight(q).t() + lin.bias.double()
    assert rel_err(layer(x), ref) <= TOL[torch.float32]
    # PEQA: only the scales train, and the ragged group's gradient is right
    layer.scale.grad = None
    gy = torch.randn(6, 40)
    layer(x).backward(gy)
    s64 = q.scale.double().requires_grad_(True)
    (x.double() @ oracle_weight(q, s64).t()).backward(gy.double())
    assert rel_err(layer.scale.grad, s64.grad) <= TOL[torch.float32]
    assert rel_err(layer.scale.grad[:, -1], s64.grad[:, -1]) <= TOL[torch.float32]


def test_intlinear_ragged_state_dict_roundtrip(tmp_path):
    from lowbit.io import load_state_dict, save_state_dict

    layer = IntLinear.from_linear(torch.nn.Linear(576, 24), bits=3, group_size=128)
    with torch.no_grad():
        layer.scale.mul_(1 + 0.01 * torch.randn_like(layer.scale))  # "fine-tuned"
    assert layer.format_fields() == {"bits": 3, "group_size": 128}
    path = tmp_path / "ragged.safetensors"
    save_state_dict(layer, path)
    fresh = IntLinear(576, 24, bits=3, group_size=128)
    assert fresh.scale.shape == (24, 5)
    load_state_dict(fresh, path)
    x = torch.randn(3, 576)
    assert torch.equal(fresh(x), layer(x))
    assert all(torch.equal(getattr(fresh, t), getattr(layer, t)) for t in ("codes", "scale", "zeros"))
    # plain torch round trip too
    again = IntLinear(576, 24, bits=3, group_size=128)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), layer(x))


def test_intlinear_refuses_a_state_dict_with_floor_groups():
    """A scale of K // L groups (the ragged group missing) is a shape error, not a silent misread."""
    layer = IntLinear.from_linear(torch.nn.Linear(576, 8), bits=3, group_size=128)
    sd = layer.state_dict()
    sd["scale"], sd["zeros"] = sd["scale"][:, :4].clone(), sd["zeros"][:, :4].clone()
    with pytest.raises(RuntimeError, match="scale"):
        IntLinear(576, 8, bits=3, group_size=128).load_state_dict(sd)


def test_group_dividing_state_dict_is_unchanged():
    """Group-dividing shapes keep their old layout: G = K / L groups, the same bytes (old checkpoints load)."""
    layer = IntLinear.from_linear(torch.nn.Linear(512, 8), bits=3, group_size=128)
    assert layer.scale.shape == (8, 4)
    fresh = IntLinear(512, 8, bits=3, group_size=128)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.codes, layer.codes)


class _Block(torch.nn.Module):
    """SmolLM2-like widths: hidden 576, kv 192, intermediate 1536."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Linear(576, 576, bias=False), torch.nn.Linear(576, 192, bias=False)
        self.up_proj, self.down_proj = torch.nn.Linear(576, 1536, bias=False), torch.nn.Linear(1536, 576, bias=False)

    def forward(self, x):
        h = self.q_proj(x) + torch.nn.functional.pad(self.k_proj(x), (0, 384))
        return self.down_proj(torch.relu(self.up_proj(h)))


def test_replace_linear_int3_group_128_converts_every_smollm2_width():
    model = torch.nn.Sequential(_Block(), _Block())
    dense = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear)}
    x = torch.randn(2, 576)
    lowbit.replace_linear(model, "int3", group_size=128, progress=False)
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, IntLinear)}
    assert set(layers) == set(dense)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    for name, layer in layers.items():
        k = layer.in_features
        assert layer.group_size == 128 and layer.scale.shape == (layer.out_features, math.ceil(k / 128)), name
        xi = torch.randn(3, k)
        assert rel_err(layer(xi), xi.double() @ oracle_weight(layer.quantized_weight).t()) <= TOL[torch.float32]
    y = model(x)
    assert y.shape == (2, 576) and bool(torch.isfinite(y).all())
