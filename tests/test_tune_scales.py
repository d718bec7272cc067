"""`lowbit tune-scales` (PEQA as a command, lowbit._tune_scales) on a tiny random Llama quantized by
`lowbit quantize --format int3`: only the int scales move, the held-out KL to the unquantized model falls, the
tuned folder loads like any quantized folder, and the input folder is never written."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from lowbit import cli
from lowbit.io import read_state_dict

SAMPLE = Path(__file__).resolve().parents[1] / "python" / "lowbit" / "_finetune_sample.txt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(fp folder, int3 g64 folder): a 2-layer Llama (K = 64 and 128), no tokenizer (UTF-8 bytes)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.2)  # peaked next-token distributions: KL well above 0
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tune-scales")
    fp = root / "fp"
    transformers.LlamaForCausalLM(cfg).save_pretrained(fp)
    q = root / "int3"
    assert cli.main(["quantize", str(fp), str(q), "--format", "int3", "--group-size", "64"]) == 0
    return fp, q


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _heldout_kl(student_dir: Path, fp_dir: Path, ids: torch.Tensor) -> float:
    """The test's own oracle: KL(teacher || student) over next-token distributions, float64, from models
    loaded independently of lowbit._tune_scales (transformers + lowbit.load_quantized)."""
    import transformers

    import lowbit

    teacher = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    config = transformers.AutoConfig.from_pretrained(student_dir)
    student = lowbit.load_quantized(transformers.AutoModelForCausalLM.from_config(config), student_dir).eval()
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
        s = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_tune_scales_moves_only_the_scales_and_lowers_the_heldout_kl(folders, tmp_path):
    # Catches: codes / zero points / embeddings trained or re-quantized (they must be bit-identical), scales not
    # saved (the tuned folder would equal the input), a wrong objective (held-out KL would not fall), a folder
    # that load_quantized cannot read, the input folder written.
    fp, q = folders
    text = SAMPLE.read_text(encoding="utf-8")
    train_file, eval_file = tmp_path / "train.txt", tmp_path / "eval.txt"
    half = len(text) // 2
    train_file.write_text(text[:half], encoding="utf-8")
    eval_file.write_text(text[half:], encoding="utf-8")
    before_digest = _digest(q)
    out = tmp_path / "tuned"
    torch.manual_seed(0)
    assert cli.main(["tune-scales", str(q), "--text", str(train_file), "--eval-text", str(eval_file), "--out",
                     str(out), "--steps", "15", "--lr", "1e-2", "--ctx", "32", "--batch", "4",
                     "--eval-every", "0"]) == 0
    assert _digest(q) == before_digest, "tune-scales wrote into its input folder"
    a, b = read_state_dict(q / "model.safetensors"), read_state_dict(out / "model.safetensors")
    assert set(a) == set(b)
    scale_keys = [k for k in a if k.endswith(".scale")]
    assert len(scale_keys) == 14  # 2 layers x 7 projections, lm_head dense
    for k in a:
        if k.endswith(".scale"):
            continue
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed: only scales may be trained"
    moved = [k for k in scale_keys if not torch.equal(a[k], b[k])]
    assert len(moved) == len(scale_keys), f"scales not trained/saved: {sorted(set(scale_keys) - set(moved))}"
    ids = torch.tensor(list(text[half:].encode("utf-8")[:4 * 64]), dtype=torch.long).view(4, 64) % 256
    kl_before, kl_after = _heldout_kl(q, fp, ids), _heldout_kl(out, fp, ids)
    assert math.isfinite(kl_after) and kl_after < 0.9 * kl_before, (kl_before, kl_after)
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["format"] == "int3" and manifest["tuned_scales"]["steps"] == 15
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"


def _one_error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s" not in ln]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), lines
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, capsys):
    fp, q = folders
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    base = ["--text", str(text), "--steps", "1", "--ctx", "32"]
    # the input folder as --out: refused before anything is loaded
    assert cli.main(["tune-scales", str(q), "--out", str(q), *base]) == 2
    assert "never overwrites its input" in _one_error_line(capsys)
    # a non-int folder: nothing to tune
    nf4 = tmp_path / "nf4"
    assert cli.main(["quantize", str(fp), str(nf4), "--format", "nf4"]) == 0
    capsys.readouterr()
    assert cli.main(["tune-scales", str(nf4), "--out", str(tmp_path / "o1"), *base]) == 2
    assert "int family" in _one_error_line(capsys) and not (tmp_path / "o1").exists()
    # an fp folder (no lowbit.json)
    assert cli.main(["tune-scales", str(fp), "--out", str(tmp_path / "o2"), *base]) == 2
    assert "lowbit.json" in _one_error_line(capsys)
    # a teacher that does not exist
    assert cli.main(["tune-scales", str(q), "--out", str(tmp_path / "o3"), "--teacher", str(tmp_path / "nope"),
                     *base]) == 2
    assert "teacher" in _one_error_line(capsys)
    # a missing text file
    assert cli.main(["tune-scales", str(q), "--out", str(tmp_path / "o4"), "--text", str(tmp_path / "none.txt")]) == 2
    assert "no text file" in _one_error_line(capsys)
    # a non-empty --out without --force
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert cli.main(["tune-scales", str(q), "--out", str(busy), *base]) == 2
    assert "--force" in _one_error_line(capsys) and (busy / "keep.txt").read_text() == "mine"
    # a text shorter than two windows (one to train, one held out)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    assert cli.main(["tune-scales", str(q), "--out", str(tmp_path / "o5"), "--text", str(short), "--ctx", "32"]) == 2
    assert "windows" in _one_error_line(capsys) and not (tmp_path / "o5").exists()
