"""SZLinear with importance-scaled columns (docs/sz.md, "SZ at 3 bits"): the per-column bound, the forward, the
state dict, old checkpoints, and bad calibration statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import SZLinear
from lowbit.formats import sz
from lowbit.nn import EXTRA_STATE, decode_meta

N, K = 40, 96
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _setup(seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        lin.weight[3, 5] = 0.9  # a large weight: an outlier or a wide alphabet in the scaled stream
    # second moments over ~5 decades, one dead channel (h = 0) and one massive-activation channel
    h = torch.exp(torch.randn(K, generator=g, dtype=torch.float64) * 2.5)
    h[7] = 0.0
    h[11] = 1e4
    return lin, h


def _oracle(layer: SZLinear) -> torch.Tensor:
    """The layer's weight decoded independently of its decode path: the stream through its bytes, the bit-by-bit
    reference decoder, and 2**-e applied in float64."""
    c = sz.SZTensor.from_bytes(layer.to_sz().to_bytes())
    w_scaled = sz.decode_reference(c, torch.float32).double()
    e = layer.col_exp.to(torch.float64)
    return w_scaled * torch.pow(2.0, -e)


def test_every_element_within_its_column_bound():
    lin, h = _setup()
    layer = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h, importance_alpha=0.5)
    w = lin.weight.detach().double()
    # the exponents follow h: e = round(0.5 * log2(h / geometric mean of h > 0)); h = 0 gets the coarsest
    pos = h > 0
    gm = torch.log2(h[pos]).mean()
    want = torch.where(pos, torch.round(0.5 * (torch.log2(h.clamp(min=1e-300)) - gm)), torch.tensor(-12.0))
    assert torch.equal(layer.col_exp, want.clamp(-12, 12).to(torch.int8))
    bounds = layer.column_bounds()
    assert torch.equal(bounds, 0.02 * torch.pow(2.0, -want.clamp(-12, 12)))
    assert float(bounds.max()) / float(bounds.min()) >= 2**6  # the bound does follow importance
    ref = _oracle(layer)
    err = (ref - w).abs()
    assert bool((err <= bounds).all()), f"worst err / column bound {float((err / bounds).max())}"
    assert float((err / bounds).max()) > 0.5  # the bounds are used, not vacuous
    # the layer's own decode is the oracle's, and keeps the bound in every dtype the layer claims
    assert torch.equal(layer.dequantized_weight(torch.float32).double(), ref)
    # and keeps the bound in every dtype the layer claims; in the others (bf16 here: the important columns'
    # bounds are finer than bf16's precision) within max(bound, what rounding w to the dtype costs), and a
    # plain dequantized_weight(dtype) refuses
    for d in DTYPES:
        out = layer.dequantized_weight(d, allow_unbounded=True).double()
        if layer.to_sz().bound_holds(d):
            assert torch.equal(out, layer.dequantized_weight(d).double())
            assert bool(((out - w).abs() <= bounds).all()), d
        else:
            floor = (lin.weight.detach().to(d).double() - w).abs()
            assert bool(((out - w).abs() <= torch.maximum(bounds, floor)).all()), d
            with pytest.raises(ValueError, match="bound"):
                layer.dequantized_weight(d)
    assert layer.to_sz().bound_holds(torch.float32)


def test_unimportant_columns_are_coarser_and_the_weighted_error_drops_at_equal_size():
    # the point of the scaling: at no more bits, a lower output-weighted error sum_nk E^2 h_k
    lin, h = _setup(1)
    w = lin.weight.detach().double()

    def weighted(layer):
        return float((((layer.dequantized_weight(torch.float32).double() - w) ** 2) * h).sum())

    plain = SZLinear.from_linear(lin, error_bound=0.02)
    lo, hi = 1e-3, 1.0
    for _ in range(14):  # the smallest scaled bound with bits <= plain's
        mid = math.sqrt(lo * hi)
        scaled = SZLinear.from_linear(lin, error_bound=mid, input_moments=h)
        lo, hi = (mid, hi) if scaled.bits_per_param > plain.bits_per_param else (lo, mid)
    scaled = SZLinear.from_linear(lin, error_bound=hi, input_moments=h)
    assert scaled.bits_per_param <= plain.bits_per_param
    assert weighted(scaled) < 0.5 * weighted(plain)


def test_forward_is_x_times_the_decoded_weight():
    lin, h = _setup(2)
    # alpha 0.5: the finest column bounds are then below bf16's precision (both branches below run)
    layer = SZLinear.from_linear(lin, error_bound=0.01, input_moments=h, importance_alpha=0.5)
    x = torch.randn(5, 3, K)
    ref = x.double() @ _oracle(layer).T + lin.bias.detach().double()
    y = layer(x)
    assert y.shape == (5, 3, N)
    tol = 1e-5 * float(ref.abs().max())
    assert float((y.double() - ref).abs().max()) <= tol
    # the autograd path (weight decoded, F.linear) gives the same, and the gradient reaches x
    xg = x.clone().requires_grad_(True)
    yg = layer(xg)
    assert float((yg.detach().double() - ref).abs().max()) <= tol
    yg.sum().backward()
    assert torch.allclose(xg.grad.double(), _oracle(layer).sum(0).expand(5, 3, K), rtol=1e-5, atol=1e-6)
    # fp16 / bf16 compute: x * 2**-e is exact there, the weight the decode in that dtype; a dtype whose
    # precision cannot hold the finest column bounds refuses (bf16 here), as an unscaled stream does
    for d in (torch.float16, torch.bfloat16):
        half = SZLinear.from_linear(lin, error_bound=0.01, input_moments=h, importance_alpha=0.5).to(d)
        if half.to_sz().bound_holds(d):
            yh = half(x.to(d))
            assert yh.dtype == d
            assert float((yh.double() - ref).abs().max()) <= 0.02 * float(ref.abs().max())
        else:
            with pytest.raises(ValueError, match="bound"):
                half(x.to(d))
    assert layer.to_sz().bound_holds(torch.float16) and not layer.to_sz().bound_holds(torch.bfloat16)


def test_state_dict_round_trip_keeps_the_exponents(tmp_path):
    lin, h = _setup(3)
    layer = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h)
    sd = layer.state_dict()
    assert sd["col_exp"].dtype == torch.int8 and torch.equal(sd["col_exp"], layer.col_exp)
    assert decode_meta(sd[EXTRA_STATE], EXTRA_STATE)["column_scaled"] is True
    x = torch.randn(4, K)
    # into a layer built without scaling (what load_quantized builds), via torch and via safetensors
    fresh = SZLinear(K, N)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.col_exp, layer.col_exp)
    assert torch.equal(fresh.column_bounds(), layer.column_bounds())
    assert torch.equal(fresh(x), layer(x))
    model = nn.Sequential(layer)
    lowbit.io.save_state_dict(model, tmp_path / "m.safetensors")
    other = nn.Sequential(SZLinear(K, N))
    lowbit.io.load_state_dict(other, tmp_path / "m.safetensors")
    assert torch.equal(other[0].dequantized_weight(), layer.dequantized_weight())
    assert other[0].bits_per_param == layer.bits_per_param
    # the exponents are counted: 8 bits per input column
    assert layer.bits_per_param == pytest.approx(layer.to_sz().bits_per_param + 8 / N)


def test_old_checkpoint_without_exponents_loads_unscaled():
    lin, h = _setup(4)
    old = SZLinear.from_linear(lin, error_bound=0.02)  # unscaled: the state dict it has always had
    sd = old.state_dict()
    assert set(sd) == {"bias", "payload", "lane_index", "lengths", "outlier_idx", "outlier_val", "step", "meta",
                       "bounds", EXTRA_STATE}
    assert "column_scaled" not in decode_meta(sd[EXTRA_STATE], EXTRA_STATE)
    # into a layer that is scaled right now: the checkpoint's (unscaled) weight, not the old exponents
    layer = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h)
    layer.load_state_dict(sd)
    assert layer.col_exp is None and layer.inv_scale is None
    assert torch.equal(layer.dequantized_weight(), old.dequantized_weight())
    x = torch.randn(3, K)
    assert torch.equal(layer(x), old(x))
    assert torch.equal(layer.column_bounds(), torch.full((K,), old.to_sz().bound, dtype=torch.float64))
    # a checkpoint without format metadata (written before format version 2) loads too
    bare = {k: v for k, v in sd.items() if k != EXTRA_STATE}
    fresh = SZLinear(K, N, error_bound=0.02)
    fresh.load_state_dict(bare)
    assert torch.equal(fresh(x), old(x))


def test_bad_exponents_in_a_checkpoint_are_refused_and_leave_the_layer_as_it_was():
    lin, h = _setup(5)
    layer = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h)
    before = layer.dequantized_weight().clone()
    for bad in (torch.full((K,), 13, dtype=torch.int8), torch.zeros(K + 1, dtype=torch.int8)):
        sd = layer.state_dict()
        sd["col_exp"] = bad
        target = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h)
        with pytest.raises((ValueError, RuntimeError), match="col_exp|size"):
            target.load_state_dict(sd)
        assert torch.equal(target.dequantized_weight(), before)


@pytest.mark.parametrize("h, match", [
    (lambda h: h.clone().index_fill_(0, torch.tensor([4]), math.nan), "NaN"),
    (lambda h: h.clone().index_fill_(0, torch.tensor([4]), math.inf), "NaN or Inf"),
    (lambda h: h[:-1], r"shape \[96\]"),
    (lambda h: h.reshape(8, 12), r"shape \[96\]"),
    (lambda h: h.clone().index_fill_(0, torch.tensor([4]), -1.0), "non-negative"),
    (lambda h: torch.zeros_like(h), "all zero"),
])
def test_bad_input_moments_raise_naming_the_argument(h, match):
    lin, h0 = _setup(6)
    with pytest.raises(ValueError, match="input_moments") as e:
        SZLinear.from_linear(lin, error_bound=0.02, input_moments=h(h0))
    assert e.match(match)
    with pytest.raises(TypeError, match="input_moments"):
        SZLinear.from_linear(lin, error_bound=0.02, input_moments=h0.tolist())
    with pytest.raises(ValueError, match="importance_alpha"):
        SZLinear.from_linear(lin, error_bound=0.02, input_moments=h0, importance_alpha=-0.5)
    with pytest.raises(ValueError, match="importance_ref"):
        SZLinear.from_linear(lin, error_bound=0.02, input_moments=h0, importance_ref="global")


def test_replace_linear_takes_the_importance_options():
    # the options are in SZLinear.OPTIONS (replace_linear refuses unknown ones); without statistics they change
    # nothing, with them (replace_linear's calibration=..., or from_linear) the columns are scaled
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 8))
    q = lowbit.replace_linear(model, "sz", skip=(), error_bound=0.02, importance_alpha=0.75, importance_ref="none")
    assert all(isinstance(m, SZLinear) and m.col_exp is None for m in (q[0], q[2]))
    # the layer a folder quantized with these options loads into (load_quantized's empty_layer) is built too
    assert lowbit.nn.empty_layer("sz", K, N, error_bound=0.02, importance_alpha=0.75).col_exp is None
    lin, h = _setup(7)
    a = SZLinear.from_linear(lin, error_bound=0.02, input_moments=h, importance_alpha=0.75, importance_ref="none")
    e = torch.where(h > 0, torch.round(0.75 * torch.log2(h.clamp(min=1e-300))), torch.tensor(-12.0))
    assert torch.equal(a.col_exp, e.clamp(-12, 12).to(torch.int8))
