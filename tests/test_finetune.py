"""The QLoRA fine-tune example (lowbit._finetune) on a tiny Llama built from a config and the
text that ships with lowbit: nf4 + LoRA + gradient checkpointing + OffloadedAdamW lowers the loss."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbit import _finetune
from lowbit._tools import UsageError

TRAINING_MD = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_finetune_lowers_the_loss_and_saves_the_adapter(tiny_llama, tmp_path):
    text = _finetune.SAMPLE_TEXT.read_text(encoding="utf-8")
    res = _finetune.run(tiny_llama, text, steps=30, seq_len=64, batch=4, r=8, out=str(tmp_path / "adapter"),
                        progress=False)
    print(f"\neval loss {res['eval_loss_before']:.3f} -> {res['eval_loss_after']:.3f}, "
          f"{res['memory_kind']} {res['memory_bytes']:,} B")
    assert res["eval_loss_after"] < res["eval_loss_before"] - 0.2  # measured: 5.586 -> 5.194
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert len(lora) == 2 * 7 * 2 and all(k.endswith(("lora_A", "lora_B")) for k in lora)
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["r"] == 8

    # docs/training.md's loading snippet, run as written on a folder named as in the snippet
    os.rename(tmp_path / "adapter", tmp_path / "lowbit-finetune")
    snippet = _loading_snippet()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ns: dict = {}
        exec(compile(snippet, str(TRAINING_MD), "exec"), ns)
    finally:
        os.chdir(cwd)
    model = ns["model"]
    assert ns["logits"].shape == (1, len(b"The quick brown fox"), 256)
    # the loaded model is the trained one: the same held-out loss as run() measured after training
    ids = _finetune.tokens(tiny_llama, text, 256)
    held_out = _finetune._windows(ids, 8, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(model(input_ids=held_out, labels=held_out).loss)
    assert loss == pytest.approx(res["eval_loss_after"], rel=1e-5, abs=1e-5)
    assert abs(loss - res["eval_loss_before"]) > 0.2  # and not the untrained base + zero LoRA


def _loading_snippet() -> str:
    """The python block under "### Loading the adapter" in docs/training.md."""
    doc = TRAINING_MD.read_text(encoding="utf-8")
    section = doc[doc.index("### Loading the adapter"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_load_adapter_refuses_an_adapter_that_does_not_fit(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    text = _finetune.SAMPLE_TEXT.read_text(encoding="utf-8")
    out = tmp_path / "a"
    _finetune.run(tiny_llama, text, steps=1, seq_len=16, batch=1, r=2, out=str(out), progress=False)
    lora = load_file(out / "adapter.safetensors")
    lora.pop(next(iter(lora)))  # a tensor missing: must not load silently at its initial value
    save_file(lora, out / "adapter.safetensors")
    with pytest.raises(ValueError, match="keys differ"):
        _finetune.load_adapter(str(out))


def test_dense_lora_baseline_holds_more_memory(tiny_llama):
    text = _finetune.SAMPLE_TEXT.read_text(encoding="utf-8")
    kw = dict(steps=2, seq_len=32, batch=2, r=8, progress=False)
    q = _finetune.run(tiny_llama, text, **kw)
    d = _finetune.run(tiny_llama, text, quantized=False, **kw)
    assert q["trainable"] == d["trainable"]
    assert q["memory_bytes"] < d["memory_bytes"]


def test_too_short_a_text_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="needs more than seq_len"):
        _finetune.run(tiny_llama, "too short", steps=1, seq_len=64, progress=False)


ARGS = dict(text=None, steps=1, seq_len=16, batch=1, r=2, out=None, force=False, compare=False)


def test_command_body_reports_bad_paths_as_usage_errors(tiny_llama, tmp_path):
    args = ARGS
    with pytest.raises(UsageError, match="not a model folder"):
        _finetune._finetune(SimpleNamespace(model_dir=str(tmp_path), **args))
    with pytest.raises(UsageError, match="no text file"):
        _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **{**args, "text": str(tmp_path / "none.txt")}))


def test_command_saves_to_a_default_folder_without_out(tiny_llama, tmp_path, monkeypatch, capsys):
    # without --out the adapter used to be trained and then dropped; now it lands in ./lowbit-finetune
    monkeypatch.chdir(tmp_path)
    assert _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **ARGS)) == 0
    out = capsys.readouterr().out
    assert os.path.join("lowbit-finetune", "adapter.safetensors") in out and "load_adapter" in out
    assert sorted(os.listdir(tmp_path / "lowbit-finetune")) == ["adapter.json", "adapter.safetensors"]
    cfg = json.loads((tmp_path / "lowbit-finetune" / "adapter.json").read_text())
    assert cfg["model_dir"] == os.path.abspath(tiny_llama)


def test_command_refuses_a_non_empty_out_before_training(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "lowbit-finetune"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"an earlier adapter")
    monkeypatch.chdir(tmp_path)

    def no_training(*a, **k):
        raise AssertionError("trained although the adapter could not be saved")

    monkeypatch.setattr(_finetune, "run", no_training)
    with pytest.raises(UsageError, match=r"--out 'lowbit-finetune' exists and is not empty; pass --force"):
        _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **ARGS))
    with pytest.raises(UsageError, match=r"--out .* exists and is not empty"):
        _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **{**ARGS, "out": str(out)}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **{**ARGS, "out": str(tmp_path / "file"),
                                                                      "force": True}))
    assert (out / "adapter.safetensors").read_bytes() == b"an earlier adapter"


def test_command_force_writes_into_a_non_empty_out(tiny_llama, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **{**ARGS, "out": str(out), "force": True})) == 0
    assert sorted(os.listdir(out)) == ["adapter.json", "adapter.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep"


def test_command_refuses_an_encoder_before_loading(tmp_path, monkeypatch):
    minilm = pytest.importorskip("lowbit.minilm")
    try:
        bert = minilm.model_dir()
    except ImportError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(_finetune, "run", lambda *a, **k: pytest.fail("loaded an encoder for causal-LM training"))
    with pytest.raises(UsageError, match=r"is not a causal LM .*BertModel"):
        _finetune._finetune(SimpleNamespace(model_dir=bert, **{**ARGS, "out": str(tmp_path / "o")}))
    assert not (tmp_path / "o").exists()  # refused before the adapter folder was made


@pytest.mark.parametrize("config,causal", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, True),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, True),  # a causal LM without the suffix
    ({"model_type": "llama"}, True),  # no architectures: the model type decides
    ({"architectures": ["BertModel"], "model_type": "bert"}, False),  # bert has BertLMHeadModel: architectures win
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, False),
    ({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}, False),
    ({"model_type": "no-such-model"}, False),
])
def test_causal_lm_check(config, causal):
    pytest.importorskip("transformers")
    assert (_finetune.causal_lm_problem(config) is None) == causal


def test_cli_finetune_errors_are_one_line(tmp_path, capsys):
    """Through cli.main: exit status 2 and one line, before any model is loaded."""
    from lowbit import cli

    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert cli.main(["finetune", str(d), "--out", str(tmp_path / "o")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: MODEL_DIR") and "causal LM" in lines[0], lines


def test_eval_text_is_scored_on_its_own_first_windows(tiny_llama):
    # --eval-text: the perplexity before training must be the nf4 base model's on the first 3 windows of the
    # evaluation text, computed here independently (catches windows drawn from the training text, a wrong
    # window count, ppl not exp(mean loss)); after 12 steps on the other half it must fall.
    import copy

    import transformers

    import lowbit

    text = _finetune.SAMPLE_TEXT.read_text(encoding="utf-8")
    train, held = text[: len(text) // 2], text[len(text) // 2:]
    res = _finetune.run(tiny_llama, train, steps=12, seq_len=32, batch=4, r=8, progress=False, eval_text=held,
                        eval_windows=3)
    ids = torch.tensor(list(held.encode("utf-8")), dtype=torch.long)[: 3 * 32].view(3, 32) % 256
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    q = lowbit.replace_linear(copy.deepcopy(base), "nf4", progress=False).eval()
    with torch.no_grad():
        loss = float(q(input_ids=ids, labels=ids).loss)
    assert res["eval_windows"] == 3
    assert res["eval_loss_before"] == pytest.approx(loss, rel=1e-5)
    assert res["ppl_before"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert res["ppl_after"] < res["ppl_before"]
    assert res["peak_rss_bytes"] is None or res["peak_rss_bytes"] > 10 * 2**20
