"""`lowbit quantize` / `lowbit bench` / the demo's table code, and lowbit.io.load_quantized."""

from __future__ import annotations

import importlib
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
    # config.json: the source's, plus what transformers' save_pretrained with a LowbitConfig writes
    config = json.loads((out / "config.json").read_text())
    qc, hint = config.pop("quantization_config"), config.pop("transformers_weights")
    assert config == json.loads(open(os.path.join(model_dir, "config.json")).read())
    assert qc["quant_method"] == "lowbit" and qc["quant_type"] == fmt and qc["modules_to_not_convert"] == ["pooler.dense"]
    assert all(qc[k] == v for k, v in opts.items()) and hint.startswith("lowbit checkpoint:")

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

    # one folder format: transformers (with lowbit's integration) reads the same folder, no re-quantization
    importlib.import_module("lowbit.integrations.transformers")  # registers quant_method "lowbit"

    via_hf = transformers.AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(via_hf(**batch).last_hidden_state, y_ref)


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


def test_quantize_group_size_not_dividing_layers(tmp_path, model_dir):
    # 256 does not divide MiniLM's in_features (384): each row gets a ragged second group of 128 (docs/int.md),
    # where it used to be refused; the stored scales say so
    assert cli.main(["quantize", model_dir, str(tmp_path / "o"), "--format", "int2", "--group-size", "256"]) == 0
    from lowbit.io import read_state_dict

    sd = read_state_dict(tmp_path / "o" / "model.safetensors")
    assert sd["encoder.layer.0.attention.self.query.scale"].shape == (384, 2)  # ceil(384 / 256)
    assert sd["encoder.layer.0.intermediate.dense.scale"].shape == (1536, 2)


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


def test_bench_spread_is_a_robust_relative_spread():
    from lowbit._bench import relative_spread

    # nine repeats of ~10 us and one 17 ms scheduler stall: (max - min) / median printed 170513%
    times = [10e-6, 10.2e-6, 9.9e-6, 10.1e-6, 10e-6, 10.3e-6, 9.8e-6, 10e-6, 10.1e-6, 17e-3]
    assert relative_spread(times) < 0.05
    assert relative_spread([1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx((2.5 - 1.5) / 2.0)
    assert relative_spread([3.0, 1.0, 2.0]) == pytest.approx((2.5 - 1.5) / 2.0)  # order does not matter


def test_bench_spread_formatting():
    from lowbit._bench import format_spread

    assert format_spread(0.123) == "12%"
    assert format_spread(0.0) == "0%"
    assert format_spread(1.5) == "150%"
    assert format_spread(1705.13) == ">999%"
    assert format_spread(None) == "-"


@pytest.mark.parametrize("cuda", [False, True])
def test_bench_header_names_every_column_of_a_row(cuda):
    from lowbit._bench import format_header, format_row

    header = format_header(cuda)
    names = ["kernel", "K", "N", "M", "median ms", "vs dense"] + (["GB/s", "of copy"] if cuda else ["spread"])
    assert header.split() == " ".join(names).split()
    row = {"kernel": "sz3_decompress (pysz, same bound)", "M": 16, "K": 1024, "N": 4096, "ms": 0.1234,
           "vs_dense": 3.5, "spread": 0.12, "gbs": 812.4, "frac_copy_bw": 0.41}
    line = format_row(row, cuda)
    assert len(line) == len(header)  # aligned under the header
    cells = line[len(row["kernel"]):].split()
    assert cells == ["1024", "4096", "16", "0.123", "x3.50"] + (["812", "41%"] if cuda else ["12%"])
    assert line.endswith(cells[-1]) and header.endswith(names[-1])  # right-aligned under its name
    decoder = format_row({**row, "M": 0}, cuda)
    assert decoder[len(row["kernel"]):].split()[2] == "-"


def test_bench_noise_warning_advice_depends_on_threads():
    from lowbit._bench import noise_warning

    assert noise_warning([], 4) is None
    many = noise_warning(["dense M=1 K=256 N=256"], 4)
    one = noise_warning(["dense M=1 K=256 N=256"], 1)
    assert "--threads 1" in many and "dense M=1 K=256 N=256" in many
    assert "--threads 1" not in one and "quieter machine" in one  # it was already one thread


def test_bench_text_output_has_a_header_and_no_threads_advice_at_one_thread(capsys):
    from lowbit._bench import format_header

    assert cli.main(["bench", "--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == format_header(False)
    rows = [ln for ln in out[1:] if ln.startswith(("dense ", "lowbit_", "sz", "bnb_"))]
    # every row under the header; spread "-" only where a slow kernel ran under 3 times
    assert rows and all(len(ln) == len(out[0]) and (ln.endswith("%") or ln.endswith(" -")) for ln in rows)
    assert not any("--threads 1" in ln for ln in out)  # the run already used one thread


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


def _label_boxes(points, widths, offsets, height):
    return [(x + dx, y + dy, x + dx + w, y + dy + height) for (x, y), w, (dx, dy) in zip(points, widths, offsets)]


def _overlapping(boxes, tol=1e-9):
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[:i])
            if a[0] < b[2] - tol and b[0] < a[2] - tol and a[1] < b[3] - tol and b[1] < a[3] - tol]


# the demo's rows near 4.1 bits/param (format, bits/param, cosine): the labels used to print over each other
CROWD = [("nf4", 4.157, 0.9746), ("fp4", 4.157, 0.9485), ("optimal", 4.157, 0.9728), ("int4 (rows)", 4.078, 0.9416),
         ("sz (abs 0.008)", 3.942, 0.9741), ("int3 (g128)", 3.312, 0.8384), ("int2 (g64)", 2.625, 0.4646)]


def test_demo_plot_labels_do_not_overlap():
    h = 1.25 * _demo.LABEL_FONTSIZE
    # the crowd as drawn: ~170 points per bit, ~420 points per unit of cosine
    pts = [(170 * b, 420 * c) for _, b, c in CROWD]
    widths = [_demo.label_width(f) for f, _, _ in CROWD]
    naive = [(_demo.LABEL_PAD, -h / 2)] * len(pts)
    assert _overlapping(_label_boxes(pts, widths, naive, h))  # the bug: fixed offsets collide
    offsets = _demo.label_offsets(pts, widths, height=h)
    assert not _overlapping(_label_boxes(pts, widths, offsets, h))
    crowd = [i for i, (f, _, _) in enumerate(CROWD) if f not in ("int3 (g128)", "int2 (g64)")]
    # the crowd's labels: one column right of its rightmost marker, in the order of the points' y
    starts = {round(pts[i][0] + offsets[i][0], 6) for i in crowd}
    assert len(starts) == 1 and starts.pop() > max(pts[i][0] for i in crowd)
    by_y = sorted(crowd, key=lambda i: pts[i][1])
    assert [pts[i][1] + offsets[i][1] for i in by_y] == sorted(pts[i][1] + offsets[i][1] for i in crowd)
    # lone points keep the plain offset, right of the marker and centred on it
    for f in ("int3 (g128)", "int2 (g64)"):
        i = [c[0] for c in CROWD].index(f)
        assert offsets[i] == (_demo.LABEL_PAD, -h / 2)


def test_demo_plot_labels_random_layouts_and_bounds():
    gen = torch.Generator().manual_seed(7)
    h = 8.75
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        xy = (torch.rand(n, 2, generator=gen) * torch.tensor([120.0, 60.0])).tolist()
        widths = (torch.rand(n, generator=gen) * 60 + 5).tolist()
        offsets = _demo.label_offsets(xy, widths, height=h, bounds=(-50.0, 150.0))
        boxes = _label_boxes(xy, widths, offsets, h)
        assert not _overlapping(boxes)
        assert all(b[0] >= x + _demo.LABEL_PAD - 1e-9 for b, (x, _) in zip(boxes, xy))  # right of the marker
        assert all(-50 - 1e-9 <= b[1] and b[3] <= 150 + 1e-9 for b in boxes)  # inside the bounds
    # a stack pushed over the top edge comes back inside, gaps kept
    pts = [(0.0, 99.0)] * 4
    offsets = _demo.label_offsets(pts, [20.0] * 4, height=10, gap=1, bounds=(0.0, 100.0))
    tops = sorted(y + dy + 10 for (_, y), (_, dy) in zip(pts, offsets))
    assert tops[-1] == pytest.approx(100.0) and [b - a for a, b in zip(tops, tops[1:])] == pytest.approx([11.0] * 3)
    with pytest.raises(ValueError, match="label widths"):
        _demo.label_offsets([(0, 0)], [])


def test_demo_plot_right_limit_keeps_labels_inside():
    # axis [2, 4] drawn 200 points wide; a point at x=4 (px 200) whose label needs 4 + 46 points
    x1 = _demo.right_limit([200.0, 50.0], [(4.0, 0.0), (4.0, 0.0)], [46.0, 46.0], 2.0, 4.0, 200.0)
    assert 200 * (4 - 2) / (x1 - 2) + 4 + 46 == pytest.approx(200.0)  # the point moves left: ends at the edge
    assert _demo.right_limit([10.0], [(4.0, 0.0)], [20.0], 2.0, 4.0, 200.0) == 4.0  # fits: unchanged
    assert _demo.right_limit([10.0], [(4.0, 0.0)], [500.0], 2.0, 4.0, 200.0) == 4.0  # cannot fit: unchanged


def test_demo_plot_renders_without_overlapping_labels(tmp_path):
    pytest.importorskip("matplotlib")
    families = {label: fam for label, fam, _, _ in _demo.DEMO_FORMATS}
    rmse = {"nf4": 5.727e-3, "fp4": 7.752e-3, "optimal": 5.508e-3, "int4 (rows)": 8.144e-3, "int3 (g128)": 1.393e-2,
            "int2 (g64)": 2.870e-2, "sz (abs 0.008)": 4.554e-3}
    rows = [{"format": f, "family": families[f], "bits_per_param": b, "cosine": c, "rmse": rmse[f]} for f, b, c in CROWD]
    fig = _demo._figure(rows)
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for t in ax.texts:
            t.get_window_extent(renderer)  # places the annotation's text (and its leader line)
        boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text alone, without the leader line
        assert len(boxes) == len(rows)
        assert not _overlapping([(b.x0, b.y0, b.x1, b.y1) for b in boxes], tol=0.5)
        frame = ax.get_window_extent(renderer)
        assert all(b.x1 <= frame.x1 + 0.5 for b in boxes)  # no label runs over the right edge
    assert _demo._plot(rows, str(tmp_path / "rd.png")) and (tmp_path / "rd.png").stat().st_size > 10_000


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


@pytest.fixture(scope="module")
def quantized_minilm(tmp_path_factory, model_dir):
    """The folder `lowbit quantize MiniLM OUT --format int4` writes (lowbit.json, lowbit's keys)."""
    out = tmp_path_factory.mktemp("quantized") / "q"
    assert cli.main(["quantize", model_dir, str(out), "--format", "int4"]) == 0
    return out


def test_export_refuses_a_lowbit_quantize_folder_up_front(tmp_path, quantized_minilm):
    # used to be a 162-line traceback from transformers with exit status 1
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "export", str(quantized_minilm), str(tmp_path / "o"),
                        "--to", "hf-bnb"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("lowbit: error: MODEL_DIR") and str(quantized_minilm) in lines[0]
    assert "lowbit quantize" in lines[0] and "full-precision" in lines[0] and "LowbitConfig" in lines[0]
    assert not (tmp_path / "o").exists()


def test_export_model_load_failures_are_one_line(tmp_path, capfd, quantized_minilm):
    import shutil

    # without lowbit.json the folder is still a transformers + LowbitConfig folder (config.json says so): it
    # loads, and an int model is refused by the bitsandbytes writer, in one line
    stripped = tmp_path / "no-manifest"
    shutil.copytree(quantized_minilm, stripped)
    (stripped / "lowbit.json").unlink()
    capfd.readouterr()
    assert cli.main(["export", str(stripped), str(tmp_path / "o"), "--to", "hf-bnb"]) == 2
    _one_line_error(capfd, "is IntLinear; bitsandbytes 4-bit holds only nf4/fp4")
    # a config.json without weights
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(quantized_minilm / "config.json", bare / "config.json")
    assert cli.main(["export", str(bare), str(tmp_path / "o"), "--to", "hf-bnb"]) == 2
    _one_line_error(capfd, "cannot load a model from MODEL_DIR", str(bare))
    # config.json that is not JSON
    (bare / "config.json").write_text("{not json")
    assert cli.main(["export", str(bare), str(tmp_path / "o"), "--to", "hf-bnb"]) == 2
    _one_line_error(capfd, "cannot read", "config.json")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ no command


def test_no_command_lists_the_commands(capsys):
    assert cli.main([]) == 2
    line = _one_line_error(capsys, "choose a command:", "lowbit COMMAND --help")
    for name in ("demo", "quantize", "bench", "export", "tune", "finetune"):
        assert name in line


def test_no_command_from_the_entry_point():
    p = subprocess.run([sys.executable, "-m", "lowbit.cli"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    names = cli.commands(cli.build_parser())
    assert {"demo", "quantize", "bench", "export", "tune", "finetune"} <= set(names)
    assert p.stderr.strip() == f"lowbit: error: choose a command: {', '.join(names)} (lowbit COMMAND --help)"


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


def test_export_refuses_a_bitsandbytes_folder_up_front(tmp_path, capsys, bnb_dirs):
    _, bnb = bnb_dirs
    capsys.readouterr()
    assert cli.main(["export", str(bnb), str(tmp_path / "o"), "--to", "hf-bnb"]) == 2
    _one_line_error(capsys, str(bnb), "already a bitsandbytes folder", "full-precision", "LowbitConfig")
    assert not (tmp_path / "o").exists()


def test_quantize_bnb_folder_keeps_the_bitsandbytes_bytes(tmp_path, capsys, bnb_dirs):
    src, bnb = bnb_dirs
    out = tmp_path / "q"
    assert cli.main(["quantize", str(bnb), str(out), "--format", "nf4"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "error" not in err, err
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["format"] == "nf4" and meta["options"] == {"blocksize": 64, "double_quant": True}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]  # lowbit's, not bitsandbytes'
    assert qc["quant_method"] == "lowbit" and qc["quant_type"] == "nf4"
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


# ------------------------------------------------------------------------------ quantize: causal LMs keep their head


def _tiny_causal_lm(path, tied: bool):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantize_keeps_a_causal_lms_head(tmp_path, tied):
    """`lowbit quantize` loaded every folder with AutoModel: a causal LM lost its head (keys without `model.`,
    no lm_head) and load_quantized(AutoModelForCausalLM ...) failed with hundreds of key errors."""
    from lowbit.io import read_state_dict

    src = _tiny_causal_lm(tmp_path / "src", tied)
    assert cli.main(["quantize", str(src), str(tmp_path / "q"), "--format", "int4"]) == 0
    keys = set(read_state_dict(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.weight" in keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    fresh = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "q"))
    load_quantized(fresh.eval(), tmp_path / "q")
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tied  # tied embeddings stay tied
    expect = lowbit.replace_linear(transformers.LlamaForCausalLM.from_pretrained(src).eval(), "int4")
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, expect(x).logits)
    assert isinstance(fresh.lm_head, nn.Linear) and type(fresh.model.layers[0].mlp.up_proj) is lowbit.IntLinear


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_folder_of_the_old_backbone_layout_loads_or_says_how_to_convert(tmp_path, tied):
    from lowbit.io import WEIGHTS, write_manifest

    src = _tiny_causal_lm(tmp_path / "src", tied)
    backbone = lowbit.replace_linear(transformers.AutoModel.from_pretrained(src).eval(), "nf4")  # the old layout
    (tmp_path / "old").mkdir()
    lowbit.save_state_dict(backbone, tmp_path / "old" / WEIGHTS)
    write_manifest(tmp_path / "old", "nf4", {}, ("lm_head",))
    fresh = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(src)).eval()
    if not tied:
        with pytest.raises(ValueError, match="older `lowbit quantize`.*untied LM head.*again"):
            load_quantized(fresh, tmp_path / "old")
        return
    load_quantized(fresh, tmp_path / "old")
    x = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh.model(x).last_hidden_state, backbone(x).last_hidden_state)
