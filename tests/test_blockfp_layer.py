"""BlockFPLinear (the fourth family: MXFP4 / NVFP4) as a lowbit layer, registered through lowbit.nn.family.

Oracles: tests/test_blockfp.py's own decoder of the byte layout (`oracle_weight`, float64, not lowbit's),
compressed-tensors' own dequantization stored in its fixture, and float64 matmuls."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import blockfp as bfp
from lowbit.nn import empty_layer, family_of, layer_factory, quant_types, replace_linear
from lowbit.nn.blockfp import BlockFPLinear

from .test_blockfp import oracle_weight

DATA = Path(__file__).parent / "data" / "blockfp"
QTS = ("mxfp4", "nvfp4")


def _lin(n: int, k: int) -> nn.Linear:
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k) * 0.05)
        lin.bias.copy_(torch.randn(n))
    return lin


def _w64(m: BlockFPLinear) -> torch.Tensor:
    return torch.from_numpy(oracle_weight(m.quantized_weight)).double()


def test_registered_by_its_own_module_only():
    """The registry serves the family: quant types listed, layer_factory / empty_layer build it, options
    refused by name. Catches: a family module that is not imported, a Family record with the wrong layer."""
    assert {"mxfp4", "nvfp4"} <= set(quant_types())
    fam = family_of("nvfp4")
    assert fam.name == "blockfp" and fam.layer is BlockFPLinear and fam.doc == "docs/blockfp.md"
    assert isinstance(layer_factory("mxfp4", {})(_lin(8, 64)), BlockFPLinear)
    assert empty_layer("nvfp4", 64, 8).quant_type == "nvfp4"
    with pytest.raises(ValueError, match=r"unknown options \['blocksize'\] for quant_type='nvfp4'"):
        layer_factory("nvfp4", {"blocksize": 64})
    with pytest.raises(ValueError, match="in_features=40 is not a multiple of mxfp4's block of 32"):
        BlockFPLinear(40, 8, quant_type="mxfp4")


@pytest.mark.parametrize("qt", QTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_matches_the_layout_oracle(qt, dtype, tol):
    """Catches: a forward that decodes differently from the documented bytes (nibble order, scale, global
    divisor), a dropped bias, the wrong output dtype."""
    n, k = 40, 192  # several blocks per row for both block sizes; rows not a power of two
    m = BlockFPLinear.from_linear(_lin(n, k), quant_type=qt)
    x = torch.randn(7, k)
    want = x.double() @ _w64(m).T + m.bias.detach().double()
    got = m.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(m.dequantized_weight(torch.float32).double(), _w64(m), rtol=0, atol=0)


@pytest.mark.parametrize("qt", QTS)
def test_state_dict_round_trip_and_metadata_refusal(qt, tmp_path):
    """save_state_dict / load_quantized-style round trip through an empty layer (no quantizing), and a
    checkpoint of the other quant type refused naming the field. Catches: a buffer left out of the state
    dict (nvfp4's global scale), metadata without quant_type."""
    m = BlockFPLinear.from_linear(_lin(24, 64), quant_type=qt)
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(m, str(path))
    e = empty_layer(qt, 64, 24)
    lowbit.load_state_dict(e, str(path))
    x = torch.randn(3, 64)
    assert torch.equal(e(x), m(x))
    other = "mxfp4" if qt == "nvfp4" else "nvfp4"
    o = BlockFPLinear.from_linear(_lin(24, 64), quant_type=other)
    with pytest.raises((ValueError, RuntimeError), match="quant_type"):
        e.load_state_dict(o.state_dict())


def test_compressed_tensors_checkpoint_loads_without_requantizing():
    """A layer's tensors as compressed-tensors 0.20.1 wrote them (float8 scales, a [1] global scale), loaded
    into an empty nvfp4 layer by load_state_dict and by from_compressed_tensors: the weight equals
    compressed-tensors' own fp32 dequantization exactly. Catches: scale bytes reinterpreted, the global scale
    multiplied instead of divided, a re-quantization on load."""
    from safetensors.torch import load_file

    d = load_file(str(DATA / "nvfp4_compressed_tensors.safetensors"))
    tensors = {k: d[k] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
    n, k = d["weight"].shape
    e = BlockFPLinear(k, n, bias=False, quant_type="nvfp4")
    meta = e.get_extra_state()
    e.load_state_dict({**tensors, "_extra_state": meta})
    torch.testing.assert_close(e.dequantized_weight(torch.float32), d["dequantized_f32"], rtol=0, atol=0)
    f = BlockFPLinear.from_compressed_tensors(tensors)
    assert torch.equal(f.weight_packed, d["weight_packed"]) and torch.equal(f.dequantized_weight(), e.dequantized_weight())


def test_gpt_oss_mxfp4_pair_loads_without_requantizing():
    """Catches: gpt-oss blocks read in the wrong order or with the scale bias dropped (the converter's own
    output, stored in the fixture, is the oracle)."""
    from safetensors.torch import load_file

    d = load_file(str(DATA / "mxfp4_gpt_oss.safetensors"))
    m = BlockFPLinear.from_gpt_oss(d["blocks"][0], d["scales"][0], name="experts.gate_up_proj[0]")
    # transformers' converter returns [in, out] per expert (the HF parameter is transposed)
    torch.testing.assert_close(m.dequantized_weight(torch.float32), d["converted_f32"][0].T, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["e8m0_nan", "global_zero", "global_inf"])
def test_bad_bytes_refused_naming_the_tensor_nothing_half_loaded(case):
    """Catches: E8M0's NaN byte 0xFF or an NVFP4 global scale of 0 / inf loaded as if valid (every output
    NaN or inf), and a refused load that still overwrote part of the layer."""
    qt = "mxfp4" if case == "e8m0_nan" else "nvfp4"
    good = BlockFPLinear.from_linear(_lin(16, 64), quant_type=qt)
    sd = {k: v.clone() for k, v in BlockFPLinear.from_linear(_lin(16, 64), quant_type=qt).state_dict().items()}
    if case == "e8m0_nan":
        sd["weight_scale"][3, 1] = 0xFF
    else:
        sd["weight_global_scale"] = torch.tensor(0.0 if case == "global_zero" else float("inf"))
    before = {k: v.clone() for k, v in good.state_dict().items()}
    with pytest.raises(RuntimeError, match="weight_scale|global" if case != "e8m0_nan" else "0xFF|NaN"):
        good.load_state_dict(sd)
    for k, v in good.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


@pytest.mark.parametrize("qt", QTS)
def test_narrow_and_cat_rows_keep_the_bytes(qt):
    """Tensor-parallel cuts and vLLM's fused shards: the decoded slice / concatenation is exact.
    Catches: a column cut off by a factor of 2 (two codes per byte), scales of the wrong block."""
    m = BlockFPLinear.from_linear(_lin(32, 128), quant_type=qt)
    w = _w64(m)
    part = m.narrow(1, 32, 64)
    torch.testing.assert_close(_w64(part), w[:, 32:96], rtol=0, atol=0)
    rows = [m.narrow(0, 0, 8), m.narrow(0, 8, 24)]
    joined = BlockFPLinear.cat_rows(rows)
    assert joined is not None
    torch.testing.assert_close(_w64(joined), w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="would split a block"):
        m.narrow(1, 8, 64)


def test_lora_on_nvfp4_trains_and_merges_with_the_error_reported():
    """QLoRA on an NVFP4 base through PEFT (lowbit.integrations.peft, found through the registry): the loss
    drops, the base's bytes do not change while training, and merge_and_unload re-quantizes with the
    measured error reported. Catches: gradients not reaching the adapter through the base, training that
    writes the base, a merge that silently loses the update."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    from lowbit.integrations.peft import LowbitMergeWarning, register

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = replace_linear(transformers.LlamaForCausalLM(cfg).eval(), "nvfp4")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, register(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj", "down_proj"])))
    tokens = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    base_sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in pm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_sd[k], v) for k, v in frozen.items() if "weight_" in k)
    with torch.no_grad():
        expect = pm(tokens).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pm.merge_and_unload()
    msgs = [str(w.message) for w in caught if issubclass(w.category, LowbitMergeWarning)]
    assert len(msgs) == 6 and all("nvfp4" in m and "re-quantization error max" in m for m in msgs)
    layers = [m for m in merged.modules() if isinstance(m, BlockFPLinear) and hasattr(m, "lowbit_merge_error")]
    assert len(layers) == 6 and all(m.lowbit_merge_error["rms_error"] > 0 for m in layers)
    with torch.no_grad():
        got = merged(tokens).logits
    assert (got - expect).abs().max() < 0.5 * expect.abs().max()


@pytest.mark.parametrize("qt", QTS)
def test_transformers_quantize_on_load_save_and_reload(qt, tmp_path):
    """LowbitConfig(quant_type="nvfp4") through from_pretrained / save_pretrained / from_pretrained: the
    reloaded model gives the same logits and holds the same bytes. Catches: a family the HF quantizer cannot
    build or save (the integration names no family: it asks the registry)."""
    transformers = pytest.importorskip("transformers")
    from lowbit.integrations.transformers import LowbitConfig

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "fp")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=LowbitConfig(qt, modules_to_not_convert=["lm_head"])).eval()
    layers = [m for m in q.modules() if isinstance(m, BlockFPLinear)]
    assert len(layers) == 14 and all(m.quant_type == qt for m in layers)
    q.save_pretrained(tmp_path / "q")
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(r(tokens).logits, q(tokens).logits)
    for a, b in zip(layers, [m for m in r.modules() if isinstance(m, BlockFPLinear)]):
        assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale)


def test_lowbit_quantize_cli_writes_a_folder_that_loads(tmp_path):
    """`lowbit quantize --format mxfp4` (its format list comes from the registry) writes a folder that
    lowbit.load_quantized reads back without quantizing. Catches: a CLI format list that is hard-coded."""
    transformers = pytest.importorskip("transformers")
    from lowbit import cli

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "fp")
    # --scale-search: the family's own Option, turned into a flag by the registry
    assert cli.main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--format", "mxfp4",
                     "--scale-search"]) == 0
    skeleton = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.load_quantized(skeleton, str(tmp_path / "q"))
    layers = [m for m in skeleton.modules() if isinstance(m, BlockFPLinear)]
    assert len(layers) == 7 and all(m.quant_type == "mxfp4" for m in layers)
    ref = copy.deepcopy(model)
    replace_linear(ref, "mxfp4", scale_search=True)
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(skeleton(tokens).logits, ref(tokens).logits)
    # a flag of another family is refused as a usage error (exit status 2), naming it
    assert cli.main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q2"), "--format", "mxfp4",
                     "--blocksize", "64"]) == 2


@pytest.mark.parametrize("qt", QTS)
def test_scale_search_option_reaches_every_quantization(qt):
    """scale_search (an Option of the family) is used by from_linear, replace_linear, PEFT's requantize_ and kept
    by narrow. Catches: the option accepted but dropped on one of those paths (standard bytes written)."""
    torch.manual_seed(3)
    lin = _lin(48, 128)
    lin.weight.data[5, 7] = 30.0  # an outlier block, where the search moves the byte
    want = bfp.quantize_blockfp(lin.weight.detach(), qt, scale_search=True)
    std = bfp.quantize_blockfp(lin.weight.detach(), qt)
    assert not torch.equal(want.scales, std.scales)
    m = BlockFPLinear.from_linear(lin, quant_type=qt, scale_search=True)
    assert torch.equal(m.weight_scale, want.scales) and torch.equal(m.weight_packed, want.packed)
    model = replace_linear(nn.Sequential(copy.deepcopy(lin)), qt, scale_search=True)
    assert torch.equal(model[0].weight_scale, want.scales)
    m2 = BlockFPLinear.from_linear(_lin(48, 128), quant_type=qt, scale_search=True)
    m2.requantize_(lin.weight.detach())
    assert torch.equal(m2.weight_scale, want.scales)
    assert m.narrow(0, 0, 16).scale_search is True
    with pytest.raises(TypeError, match="scale_search must be a bool"):
        BlockFPLinear(64, 8, quant_type=qt, scale_search="yes")
