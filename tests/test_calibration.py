"""Calibration statistics (lowbit.calibration) and the --calibration flags of `lowbit quantize` / `lowbit eval`,
on the tiny random Llama folder of test_eval.py (offline). Bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from lowbit import cli
from lowbit.calibration import calibration_windows, input_second_moments

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.test_eval import build_tiny, one_line_error, synthetic_text  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    model = build_tiny(root / "model")
    cal = root / "cal.txt"
    cal.write_text(synthetic_text(1500, seed=7), encoding="utf-8")
    return model, str(cal), root


def _main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ the statistics


def test_second_moments_equal_a_direct_computation(tiny):
    # Catches: moments of the outputs instead of the inputs, sums not divided by the token count, batches
    # dropped, lm_head reported although skipped.
    model = _load(tiny[0])
    ids = torch.randint(0, model.config.vocab_size, (5, 16))
    h = input_second_moments(model, ids, batch=2)
    assert "lm_head" not in h and len(h) == 2 * 7
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))  # q_proj's input, by hand
    ref = (x.double() ** 2).reshape(-1, x.shape[-1]).mean(0)
    torch.testing.assert_close(h["model.layers.0.self_attn.q_proj"], ref, rtol=1e-5, atol=1e-9)
    assert torch.equal(h["model.layers.0.self_attn.k_proj"], h["model.layers.0.self_attn.q_proj"])
    assert h["model.layers.1.mlp.down_proj"].shape == (model.config.intermediate_size,)


def test_statistics_bad_input(tiny):
    model = _load(tiny[0])
    with pytest.raises(ValueError, match="has 10 tokens; 2 windows of 8 need 16"):
        calibration_windows(torch.arange(10), 8, 2)
    with pytest.raises(ValueError, match="another model's tokenizer"):  # ids past the vocabulary
        input_second_moments(model, torch.full((1, 8), model.config.vocab_size))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="layer 'model.layers.1.mlp.gate_proj' are not finite"):
        input_second_moments(model, torch.randint(0, 100, (1, 8)))


# ------------------------------------------------------------------------------------------ lowbit quantize


def test_quantize_with_calibration(tiny):
    # Catches: the flag parsed but the statistics not passed on (the bytes would equal the plain fit's).
    model, cal, root = tiny
    fitted = root / "fitted"
    rc, out, err = _main("quantize", model, str(fitted), "--format", "optimal", "--calibration", cal,
                         "--calibration-windows", "2", "--calibration-ctx", "32")
    assert rc == 0, err
    assert "calibration: 2 x 32 tokens" in err
    manifest = json.load(open(fitted / "lowbit.json"))
    assert manifest["calibration"]["windows"] == 2 and manifest["calibration"]["ctx"] == 32
    assert manifest["calibration"]["text"] == os.path.abspath(cal)
    from safetensors.torch import load_file

    import lowbit

    src = _load(model)
    plain = lowbit.Linear4bit.from_linear(src.model.layers[0].mlp.down_proj, quant_type="optimal")
    key = "model.layers.0.mlp.down_proj.weight_code"
    stored = load_file(fitted / "model.safetensors")[key]
    assert not torch.equal(plain.weight_code, stored)
    # the folder loads like any optimal folder, and its layers compute with the stored (fitted) table
    m = lowbit.load_quantized(src, str(fitted))
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight_code, stored)


def test_quantize_calibration_bad_input(tiny, tmp_path):
    model, cal, _ = tiny
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("the model weights", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases = [
        (["--format", "optimal", "--calibration", str(tmp_path / "missing.txt")], "is not a file"),
        (["--format", "optimal", "--calibration", str(binary)], "is not UTF-8 text"),
        (["--format", "optimal", "--calibration", str(short), "--calibration-ctx", "32"], "the calibration text has"),
        (["--format", "nf4", "--calibration", cal], "--format nf4 does not take calibration"),
        (["--format", "int4", "--calibration", cal], "--format int4 does not take calibration"),
        (["--format", "optimal", "--calibration-windows", "2"], "apply to --calibration TEXTFILE"),
        (["--format", "optimal", "--calibration", cal, "--calibration-ctx", "4096"],
         "--calibration-ctx 4096 exceeds the model's context of 128"),
    ]
    for args, msg in cases:
        one_line_error(*_main("quantize", model, str(out), *args), msg)
        assert not out.exists(), args
    # NaN activations: a model whose norm weight is NaN
    bad = tmp_path / "nan_model"
    m = _load(model)
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight[0] = float("nan")
    with contextlib.redirect_stderr(io.StringIO()):
        m.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(model, f)):
            open(bad / f, "wb").write(open(os.path.join(model, f), "rb").read())
    one_line_error(*_main("quantize", str(bad), str(out), "--format", "optimal", "--calibration", cal,
                          "--calibration-windows", "1", "--calibration-ctx", "16"), "are not finite")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ lowbit eval


def test_eval_adds_a_calibrated_row(tiny):
    model, cal, _ = tiny
    rc, out, err = _main("eval", model, "--format", "optimal", "--text", cal, "--ctx", "32", "--windows",
                         "2", "--calibration", cal, "--calibration-windows", "2", "--calibration-ctx", "32",
                         "--no-bnb", "--json")
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert [r["label"] for r in rows] == ["fp32", "optimal b64 dq", "optimal b64 dq cal"]
    info = rows[-1]["options"]["calibration"]
    assert (info["windows"], info["ctx"]) == (2, 32)
    assert rows[-1]["window_nll"] != rows[-2]["window_nll"]  # a different model, not the plain row again
    one_line_error(*_main("eval", model, "--format", "nf4", "--calibration", cal), "does not take calibration")
