"""lowbit.nn: the QuantLinear contract shared by every family (dtype policy, format metadata,
allocate-only constructors, replace_linear) and the silent wrong answers it closes.

Each test here failed (or could not be written) on the code before the house-plan change; the
issue "One shape for every format family" lists the cases.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import IntLinear, Linear4bit, QuantLinear, SZLinear
from lowbit.nn import EXTRA_STATE, decode_meta

from .helpers import rel_err

FAMILIES = [
    (Linear4bit, dict(quant_type="nf4")),
    (IntLinear, dict(bits=3, group_size=64)),
    (SZLinear, dict(error_bound=2e-3)),
]


def _layer(cls, opts, n=48, k=128, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    return lin, cls.from_linear(lin, **opts)


# ----------------------------------------------------------------------------------------------
# One vocabulary
# ----------------------------------------------------------------------------------------------


def test_every_family_is_public_and_shares_the_leading_arguments():
    for name in ("sz_compress", "sz_decompress", "SZTensor", "SZLinear", "QuantLinear", "IntLinear", "Linear4bit"):
        assert name in lowbit.__all__
    from lowbit.nn import FAMILIES as REGISTERED

    for fam in REGISTERED.values():  # every registered family's layer is public (a new family adds it to __all__)
        assert fam.layer.__name__ in lowbit.__all__ and getattr(lowbit, fam.layer.__name__) is fam.layer, fam.name
    for cls, opts in FAMILIES:
        m = cls(128, 48, False, device="cpu", dtype=torch.bfloat16)
        assert isinstance(m, QuantLinear) and m.bias is None
        assert (m.in_features, m.out_features, m.compute_dtype) == (128, 48, torch.bfloat16)
        lin, q = _layer(cls, opts)
        w = q.dequantized_weight()
        assert w.shape == (48, 128) and w.dtype == torch.float32
        assert q.dequantized_weight(torch.float16).dtype == torch.float16
        with pytest.raises(TypeError, match="bias must be a bool"):
            cls(128, 48, 3)  # format options are keyword-only: a positional bits=3 is not silently a bias
        with pytest.raises(ValueError, match="in_features"):
            cls(0, 48)
        with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
            cls.from_linear(nn.Conv1d(2, 2, 1), **opts)


# ----------------------------------------------------------------------------------------------
# Constructors allocate, never quantize
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,opts", FAMILIES)
def test_constructor_allocates_without_quantizing(cls, opts, monkeypatch):
    import lowbit.functional as F_
    import lowbit.formats.intq as intq
    import lowbit.formats.sz as szf

    def boom(*a, **k):
        raise AssertionError("a constructor quantized")

    for mod, name in ((F_, "quantize_4bit"), (intq, "quantize_int"), (szf, "sz_compress")):
        monkeypatch.setattr(mod, name, boom)
    import lowbit.nn.linear4bit as l4

    monkeypatch.setattr(l4, "quantize_4bit", boom)
    m = cls(4096, 11008, **{k: v for k, v in opts.items() if k != "group_size"})
    assert m.out_features == 11008


@pytest.mark.parametrize("cls,opts", FAMILIES)
def test_meta_device_then_to_empty_and_load(cls, opts):
    lin, src = _layer(cls, opts)
    with torch.device("meta"):
        m = cls(128, 48, **opts) if cls is not SZLinear else cls(128, 48)
    assert all(b.device.type == "meta" for b in m.buffers())
    m = m.to_empty(device="cpu")
    m.load_state_dict(src.state_dict())
    x = torch.randn(5, 128)
    assert torch.equal(m(x), src(x))


def test_meta_tensors_and_missing_cuda_are_value_errors():
    with pytest.raises(ValueError, match="meta device"):
        lowbit.quantize_4bit(torch.empty(8, 64, device="meta"))
    with torch.device("meta"):
        lin = nn.Linear(64, 8)
    for cls, opts in FAMILIES:
        with pytest.raises(ValueError, match="meta device"):
            cls.from_linear(lin, **opts)
    if not torch.cuda.is_available():
        for cls, _ in FAMILIES:
            with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
                cls(64, 8, device="cuda")
        c = lowbit.sz_compress(torch.randn(8, 8), 1e-2)
        with pytest.raises(ValueError, match="no CUDA"):
            lowbit.sz_decompress(c, device="cuda")


# ----------------------------------------------------------------------------------------------
# dtype policy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,opts", FAMILIES)
@pytest.mark.parametrize("convert", ["half", "bfloat16", "to16"])
def test_storage_keeps_its_dtype_and_compute_follows_both_ways(cls, opts, convert):
    lin, m = _layer(cls, opts)
    x = torch.randn(6, 128)
    y0 = m(x)
    dtypes = {n: b.dtype for n, b in m.named_buffers()}
    kept = {n: p.dtype for n, p in m.named_parameters() if n in cls.KEEP_DTYPE}
    low = {"half": torch.float16, "bfloat16": torch.bfloat16, "to16": torch.float16}[convert]
    {"half": m.half, "bfloat16": m.bfloat16, "to16": lambda: m.to(torch.float16)}[convert]()
    assert {n: b.dtype for n, b in m.named_buffers()} == dtypes
    assert {n: p.dtype for n, p in m.named_parameters() if n in cls.KEEP_DTYPE} == kept
    assert m.compute_dtype == low
    if m.bias is not None:
        assert m.bias.dtype == low  # the bias converts like nn.Linear's
    assert m(x.to(low)).dtype == low
    m.float()
    assert m.compute_dtype == torch.float32
    # Back in fp32 the layer computes in fp32 again (bias rounded once through the low dtype).
    y1 = m(x)
    bias_err = 0.0 if m.bias is None else float((lin.bias.to(low).float() - lin.bias).abs().max())
    assert float((y1 - y0).abs().max()) <= bias_err + 1e-5 * float(y0.abs().max())
    assert rel_err(y1, y0) < 5e-3 if bias_err else rel_err(y1, y0) < 1e-6


def test_linear4bit_half_then_float_computes_in_fp32():
    lin, m = _layer(Linear4bit, dict(quant_type="nf4"), bias=False)
    x = torch.randn(8, 128)
    y0 = m(x)
    m.half().float()
    assert rel_err(m(x), y0) < 1e-6  # was 2.6e-4: the layer kept computing in fp16


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to16"])
def test_sz_bound_holds_after_any_conversion(convert):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    eb = 1e-3
    m = SZLinear.from_linear(lin, error_bound=eb)
    {"half": m.half, "bfloat16": m.bfloat16, "to16": lambda: m.to(torch.float16)}[convert]()
    assert m.step.dtype == torch.float32 and m.bounds.dtype == torch.float64
    m.float()
    err = (m.dequantized_weight(torch.float32).double() - lin.weight.double()).abs().max()
    assert float(err) <= eb  # was 1.061e-3 at a 1e-3 bound: step/bounds/outliers got cast


def test_intlinear_scale_stays_fp32_and_trains_under_half():
    lin, m = _layer(IntLinear, dict(bits=4))
    m.half()
    assert m.scale.dtype == torch.float32 and m.scale.requires_grad
    y = m(torch.randn(3, 128, dtype=torch.float16))
    y.float().sum().backward()
    assert m.scale.grad is not None and m.scale.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Format metadata
# ----------------------------------------------------------------------------------------------


def test_metadata_travels_in_the_state_dict():
    for cls, opts in FAMILIES:
        _, m = _layer(cls, opts)
        meta = decode_meta(m.state_dict()[EXTRA_STATE], EXTRA_STATE)
        assert meta["family"] == cls.FAMILY and meta["format_version"] == 3
        for k, v in opts.items():
            assert meta[k] == v


def test_fp4_checkpoint_refused_by_nf4_layer_naming_key_and_values():
    lin = nn.Linear(128, 32)
    fp4 = Linear4bit.from_linear(lin, quant_type="fp4")
    nf4 = Linear4bit(128, 32, quant_type="nf4")
    wrapped = nn.Sequential(nn.Identity(), nf4)
    sd = {f"1.{k}": v for k, v in fp4.state_dict().items()}
    with pytest.raises(ValueError, match=r"1\._extra_state.*quant_type='fp4'.*quant_type='nf4'"):
        wrapped.load_state_dict(sd)
    assert nf4.quant_type == "nf4"
    # and so bitsandbytes never receives an fp4 table under an nf4 name
    bnb_sd = lowbit.to_bnb_state_dict(fp4)
    assert any(k.endswith("bitsandbytes__fp4") for k in bnb_sd)


@pytest.mark.parametrize("cls,built,other", [
    (Linear4bit, dict(quant_type="nf4", blocksize=64), dict(quant_type="nf4", blocksize=128)),
    (IntLinear, dict(bits=3), dict(bits=4)),
    (IntLinear, dict(bits=3, group_size=64), dict(bits=3, group_size=32)),
    (SZLinear, dict(error_bound=1e-2), dict(error_bound=2e-2)),
])
def test_every_format_field_mismatch_raises(cls, built, other):
    _, src = _layer(cls, other)
    dst = cls(128, 48, **built)
    field = next(k for k in other if other[k] != built.get(k))
    with pytest.raises(ValueError, match=rf"_extra_state.*{field}="):
        dst.load_state_dict(src.state_dict())


def test_double_quant_and_dtype_are_adopted_from_the_checkpoint():
    lin = nn.Linear(128, 32).to(torch.bfloat16)
    src = Linear4bit.from_linear(lin, double_quant=False)
    dst = Linear4bit(128, 32)  # double_quant=True by default
    dst.load_state_dict(src.state_dict())
    assert not dst.double_quant and dst.weight_absmax.dtype == torch.float32
    assert dst.weight_dtype == torch.bfloat16
    assert torch.equal(dst.dequantized_weight(torch.float32), src.dequantized_weight(torch.float32))


def test_checkpoint_without_metadata_loads_as_format_1_and_newer_versions_refuse():
    lin = nn.Linear(128, 32)
    src = Linear4bit.from_linear(lin)
    old = {k: v for k, v in src.state_dict().items() if k != EXTRA_STATE}  # what lowbit <= 0.x wrote
    dst = Linear4bit(128, 32)
    dst.load_state_dict(old)
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))
    future = dict(src.state_dict())
    meta = decode_meta(future[EXTRA_STATE], EXTRA_STATE)
    meta["format_version"] = 99
    import json

    future[EXTRA_STATE] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="format version 99.*upgrade lowbit"):
        Linear4bit(128, 32).load_state_dict(future)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("with_metadata", [True, False])
def test_int_checkpoint_of_format_1_or_2_is_converted_exactly(bits, with_metadata):
    """Formats 1-2 stored int codes as bit planes; loading converts them (and nothing else)."""
    from lowbit.formats.intq import pack_bit_planes, unpack_codes
    from lowbit.nn import encode_meta

    src = IntLinear.from_linear(nn.Linear(160, 24), bits=bits)  # 5 chunks: a short int3 quad too
    old = dict(src.state_dict())
    old["codes"] = pack_bit_planes(unpack_codes(src.codes, bits), bits)
    assert not torch.equal(old["codes"], src.codes)
    if with_metadata:
        old[EXTRA_STATE] = encode_meta({**decode_meta(old[EXTRA_STATE], EXTRA_STATE), "format_version": 2})
    else:  # format 1 had no metadata: planes and packed fields look alike, so the user says which it is
        del old[EXTRA_STATE]
        with pytest.raises(ValueError, match="_extra_state: missing.*ambiguous.*codes"):
            IntLinear(160, 24, bits=bits).load_state_dict(old)
        old[EXTRA_STATE] = encode_meta({**decode_meta(src.get_extra_state(), EXTRA_STATE), "format_version": 1})
    dst = IntLinear(160, 24, bits=bits)
    dst.load_state_dict(old)
    assert torch.equal(dst.codes, src.codes)
    x = torch.randn(3, 160)
    assert torch.equal(dst(x), src(x))
    current = IntLinear(160, 24, bits=bits)  # a format-3 checkpoint is taken as it is
    current.load_state_dict(src.state_dict())
    assert torch.equal(current.codes, src.codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int_state_dict_without_metadata_is_refused_not_guessed(bits):
    """A hand-built / filtered int state dict (no _extra_state) used to be read as bit planes: "All keys
    matched" and weights off by up to 0.25. It is refused, naming the key; with the metadata it loads exactly."""
    from lowbit.formats.intq import quantize_int

    w = torch.randn(24, 160)
    q = quantize_int(w, bits=bits, group_size=32)
    layer = IntLinear(160, 24, bits=bits, group_size=32)
    sd = {"codes": q.codes, "scale": q.scale, "zeros": q.zeros}
    with pytest.raises(ValueError, match=r"^_extra_state: missing"):
        layer.load_state_dict(sd, strict=False)
    sd[EXTRA_STATE] = layer.get_extra_state()
    layer.load_state_dict(sd, strict=False)
    deq = layer.dequantized_weight(torch.float32)
    assert torch.equal(deq, lowbit.dequantize_int(q, torch.float32))
    # and independently of lowbit's decoder: round-to-nearest is within half a step of w (bit planes read as
    # packed fields are off by whole steps)
    err = (deq - w).abs().view(24, 5, 32)
    assert (err <= q.scale.float().abs().unsqueeze(-1) * 0.5 * (1 + 1e-5) + 1e-7).all()


# ----------------------------------------------------------------------------------------------
# replace_linear
# ----------------------------------------------------------------------------------------------


def test_replace_linear_on_a_bare_linear_returns_the_quantized_layer():
    lin = nn.Linear(64, 64)
    out = lowbit.replace_linear(lin, "nf4")
    assert isinstance(out, Linear4bit) and "" not in dict(out.named_children())
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32  # the input is untouched


def test_replace_linear_failure_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 688), nn.Linear(688, 32)))
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"layer '2\.1'.*in_features=688.*out_features=32.*'int3'"):
        lowbit.replace_linear(model, "int3")
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_replace_linear_warns_on_unmatched_skip_names():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match="skip name 'lm_haed' matches no module"):
        lowbit.replace_linear(model, "nf4", skip=("lm_haed",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.replace_linear(nn.Sequential(nn.Linear(64, 64)), "nf4")  # the default skip list is quiet


# ----------------------------------------------------------------------------------------------
# Found in review (each of these was wrong before its fix)
# ----------------------------------------------------------------------------------------------


def test_metadata_has_one_size_whatever_it_says():
    """DCP loads into existing tensors: a bf16-quantized layer's metadata must fit a fresh layer's."""
    a = Linear4bit.from_linear(nn.Linear(128, 32).to(torch.bfloat16), double_quant=False)
    b = Linear4bit(128, 32)
    assert a.state_dict()[EXTRA_STATE].shape == b.state_dict()[EXTRA_STATE].shape
    assert decode_meta(a.state_dict()[EXTRA_STATE], EXTRA_STATE)["dtype"] == "bfloat16"
    b.state_dict()[EXTRA_STATE].copy_(a.state_dict()[EXTRA_STATE])  # what DCP does: in place


def test_replace_linear_swaps_every_name_of_a_shared_linear():
    shared = nn.Linear(64, 64)
    model = nn.Module()
    model.a, model.b, model.c = shared, shared, nn.Linear(64, 8)
    lowbit.replace_linear(model, "nf4")
    assert isinstance(model.a, Linear4bit) and model.a is model.b
    model2 = nn.Module()
    model2.a, model2.lm_head = shared, shared  # skipped under one name: dense under both
    lowbit.replace_linear(model2, "nf4")
    assert model2.a is shared and model2.lm_head is shared


def test_refused_sz_load_leaves_the_layer_working():
    lin = nn.Linear(64, 48)
    m = SZLinear.from_linear(lin, error_bound=2e-3)
    other = SZLinear.from_linear(nn.Linear(64, 48), error_bound=1e-2)
    x = torch.randn(3, 64)
    y = m(x)
    with pytest.raises(ValueError, match="error_bound"):
        m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), y) and m.error_bound == 2e-3
    fresh = SZLinear(64, 48)
    with pytest.raises(ValueError):
        bad = dict(m.state_dict())
        bad["payload"] = bad["payload"][:-3]
        fresh.load_state_dict(bad)
    assert fresh.error_bound is None  # nothing adopted from the refused checkpoint
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)


def test_double_and_other_dtypes_are_refused_up_front():
    for cls, opts in FAMILIES:
        _, m = _layer(cls, opts)
        with pytest.raises(ValueError, match="float64 is not supported"):
            m.double()


def test_trainable_scale_gradient_follows_the_device():
    _, m = _layer(IntLinear, dict(bits=4))
    m(torch.randn(2, 128)).sum().backward()
    m.to("meta")
    assert m.scale.device.type == "meta" and m.scale.grad.device.type == "meta"


def test_lora_adapters_follow_a_base_without_buffers():
    with torch.device("meta"):
        base = nn.Linear(16, 8)
    lora = lowbit.LoRALinear(base, r=2)
    assert lora.lora_A.device.type == "meta" and lora.lora_B.device.type == "meta"


def _bert_like():
    lin = lambda: nn.Linear(64, 64)  # noqa: E731
    return nn.ModuleDict({
        "bert": nn.ModuleDict({
            "encoder": nn.ModuleDict({"output": nn.ModuleDict({"dense": lin()}), "query": lin()}),
            "pooler": nn.ModuleDict({"dense": lin()}),
        }),
        "lm_head": lin(),
    })


@pytest.mark.parametrize("skip,dense", [
    (("pooler",), {"bert.pooler.dense"}),                       # a module containing the Linear (was quantized)
    (("bert.pooler",), {"bert.pooler.dense"}),
    (("output.dense",), {"bert.encoder.output.dense"}),         # a dotted suffix
    (("dense",), {"bert.encoder.output.dense", "bert.pooler.dense"}),
    (("lm_head", "query"), {"lm_head", "bert.encoder.query"}),
    ((), set()),
])
def test_one_skip_rule_for_replace_linear_and_the_cli(skip, dense):
    """replace_linear(skip=("pooler",)) quantized pooler.dense while `lowbit quantize --skip pooler` kept it
    dense. One rule now (lowbit.nn.skip_matches); the expected sets are written out by hand."""
    from lowbit._tools import linear_targets

    model = lowbit.replace_linear(_bert_like(), "int4", skip=skip)
    got = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert got == dense
    all_linear = {"bert.encoder.output.dense", "bert.encoder.query", "bert.pooler.dense", "lm_head"}
    assert {n for n, _ in linear_targets(_bert_like(), skip)} == all_linear - dense  # the CLI's selection


def test_skip_is_not_a_substring_match():
    with pytest.warns(UserWarning, match="'pool' matches no module"):
        model = lowbit.replace_linear(_bert_like(), "int4", skip=("pool",))
    assert type(model["bert"]["pooler"]["dense"]) is IntLinear


def _every_family():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    return [Linear4bit.from_linear(lin), IntLinear.from_linear(lin, bits=3), SZLinear.from_linear(lin, error_bound=1e-3)]


@pytest.mark.parametrize("cast", [None, torch.float16], ids=["as-built", "after-half"])
@pytest.mark.parametrize("family", [0, 1, 2], ids=["Linear4bit", "IntLinear", "SZLinear"])
def test_every_layer_refuses_the_same_bad_inputs(family, cast):
    """SZLinear skipped the checks the other layers make (int64 x gave a truncated int64 output, bool gave
    bool, complex dropped its imaginary part, float64 ran in fp32, a wrong width raised torch's error). And a
    layer with a compute dtype (after .half()) converted an int x before checking it. One check, every layer."""
    layer = _every_family()[family]
    if cast is not None:
        layer = layer.to(cast)
    good = torch.randn(3, 64)
    assert layer(good).dtype == torch.float32
    for bad in (torch.randint(-5, 5, (3, 64)), torch.ones(3, 64, dtype=torch.bool),
                torch.randn(3, 64, dtype=torch.complex64), torch.randn(3, 64, dtype=torch.float64)):
        with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16"):
            layer(bad)
    with pytest.raises(ValueError, match="x's last dimension must equal in_features=64"):
        layer(torch.randn(3, 63))


@pytest.mark.parametrize("family", [0, 1, 2], ids=["Linear4bit", "IntLinear", "SZLinear"])
def test_a_layer_left_on_the_meta_device_says_so(family):
    layer = _every_family()[family].to("meta")
    with pytest.raises(ValueError, match="x is on cpu but this .* is on meta"):
        layer(torch.randn(3, 64))


# ------------------------------------------------------------------ empty_layer: the layer to load into


@pytest.mark.parametrize("quant_type,opts", [
    ("nf4", {}), ("fp4", {"blocksize": 32, "double_quant": False}), ("optimal", {"blocksize": 64}),
    ("int2", {}), ("int3", {"group_size": 32, "method": "mse"}), ("int4", {"group_size": 96}),
    ("sz", {"error_bound": 1e-2}), ("sz", {}),
])
def test_empty_layer_takes_a_state_dict_of_the_layer_replace_linear_builds(quant_type, opts, monkeypatch):
    """load_quantized's layers: built by the constructor (no quantizer), they take exactly the state of the
    layer replace_linear quantizes, whatever its data-dependent sizes (96 % 64: the flat 4-bit layout)."""
    from lowbit.nn import empty_layer, layer_factory

    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    ref = layer_factory(quant_type, {"error_bound": 1e-2, **opts} if quant_type == "sz" else opts)(lin)
    for cls in (Linear4bit, IntLinear, SZLinear):
        monkeypatch.setattr(cls, "from_linear", None)  # empty_layer must not reach a quantizing path
    layer = empty_layer(quant_type, 96, 40, True, **opts)
    assert type(layer) is type(ref) and not torch.any(layer.dequantized_weight(torch.float32))  # allocated zeros
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), ref(x))
    assert layer.format_metadata() == ref.format_metadata()


def test_empty_layer_refuses_what_layer_factory_refuses():
    from lowbit.nn import empty_layer

    with pytest.raises(ValueError, match="quant_type must be one of .*got 'int5'"):
        empty_layer("int5", 64, 8)
    with pytest.raises(ValueError, match=r"unknown options \['group_size'\] for quant_type='nf4'"):
        empty_layer("nf4", 64, 8, group_size=32)
    with pytest.raises(ValueError, match="method"):
        empty_layer("int3", 64, 8, method="best")
    with pytest.raises(ValueError, match="blocksize"):
        empty_layer("nf4", 64, 8, blocksize=48)
    with pytest.raises(ValueError, match="group_size"):
        empty_layer("int3", 64, 8, group_size=48)
