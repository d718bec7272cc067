"""The QLoRA fine-tune example (lowbit._finetune) on a tiny Llama built from a config and the
text that ships with lowbit: nf4 + LoRA + gradient checkpointing + OffloadedAdamW lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import _finetune


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


def test_command_body_reports_bad_paths_as_usage_errors(tiny_llama, tmp_path):
    from types import SimpleNamespace

    from lowbit._tools import UsageError

    args = dict(text=None, steps=1, seq_len=16, batch=1, r=2, out=None, compare=False)
    with pytest.raises(UsageError, match="not a model folder"):
        _finetune._finetune(SimpleNamespace(model_dir=str(tmp_path), **args))
    with pytest.raises(UsageError, match="no text file"):
        _finetune._finetune(SimpleNamespace(model_dir=tiny_llama, **{**args, "text": str(tmp_path / "none.txt")}))
