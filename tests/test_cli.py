"""`lowbit quantize` / `lowbit bench` / the demo's table code, and lowbit.io.load_quantized."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit import _demo, cli
from lowbit.io import load_quantized

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("lowbit.minilm")


@pytest.fixture(autouse=True)
def _one_thread():
    # MiniLM forwards are small: one thread is as fast and does not stall on a busy machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir():
    try:
        return minilm.model_dir()
    except ImportError as e:
        pytest.skip(str(e))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("lowbit: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _tokens(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return tok(list(minilm.SENTENCES[:4]), padding=True, return_tensors="pt")


# ------------------------------------------------------------------------------ quantize: happy


@pytest.mark.parametrize("fmt,extra,opts", [
    ("nf4", [], {"blocksize": 64, "double_quant": True}),
    ("int3", ["--group-size", "128"], {"group_size": 128}),
])
def test_quantize_then_load_quantized_matches_in_memory(tmp_path, capsys, model_dir, fmt, extra, opts):
    out = tmp_path / "q"
    assert cli.main(["quantize", model_dir, str(out), "--format", fmt, "--skip", "pooler", *extra]) == 0
    assert capsys.readouterr().err.count("error") == 0
    for name in ("model.safetensors", "lowbit.json", "config.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["format"] == fmt and meta["skip"] == ["pooler.dense"] and meta["options"] == opts
    assert meta["skip_requested"] == ["pooler"]
    assert meta["lowbit_version"] == lowbit.__version__
    assert json.loads((out / "config.json").read_text()) == json.loads(open(os.path.join(model_dir, "config.json")).read())

    batch = _tokens(model_dir)
    # The quantized model in memory, built here independently of the CLI.
    ref = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    lowbit.replace_linear(ref, fmt, skip=("pooler.dense",), progress=False, **opts)
    # A fresh model with *random* weights: identical outputs prove that the checkpoint was loaded.
    torch.manual_seed(1234)
    cfg = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    fresh = transformers.AutoModel.from_config(cfg).eval()
    before = dict(fresh.named_modules())["encoder.layer.0.attention.self.query"].weight.detach().clone()
    loaded = load_quantized(fresh, str(out))
    assert loaded is fresh
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert ("Linear4bit" if fmt == "nf4" else "IntLinear") in kinds
    assert type(loaded.pooler.dense) is nn.Linear  # skipped layer stays dense
    with torch.no_grad():
        y_ref = ref(**batch).last_hidden_state
        y = loaded(**batch).last_hidden_state
    assert torch.equal(y, y_ref)
    # and the loaded weights are the checkpoint's, not a re-quantization of the random init
    q = dict(loaded.named_modules())["encoder.layer.0.attention.self.query"]
    r = dict(ref.named_modules())["encoder.layer.0.attention.self.query"]
    assert torch.equal(q.dequantized_weight(torch.float32), r.dequantized_weight(torch.float32))
    assert not torch.allclose(q.dequantized_weight(torch.float32), before, atol=1e-3)


def test_quantize_force_overwrites_only_with_force(tmp_path, capsys, model_dir):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["quantize", model_dir, str(out), "--format", "int4"]) == 2
    _one_line_error(capsys, str(out), "--force")
    assert not (out / "model.safetensors").exists()
    assert cli.main(["quantize", model_dir, str(out), "--format", "int4", "--force"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "x"
    assert json.loads((out / "lowbit.json").read_text())["format"] == "int4"


# ------------------------------------------------------------------------------ quantize: errors


def test_quantize_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["quantize", str(missing), str(tmp_path / "o"), "--format", "nf4"]) == 2
    _one_line_error(capsys, str(missing), "does not exist")
    assert not (tmp_path / "o").exists()


def test_quantize_not_a_model_dir(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "README").write_text("not a model")
    assert cli.main(["quantize", str(d), str(tmp_path / "o"), "--format", "nf4"]) == 2
    _one_line_error(capsys, str(d), "config.json")
    assert not (tmp_path / "o").exists()


def test_quantize_unknown_format(tmp_path, capsys, model_dir):
    assert cli.main(["quantize", model_dir, str(tmp_path / "o"), "--format", "nf3"]) == 2
    _one_line_error(capsys, "nf3", "nf4")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--format", "nf4", "--blocksize", "48"], "--blocksize"),
    (["--format", "nf4", "--blocksize", "abc"], "--blocksize"),
    (["--format", "int3", "--group-size", "0"], "--group-size"),
    (["--format", "int3", "--group-size", "48"], "--group-size"),
    (["--format", "int3", "--blocksize", "64"], "--blocksize"),
    (["--format", "sz"], "--error-bound"),
    (["--format", "sz", "--error-bound", "-1"], "--error-bound"),
    (["--format", "sz", "--error-bound", "nan"], "--error-bound"),
    (["--format", "nf4", "--error-bound", "0.01"], "--error-bound"),
])
def test_quantize_bad_options(tmp_path, capsys, model_dir, args, needle):
    assert cli.main(["quantize", model_dir, str(tmp_path / "o"), *args]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "o").exists()


def test_quantize_group_size_not_dividing_layers(tmp_path, capsys, model_dir):
    # 256 is a multiple of 32 but does not divide MiniLM's in_features (384): caught at replace time
    assert cli.main(["quantize", model_dir, str(tmp_path / "o"), "--format", "int2", "--group-size", "256"]) == 2
    _one_line_error(capsys, "group_size")
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_out_dir_equal_model_dir(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert cli.main(["quantize", str(d), str(d), "--format", "nf4", "--force"]) == 2
    _one_line_error(capsys, "MODEL_DIR")
    assert sorted(os.listdir(d)) == ["config.json"]


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "nope"
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(missing), str(tmp_path / "o"),
                        "--format", "nf4"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------ load_quantized


def test_load_quantized_bad_paths(tmp_path):
    m = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_quantized(m, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="lowbit.json"):
        load_quantized(m, tmp_path)
    (tmp_path / "lowbit.json").write_text(json.dumps({"format": "nf4", "options": {}, "skip": []}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(m, tmp_path)
    assert type(m[0]) is nn.Linear  # nothing was replaced before the check


def test_load_quantized_toy_sz_roundtrip(tmp_path):
    # sz buffers change shape with the data: a model built from other weights must still load
    src = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    lowbit.replace_linear(src, "sz", skip=(), error_bound=0.01)
    from lowbit.io import write_manifest

    lowbit.save_state_dict(src, tmp_path / "model.safetensors")
    write_manifest(tmp_path, "sz", {"error_bound": 0.01}, [])
    dst = load_quantized(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)), tmp_path)
    x = torch.randn(5, 64)
    assert torch.equal(dst(x), src(x))


# ------------------------------------------------------------------------------ bench


def test_bench_json_quick(capsys):
    assert cli.main(["bench", "--json", "--quick", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["device"] == "cpu" and res["quick"] is True
    rows = res["results"]
    kernels = {r["kernel"] for r in rows}
    assert {"dense", "lowbit_nf4", "lowbit_int4_rows", "lowbit_int3_g128", "sz_decompress"} <= kernels
    for r in rows:
        assert r["ms"] > 0 and r["vs_dense"] > 0
        if r["M"]:
            dense = [d for d in rows if d["kernel"] == "dense" and (d["M"], d["K"], d["N"]) == (r["M"], r["K"], r["N"])]
            assert len(dense) == 1
            assert r["vs_dense"] == pytest.approx(r["ms"] / dense[0]["ms"], rel=1e-9)
    assert res["bitsandbytes"] == ("bnb_nf4" in kernels)


def test_bench_cuda_without_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["bench", "--device", "cuda"]) == 2
    _one_line_error(capsys, "CUDA")


# ------------------------------------------------------------------------------ demo table code


def test_demo_measurement_on_toy_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(6, 128)

    def forward(m):
        return m(x)

    with torch.no_grad():
        ref = forward(model)
    r = _demo.measure_format(model, "int4", {"group_size": 64}, forward=forward, reference=ref, label="int4 g64",
                           repeats=1)
    assert all(type(m) is nn.Linear for m in model if hasattr(m, "weight"))  # the original is untouched
    # independent recomputation of the weight statistics
    diffs, nbytes = [], 0
    for lin in (model[0], model[2]):
        q = lowbit.quantize_int(lin.weight.detach(), 4, 64)
        diffs.append((lowbit.dequantize_int(q, torch.float32) - lin.weight).detach().double().reshape(-1))
        nbytes += q.nbytes
    d = torch.cat(diffs)
    n = 128 * 64 + 64 * 32
    assert r["params"] == n and r["layers"] == 2
    assert r["rmse"] == pytest.approx(float(d.pow(2).mean().sqrt()), rel=1e-9)
    assert r["max_err"] == pytest.approx(float(d.abs().max()), rel=1e-9)
    assert r["bits_per_param"] == pytest.approx(8 * nbytes / n, rel=1e-9)
    assert 4.0 < r["bits_per_param"] < 5.5
    mq = lowbit.replace_linear(__import__("copy").deepcopy(model), "int4", skip=(), group_size=64)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(mq(x).double(), ref.double(), dim=-1).mean()
    assert r["cosine"] == pytest.approx(float(cos), abs=1e-6) and r["cosine"] < 1.0
    table = _demo.format_table([{**r, "latency_ratio": 1.5}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| int4 g64 | ")
    assert len(lines[0].split("|")) == len(lines[2].split("|"))


def test_demo_formats_cover_every_format():
    assert {qt for _, _, qt, _ in _demo.DEMO_FORMATS} == set(cli.FORMATS)
    assert set(cli.FORMATS) == set(lowbit.nn.quant_types())


def test_export_hf_bnb_folder_loads_in_transformers_bitsandbytes(tmp_path):
    """`lowbit export MODEL_DIR OUT_DIR --to hf-bnb`: bnb's keys and config; refuses to overwrite."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    src, out = tmp_path / "fp", tmp_path / "bnb"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(src)
    assert cli.main(["export", str(src), str(out), "--to", "hf-bnb"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4") for k in keys)
    assert cli.main(["export", str(src), str(out), "--to", "hf-bnb"]) == 2  # exists: needs --force
    assert cli.main(["export", str(src), str(out), "--to", "gguf", "--force"]) == 2
    assert cli.main(["export", str(src), str(out), "--to", "hf-bnb", "--format", "int3", "--force"]) == 2


# ------------------------------------------------------------------ quantize: bitsandbytes 4-bit folders


def _tiny_llama(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bnb_dirs(tmp_path_factory):
    """A full-precision tiny Llama and the folder `lowbit export --to hf-bnb` writes from it (nf4)."""
    pytest.importorskip("lowbit.integrations.transformers")
    root = tmp_path_factory.mktemp("bnb")
    src = _tiny_llama(root / "fp")
    assert cli.main(["export", str(src), str(root / "bnb"), "--to", "hf-bnb"]) == 0
    return src, root / "bnb"


def _reference(src, fmt, **opts):
    """The base model of `src` quantized in memory by replace_linear (independent of `lowbit quantize`)."""
    base = transformers.AutoModel.from_pretrained(src, local_files_only=True).eval()
    return lowbit.replace_linear(base, fmt, progress=False, **opts)


def _load_out(out):
    cfg = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(4321)  # random weights: equal outputs prove the checkpoint was loaded
    return load_quantized(transformers.AutoModel.from_config(cfg).eval(), str(out))


def test_quantize_bnb_folder_keeps_the_bitsandbytes_bytes(tmp_path, capsys, bnb_dirs):
    src, bnb = bnb_dirs
    out = tmp_path / "q"
    assert cli.main(["quantize", str(bnb), str(out), "--format", "nf4"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "error" not in err, err
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["format"] == "nf4" and meta["options"] == {"blocksize": 64, "double_quant": True}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ref = _reference(src, "nf4")  # what export quantized: replace_linear's nf4 of the fp weights
    loaded = _load_out(out)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, lowbit.Linear4bit)}
    assert len(layers) == 7
    for name, layer in layers.items():
        r = ref.get_submodule(name)
        for buf in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset"):
            assert torch.equal(getattr(layer, buf), getattr(r, buf)), (name, buf)  # bit-identical codes
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, ref(x).last_hidden_state)


def test_quantize_bnb_folder_to_another_format_requantizes_and_warns(tmp_path, capsys, bnb_dirs):
    src, bnb = bnb_dirs
    out = tmp_path / "q"
    assert cli.main(["quantize", str(bnb), str(out), "--format", "int4", "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "bitsandbytes nf4" in err and "re-quantized to int4" in err, err
    # reference: the nf4 model's dequantized weights, quantized to int4 by replace_linear
    ref = _reference(src, "nf4")
    for name, m in [(n, m) for n, m in ref.named_modules() if isinstance(m, lowbit.Linear4bit)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=False)
        lin.weight.data = m.dequantized_weight(torch.float32)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
    lowbit.replace_linear(ref, "int4", group_size=32, progress=False)
    loaded = _load_out(out)
    assert sum(isinstance(m, lowbit.IntLinear) for m in loaded.modules()) == 7
    sd, ref_sd = loaded.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k


def test_quantize_bnb_folder_other_blocksize_requantizes(tmp_path, capsys, bnb_dirs):
    _, bnb = bnb_dirs
    out = tmp_path / "q"
    assert cli.main(["quantize", str(bnb), str(out), "--format", "nf4", "--blocksize", "32"]) == 0
    assert "--blocksize / --no-double-quant differ" in capsys.readouterr().err
    loaded = _load_out(out)
    assert {m.blocksize for m in loaded.modules() if isinstance(m, lowbit.Linear4bit)} == {32}


def test_quantize_refuses_bnb_8bit_and_lowbit_folders(tmp_path, capsys):
    src = _tiny_llama(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli.main(["quantize", str(src), str(tmp_path / "q"), "--format", "nf4"]) == 2
    _one_line_error(capsys, "bitsandbytes 8-bit", "4-bit (nf4/fp4)")
    cfg["quantization_config"] = {"quant_method": "lowbit", "quant_type": "nf4"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["quantize", str(src), str(tmp_path / "q"), "--format", "nf4"]) == 2
    _one_line_error(capsys, "already a lowbit model", "lowbit.integrations.transformers")
    assert not (tmp_path / "q").exists()
