"""lowbit.load_quantized builds the quantized layers from the folder's metadata and loads their tensors:
no quantizer runs and the dense weights of the layers it replaces are never read (the issue "Loading a
quantized folder must not quantize"). Before, it ran replace_linear (the whole quantizer: the optimal
codebook fit, the SZ encoder, ...) on the model's weights and then overwrote the result.

The oracle everywhere is the model that `lowbit quantize` saved, rebuilt in memory by replace_linear on the
source weights (independently of load_quantized); the load runs with every quantizer patched to raise."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import IntLinear, Linear4bit, QuantLinear, SZLinear, cli
from lowbit.io import load_quantized, read_state_dict, save_state_dict, write_manifest

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    # the models are small: one thread is as fast and does not stall on a busy machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class QuantizerCalled(AssertionError):
    pass


def _raise(*args, **kwargs):
    raise QuantizerCalled("a quantizer ran while loading a quantized folder")


def no_quantizer(monkeypatch):
    """From here on, every function a from_linear path quantizes with (at each name it is reached by) raises
    (called inside a test, after the folders it loads were written)."""
    import lowbit._ops
    import lowbit.formats.intq
    import lowbit.formats.nf4
    import lowbit.formats.sz
    import lowbit.functional
    import lowbit.nn.linear4bit

    names = ("quantize_4bit", "fit_optimal_table", "quantize_flat", "quantize_blockwise_8bit", "quantize_int",
             "sz_compress")
    patched = []
    for mod in (lowbit, lowbit.nn.linear4bit, lowbit.functional, lowbit._ops, lowbit.formats.nf4, lowbit.formats.intq,
                lowbit.formats.sz):
        for name in names:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _raise)
                patched.append(f"{mod.__name__}.{name}")
    for cls in (Linear4bit, IntLinear, SZLinear):
        monkeypatch.setattr(cls, "from_linear", classmethod(_raise))
    # the patch must reach what from_linear calls, or this fixture proves nothing
    for must in ("lowbit.nn.linear4bit.quantize_4bit", "lowbit.formats.nf4.fit_optimal_table", "lowbit.formats.intq.quantize_int",
                 "lowbit.formats.sz.sz_compress"):
        assert must in patched, must
    with pytest.raises(QuantizerCalled):
        lowbit.replace_linear(nn.Sequential(nn.Linear(64, 32)), "nf4", skip=())
    return patched


# A tiny Llama whose Linear layers have biases (attention_bias, mlp_bias) and widths that exercise both
# 4-bit layouts: in_features 96 is not a multiple of blocksize 64 (flat codes and scales), 192 is (by row).
_CONFIG = dict(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, attention_bias=True, mlp_bias=True)

# (CLI arguments, the options lowbit.json must then hold)
FORMATS = {
    "nf4": (["--format", "nf4"], {"blocksize": 64, "double_quant": True}),
    "fp4": (["--format", "fp4"], {"blocksize": 64, "double_quant": True}),
    "nf4-bs128-no-dq": (["--format", "nf4", "--blocksize", "128", "--no-double-quant"],
                        {"blocksize": 128, "double_quant": False}),
    "optimal": (["--format", "optimal"], {"blocksize": 64, "double_quant": True}),
    "optimal-no-dq": (["--format", "optimal", "--no-double-quant"], {"blocksize": 64, "double_quant": False}),
    "int2": (["--format", "int2"], {"group_size": None}),
    "int3": (["--format", "int3"], {"group_size": None}),
    "int4": (["--format", "int4"], {"group_size": None}),
    "int2-g32": (["--format", "int2", "--group-size", "32"], {"group_size": 32}),
    "int3-g32": (["--format", "int3", "--group-size", "32"], {"group_size": 32}),
    "int4-g96": (["--format", "int4", "--group-size", "96"], {"group_size": 96}),
    "sz": (["--format", "sz", "--error-bound", "0.01"], {"error_bound": 0.01, "mode": "abs"}),
    "sz-rel": (["--format", "sz", "--error-bound", "0.05", "--mode", "rel"], {"error_bound": 0.05, "mode": "rel"}),
}
_CLASS = {"nf4": Linear4bit, "fp4": Linear4bit, "optimal": Linear4bit, "int2": IntLinear, "int3": IntLinear,
          "int4": IntLinear, "sz": SZLinear}


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "fp"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CONFIG)).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(llama_src, tmp_path_factory):
    """{format id: (OUT_DIR, the saved model rebuilt in memory)}, made on first use."""
    made = {}

    def get(fid):
        if fid not in made:
            out = tmp_path_factory.mktemp("q") / fid
            args, opts = FORMATS[fid]
            assert cli.main(["quantize", str(llama_src), str(out), *args]) == 0
            manifest = json.loads((out / "lowbit.json").read_text())
            assert manifest["options"] == opts
            ref = transformers.AutoModelForCausalLM.from_pretrained(llama_src, local_files_only=True).eval()
            lowbit.replace_linear(ref, manifest["format"], skip=tuple(manifest["skip"]), progress=False, **opts)
            made[fid] = (out, ref)
        return made[fid]

    return get


def _fresh(out, seed=1234):
    """The architecture from OUT_DIR/config.json with random weights (equal outputs prove a load)."""
    from lowbit._quantize import architecture_class
    from lowbit._tools import read_config

    cfg = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(seed)
    return architecture_class(read_config(out))(cfg).eval()  # the class config.json names, as lowbit quantize loads it


def _assert_same_model(loaded, ref, ids):
    got, want = loaded.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k
    for (n, a), (_, b) in zip(loaded.named_modules(), ref.named_modules()):
        assert type(a) is type(b), n
        if isinstance(a, QuantLinear):  # the attributes outside the state dict too
            assert a.format_metadata() == b.format_metadata(), n
            if a.bias is not None:
                assert a.bias.requires_grad == b.bias.requires_grad, n
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


_IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 64, 2], [7, 7, 100, 31, 0, 12, 90, 45]])


@pytest.mark.parametrize("fid", list(FORMATS))
def test_load_runs_no_quantizer_and_equals_the_saved_model(folders, monkeypatch, fid):
    out, ref = folders(fid)
    no_quantizer(monkeypatch)
    model = _fresh(out)
    loaded = load_quantized(model, out)
    assert loaded is model
    cls = _CLASS[FORMATS[fid][0][1]]  # the --format argument
    assert sum(isinstance(m, cls) for m in loaded.modules()) == 14  # 7 Linear layers in each of 2 blocks
    _assert_same_model(loaded, ref, _IDS)
    # and the state dict is the file's, tensor for tensor (read here without load_quantized)
    stored = read_state_dict(out / "model.safetensors")
    # less the empty uint8 "<layer>.weight" markers of int/SZ layers (for transformers; load_quantized drops them)
    markers = {k for k, v in stored.items() if k.endswith(".weight") and v.dtype == torch.uint8 and v.numel() == 0}
    assert all(isinstance(loaded.get_submodule(k[:-7]), (IntLinear, SZLinear)) for k in markers)
    stored = {k: v for k, v in stored.items() if k not in markers}
    assert set(stored) == set(loaded.state_dict())
    assert all(torch.equal(stored[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("weights", ["nan", "meta"])
@pytest.mark.parametrize("fid", list(FORMATS))
def test_the_replaced_layers_dense_weights_are_never_read(folders, monkeypatch, fid, weights):
    """NaN weights would poison any quantization (or be refused), and a meta weight has no values at all: an
    exact result shows that only the checkpoint was read."""
    out, ref = folders(fid)
    no_quantizer(monkeypatch)
    model = _fresh(out)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":  # the head stays dense (and is tied to the embedding)
            if weights == "nan":
                m.weight.data.fill_(float("nan"))
            else:
                m.weight = nn.Parameter(torch.empty(m.weight.shape, device="meta"))
                m.bias = nn.Parameter(torch.empty(m.bias.shape, device="meta"))
    loaded = load_quantized(model, out)
    _assert_same_model(loaded, ref, _IDS)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())


@pytest.fixture(scope="module")
def minilm_dir():
    minilm = pytest.importorskip("lowbit.minilm")
    try:
        return minilm.model_dir()
    except ImportError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("args", [["--format", "sz", "--error-bound", "0.002"],
                                  ["--format", "int3", "--group-size", "128"]], ids=["sz", "int3-g128"])
def test_minilm_folder_loads_without_quantizing(tmp_path, monkeypatch, minilm_dir, args):
    out = tmp_path / "q"
    assert cli.main(["quantize", minilm_dir, str(out), *args]) == 0
    manifest = json.loads((out / "lowbit.json").read_text())
    ref = transformers.AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    lowbit.replace_linear(ref, manifest["format"], skip=tuple(manifest["skip"]), progress=False, **manifest["options"])
    no_quantizer(monkeypatch)
    loaded = load_quantized(_fresh(out), out)
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102]])
    got, want = loaded.state_dict(), ref.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


# ---------------------------------------------------------------------------------------- what stays as it was


def test_a_manifest_that_disagrees_with_the_layers_raises_before_the_model_changes(folders, monkeypatch):
    out, _ = folders("nf4")
    no_quantizer(monkeypatch)
    manifest = json.loads((out / "lowbit.json").read_text())
    bad = out.parent / "bad"
    bad.mkdir()
    for f in ("model.safetensors", "config.json"):
        (bad / f).write_bytes((out / f).read_bytes())
    write_manifest(bad, "nf4", {**manifest["options"], "blocksize": 128}, manifest["skip"])
    model = _fresh(out)
    before = {n: m for n, m in model.named_modules()}
    embed = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\._extra_state: the checkpoint holds "
                                         r"blocksize=64 but this Linear4bit has blocksize=128"):
        load_quantized(model, bad)
    assert {n: m for n, m in model.named_modules()} == before  # the same module objects: nothing swapped
    assert torch.equal(model.model.embed_tokens.weight, embed)  # and no tensor was loaded either
    write_manifest(bad, "int3", {"group_size": None}, manifest["skip"])
    with pytest.raises(ValueError, match="family"):
        load_quantized(model, bad)
    assert {n: m for n, m in model.named_modules()} == before


def test_a_failed_load_puts_the_linear_layers_back(folders, monkeypatch):
    out, ref = folders("int3")
    no_quantizer(monkeypatch)
    model = _fresh(out)
    model.register_buffer("extra", torch.zeros(3))  # a key the checkpoint lacks: strict loading refuses
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "extra"'):
        load_quantized(model, out)
    assert {n: m for n, m in model.named_modules() if type(m) is nn.Linear} == linears
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    loaded = load_quantized(model, out, strict=False)
    del loaded._buffers["extra"]
    _assert_same_model(loaded, ref, _IDS)


def _toy(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


def test_strict_false_quantizes_only_a_layer_the_checkpoint_lacks(tmp_path):
    src = lowbit.replace_linear(_toy(0), "optimal", skip=(), blocksize=32)
    save_state_dict(src, tmp_path / "model.safetensors")
    write_manifest(tmp_path, "optimal", {"blocksize": 32}, [])
    model = nn.Sequential(*_toy(1), nn.Linear(32, 64))  # a third layer the checkpoint holds nothing of
    third = model[3]
    with pytest.raises(RuntimeError, match='Missing key\\(s\\).*"3.weight"'):
        load_quantized(model, tmp_path)
    assert model[3] is third and type(model[0]) is nn.Linear
    expected = Linear4bit.from_linear(third, quant_type="optimal", blocksize=32)  # built before the load
    load_quantized(model, tmp_path, strict=False)
    x = torch.randn(5, 64)
    assert torch.equal(model[2](model[1](model[0](x))), src(x))
    assert torch.equal(model[3].dequantized_weight(torch.float32), expected.dequantized_weight(torch.float32))


def test_a_bare_linear_becomes_its_layer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)  # 96 % 64: the flat 4-bit layout
    src = lowbit.replace_linear(nn.Linear(96, 40), "nf4")
    save_state_dict(src, tmp_path / "model.safetensors")
    write_manifest(tmp_path, "nf4", {"blocksize": 64, "double_quant": True}, [])
    no_quantizer(monkeypatch)
    got = load_quantized(lin, tmp_path)
    assert type(got) is Linear4bit and got is not lin
    assert all(torch.equal(got.state_dict()[k], v) for k, v in src.state_dict().items())


def test_the_bias_keeps_the_models_dtype_as_replace_linear_keeps_it(tmp_path, monkeypatch):
    src = nn.Sequential(nn.Linear(64, 32))
    src = lowbit.replace_linear(src.to(torch.bfloat16), "sz", skip=(), error_bound=0.01)
    assert src[0].bias.dtype == torch.bfloat16
    save_state_dict(src, tmp_path / "model.safetensors")
    write_manifest(tmp_path, "sz", {"error_bound": 0.01}, [])
    no_quantizer(monkeypatch)
    got = load_quantized(nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16), tmp_path)
    assert got[0].bias.dtype == torch.bfloat16 and not got[0].bias.requires_grad
    assert torch.equal(got[0].bias, src[0].bias)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(got(x), src(x))

