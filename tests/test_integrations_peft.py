"""lowbit.integrations.peft: PEFT's LoRA on lowbit layers (issue 12).

A tiny Llama built from a config, its Linear layers swapped by replace_linear (nf4, int3, sz). PEFT's
own get_peft_model / save_pretrained / PeftModel.from_pretrained / merge_and_unload, with the lowbit
LoRA layer registered through LoraConfig._register_custom_module.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install lowbit[test])")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install lowbit[test])")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lowbit  # noqa: E402
from lowbit.integrations.peft import (LowbitLoraLinear, LowbitMergeWarning, load_adapter, register,  # noqa: E402
                                      save_lora_linear_as_peft)

FORMATS = {"nf4": {}, "int3": {"group_size": 32}, "sz": {"error_bound": 1e-3}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 14  # 7 per block, 2 blocks
STEPS = 4


def lora_config(**kw) -> LoraConfig:
    return register(LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **kw}))


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base(fp_model):
    """quant_type -> a fresh copy of the quantized model."""
    cache = {}

    def get(qt):
        if qt not in cache:
            cache[qt] = lowbit.replace_linear(copy.deepcopy(fp_model), qt, **FORMATS[qt])
        return copy.deepcopy(cache[qt])
    return get


@pytest.fixture(scope="module")
def trained(base, tokens, tmp_path_factory):
    """quant_type -> (PeftModel after STEPS AdamW steps, losses, logits before, adapter folder)."""
    cache = {}

    def get(qt):
        if qt not in cache:
            model = base(qt)
            with torch.no_grad():
                before = model(tokens).logits
            pm = get_peft_model(model, lora_config())
            frozen = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" not in k}
            with torch.no_grad():
                at_init = pm(tokens).logits
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
            losses = []
            for _ in range(STEPS):
                loss = pm(tokens, labels=tokens).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            pm.eval()
            path = tmp_path_factory.mktemp(f"adapter-{qt}")
            pm.save_pretrained(path)
            cache[qt] = dict(model=pm, losses=losses, before=before, at_init=at_init, frozen=frozen, path=str(path))
        return cache[qt]
    return get


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("qt", FORMATS)
def test_lora_wraps_every_lowbit_layer_and_only_lora_trains(qt, trained):
    pm = trained(qt)["model"]
    wrapped = [m for m in pm.modules() if isinstance(m, LowbitLoraLinear)]
    assert len(wrapped) == N_LAYERS
    assert all(isinstance(m.get_base_layer(), lowbit.QuantLinear) for m in wrapped)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * N_LAYERS and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("qt", FORMATS)
def test_output_unchanged_at_init(qt, trained):
    t = trained(qt)
    assert torch.equal(t["at_init"], t["before"])


@pytest.mark.parametrize("qt", FORMATS)
def test_a_few_steps_lower_the_loss_and_touch_only_the_adapter(qt, trained):
    t = trained(qt)
    assert t["losses"][-1] < t["losses"][0] - 0.1, t["losses"]
    sd = t["model"].state_dict()
    for k, v in t["frozen"].items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("qt", FORMATS)
def test_adapter_save_reload_identical(qt, trained, base, tokens):
    t = trained(qt)
    path = t["path"]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(path))
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # PEFT's own names: other PEFT tools (and vLLM's LoRA serving) read them
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * N_LAYERS and all("lora_" in k for k in keys)
    expect = logits(t["model"], tokens)
    back = PeftModel.from_pretrained(base(qt), path, config=register(LoraConfig.from_pretrained(path)))
    assert torch.equal(logits(back, tokens), expect)
    assert torch.equal(logits(load_adapter(base(qt), path), tokens), expect)


def _fresh_quantization_rms(qt: str, w: torch.Tensor) -> float:
    """RMS error of quantizing `w` directly in the format of FORMATS[qt]."""
    if qt == "nf4":
        back = lowbit.dequantize_4bit(lowbit.quantize_4bit(w, 64, "nf4", True), torch.float32)
    else:
        back = lowbit.dequantize_int(lowbit.quantize_int(w, 3, FORMATS[qt]["group_size"], "rtn"), torch.float32)
    return (back - w).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("qt", ["nf4", "int3"])
def test_merge_and_unload_requantizes_and_reports_the_error(qt, trained, fp_model, base, tokens):
    t = trained(qt)
    pm = load_adapter(base(qt), t["path"])
    expect = logits(pm, tokens)
    # the update by hand from the adapter tensors (lora_alpha / r = 8 / 4), not by the code under test
    deltas = {n.removeprefix("base_model.model."): (8 / 4) * (m.lora_B["default"].weight.detach().double() @
                                                              m.lora_A["default"].weight.detach().double()).float()
              for n, m in pm.named_modules() if isinstance(m, LowbitLoraLinear)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pm.merge_and_unload()
    msgs = [str(w.message) for w in caught if issubclass(w.category, LowbitMergeWarning)]
    assert len(msgs) == N_LAYERS and all("re-quantization error max" in m and "RMS" in m for m in msgs)
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert layers.keys() == deltas.keys() and not any(isinstance(m, LowbitLoraLinear) for m in merged.modules())
    # bounded: the merge rounds about as much as quantizing the exact merged fp weight (W + update) would
    for name, layer in layers.items():
        exact = fp_model.get_submodule(name).weight.detach() + deltas[name]
        assert layer.lowbit_merge_error["rms_error"] <= 1.25 * _fresh_quantization_rms(qt, exact), name
    got = logits(merged, tokens)
    assert (got - expect).norm() < (expect - t["before"]).norm()  # most of what the adapter changed survives


def test_merge_refused_for_sz(trained, base, tokens):
    pm = load_adapter(base("sz"), trained("sz")["path"])
    expect = logits(pm, tokens)
    with pytest.raises(ValueError, match=r"SZLinear is refused.*error_bound=0.001.*2x the bound"):
        pm.merge_and_unload()
    assert torch.equal(logits(pm, tokens), expect)


def test_lowbit_layers_need_register(base):
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(base("nf4"), LoraConfig(r=4, target_modules=["q_proj"]))


def test_all_linear_is_expanded_to_lowbit_layers(base):
    model = base("int3")
    cfg = register(LoraConfig(r=2, target_modules="all-linear"), model)
    assert len(cfg.target_modules) == N_LAYERS and not any("lm_head" in n for n in cfg.target_modules)
    pm = get_peft_model(model, cfg)
    assert sum(isinstance(m, LowbitLoraLinear) for m in pm.modules()) == N_LAYERS


def test_lora_variants_are_refused(base):
    with pytest.raises(ValueError, match="plain LoRA only"):
        get_peft_model(base("nf4"), lora_config(use_dora=True))


def test_on_a_model_quantized_by_from_pretrained(fp_model, tokens, tmp_path):
    """The whole QLoRA recipe: from_pretrained(quantization_config=LowbitConfig) + get_peft_model."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("lowbit.integrations.transformers needs transformers >= 5")
    from transformers import AutoModelForCausalLM

    from lowbit.integrations.transformers import LowbitConfig

    fp_model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LowbitConfig("nf4"))
    assert model.hf_quantizer.is_trainable
    pm = get_peft_model(model, lora_config())
    loss = pm(tokens, labels=tokens).loss
    loss.backward()
    grads = [n for n, p in pm.named_parameters() if p.grad is not None]
    assert len(grads) == 2 * N_LAYERS


def test_lora_linear_adapters_convert_to_peft(base, tokens, tmp_path):
    """Adapters trained with lowbit's own LoRALinear load in PEFT with the same outputs."""
    model = base("nf4")
    plain = copy.deepcopy(model)
    torch.manual_seed(2)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj = lowbit.LoRALinear(layer.self_attn.q_proj, r=4, alpha=8)
        layer.mlp.down_proj = lowbit.LoRALinear(layer.mlp.down_proj, r=2 + i, alpha=4)
    for m in model.modules():
        if isinstance(m, lowbit.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)  # B starts at zero: give it a trained-looking value
    expect = logits(model, tokens)
    cfg = save_lora_linear_as_peft(model, tmp_path)
    assert cfg.r == 4 and cfg.rank_pattern == {"model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 3}
    pm = load_adapter(plain, tmp_path)
    assert sum(isinstance(m, LowbitLoraLinear) for m in pm.modules()) == 4
    torch.testing.assert_close(logits(pm, tokens), expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- merge / unmerge against float64 math
# The merge test above compared with a weight built by the code under test (get_delta_weight) at a loose
# tolerance: a merge that dropped lora_alpha / r (half the update at alpha / r = 2) passed, and unmerge,
# merge_adapter and unmerge_adapter were never called (an unmerge that added the update again passed).
# Here the exact merged weight is W + (alpha / r) B A in float64 from the adapter tensors, with W and the
# merged weights decoded from their bytes by oracles independent of lowbit, and alpha / r = 3.


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(128, 64)
        self.out = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


MERGE_FORMATS = {"nf4": {}, "fp4": {"blocksize": 32, "double_quant": False}, "int3": {"group_size": 32},
                 "int4": {}}


def _oracle(layer) -> torch.Tensor:
    """The layer's weight decoded from its bytes in float64 (oracles independent of lowbit's decoders)."""
    from tests.helpers import int_oracle_weight, nf4_oracle_weight

    if isinstance(layer, lowbit.Linear4bit):
        return nf4_oracle_weight(layer.quantized_weight)
    return int_oracle_weight(layer.quantized_weight)


def _requantized(layer, target64: torch.Tensor) -> torch.Tensor:
    """What the layer's format makes of `target64` (float64) when quantized directly, decoded in float64: the
    best a merge can do (re-quantizing rounds)."""
    w = target64.float()
    if isinstance(layer, lowbit.Linear4bit):
        q = lowbit.quantize_4bit(w, layer.blocksize, layer.quant_type, layer.double_quant)
        from tests.helpers import nf4_oracle_weight

        return nf4_oracle_weight(q)
    from tests.helpers import int_oracle_weight

    return int_oracle_weight(lowbit.quantize_int(w, layer.bits, layer.group_size, "rtn"))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm())


@pytest.mark.parametrize("qt", MERGE_FORMATS)
def test_merge_unmerge_against_float64(qt):
    model = lowbit.replace_linear(_Toy(), qt, **MERGE_FORMATS[qt])
    pm = get_peft_model(model, register(LoraConfig(r=4, lora_alpha=12, target_modules=["proj", "out"])))
    layers = {n.rsplit(".", 1)[-1]: m for n, m in pm.named_modules() if isinstance(m, LowbitLoraLinear)}
    assert set(layers) == {"proj", "out"}
    delta = {}
    for name, m in layers.items():
        with torch.no_grad():  # B starts at zero: an update about as large as W
            m.lora_B["default"].weight.normal_(std=0.2)
        a64 = m.lora_A["default"].weight.detach().double()
        b64 = m.lora_B["default"].weight.detach().double()
        delta[name] = (12 / 4) * (b64 @ a64)  # lora_alpha / r = 3
        assert delta[name].norm() > 0.5 * _oracle(m.get_base_layer()).norm()
    def weights():
        return {name: _oracle(m.get_base_layer()) for name, m in layers.items()}

    def check(what, before, sign):
        """After a merge (sign +1) or unmerge (-1): each weight is what quantizing before + sign * delta
        directly gives (to 0.1% of that rounding error), and the layer reports the error it made."""
        for name, m in layers.items():
            base = m.get_base_layer()
            got, want = _oracle(base), before[name] + sign * delta[name]
            best = _requantized(base, want)
            assert _err(got, want) <= 1.001 * _err(best, want) + 1e-12, (what, name, _err(got, want), _err(best, want))
            assert _err(got, want) < 0.25 * _err(before[name], want), (what, name)  # the update went in, once
            assert base.lowbit_merge_error["max_abs_error"] == pytest.approx(float((got - want).abs().max()),
                                                                             rel=1e-3, abs=1e-6), (what, name)

    w0 = weights()
    with pytest.warns(LowbitMergeWarning):
        pm.merge_adapter()  # PeftModel's merge: each layer's merge()
    assert all(m.merged for m in layers.values())
    check("merge_adapter", w0, +1)
    merged = weights()
    with pytest.warns(LowbitMergeWarning):
        pm.unmerge_adapter()
    assert not any(m.merged for m in layers.values())
    check("unmerge_adapter", merged, -1)
    for name in layers:  # back near W: two roundings, far below the update itself
        assert _err(weights()[name], w0[name]) < 0.5 * float(delta[name].norm()), name

    w1 = weights()
    for m in layers.values():  # the layer's own merge / unmerge, safe_merge on
        with pytest.warns(LowbitMergeWarning):
            m.merge(safe_merge=True)
    check("merge(safe_merge=True)", w1, +1)
    merged = weights()
    for m in layers.values():
        with pytest.warns(LowbitMergeWarning):
            m.unmerge()
    check("unmerge", merged, -1)
