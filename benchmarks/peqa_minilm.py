"""PEQA on real all-MiniLM-L6-v2 weights: quantize every Linear to int4/int3/int2, then train ONLY
the IntLinear scales (codes, zero points, biases, embeddings and LayerNorms frozen) to distil the
fp32 model's mean-pooled sentence embeddings.

    python benchmarks/peqa_minilm.py [--steps 30] [--lr 2e-3] [--batch 16] [--method rtn]

Training data: random sequences of 8-16 alphabetic whole-word wordpieces drawn from the
tokenizer's own vocabulary (fixed seed, a fresh batch every step). Loss: 1 - cosine between the
quantized and the fp32 model's normalised mean-pooled embeddings. Held-out score: the mean cosine
over lowbit.minilm.SENTENCES (8 real sentences, never trained on), before and after.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch

import lowbit
from lowbit.minilm import SENTENCES, embed, load_minilm
from lowbit import IntLinear

# (label, quant_type, group_size)
SETTINGS = (
    ("int4 rows", "int4", None),
    ("int3 g128", "int3", 128),
    ("int2 g64", "int2", 64),
)


def vocab_words(tok) -> list[str]:
    """Alphabetic whole-word wordpieces of the tokenizer (no '##' pieces, no [SPECIAL] tokens)."""
    return sorted(w for w in tok.vocab if w.isascii() and w.isalpha() and len(w) >= 2)


def make_batch(rng: random.Random, words: list[str], batch: int) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(batch)]


def pooled(model, enc) -> torch.Tensor:
    """lowbit.minilm.embed's mean pooling, with gradients."""
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def heldout_cosine(model, tok, ref: torch.Tensor) -> float:
    return float((embed(model, tok, SENTENCES) * ref).sum(-1).mean())


def quantize(fp_model, quant_type: str, group_size, method: str):
    """A deep copy of fp_model with every nn.Linear (all 37, pooler included) replaced by IntLinear,
    and requires_grad set on the IntLinear scales only."""
    model = lowbit.replace_linear(copy.deepcopy(fp_model), quant_type, skip=(), group_size=group_size, method=method)
    for p in model.parameters():
        p.requires_grad_(False)
    scales = [m.scale for m in model.modules() if isinstance(m, IntLinear)]
    for s in scales:
        s.requires_grad_(True)
    return model, scales


def tune_scales(model, scales, fp_model, tok, words, steps: int, lr: float, batch: int, seed: int = 0,
                log=None) -> list[float]:
    """Adam on the scales only; returns the training losses.

    lr is relative: each scale tensor gets its own Adam step size lr * mean|scale| (the scales of
    int4 rows and int2 g64 differ ~6x in magnitude, so one absolute step size fits neither).
    """
    opt = torch.optim.Adam([{"params": [s], "lr": lr * float(s.detach().abs().mean())} for s in scales], lr=lr)
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        enc = tok(make_batch(rng, words, batch), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            target = pooled(fp_model, enc)
        loss = 1 - (pooled(model, enc) * target).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(f"  step {step + 1}/{steps}: train loss {losses[-1]:.4f}")
    return losses


def run_setting(fp_model, tok, ref, words, quant_type, group_size, method, steps, lr, batch, seed=0, log=None):
    t0 = time.perf_counter()
    model, scales = quantize(fp_model, quant_type, group_size, method)
    layers = [m for m in model.modules() if isinstance(m, IntLinear)]
    n_params = sum(m.in_features * m.out_features for m in layers)
    bpp = sum(m.bits_per_param * m.in_features * m.out_features for m in layers) / n_params
    before = heldout_cosine(model, tok, ref)
    losses = tune_scales(model, scales, fp_model, tok, words, steps, lr, batch, seed, log)
    after = heldout_cosine(model, tok, ref)
    return dict(model=model, n_layers=len(layers), bits_per_param=bpp, before=before, after=after, losses=losses,
                wall_s=time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam step size relative to each layer's mean |scale|")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", default="rtn", choices=("rtn", "mse"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    fp_model, tok = load_minilm()
    for p in fp_model.parameters():
        p.requires_grad_(False)
    ref = embed(fp_model, tok, SENTENCES)
    words = vocab_words(tok)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None

    rows = []
    for label, qt, gs in SETTINGS:
        r = run_setting(fp_model, tok, ref, words, qt, gs, args.method, args.steps, args.lr, args.batch, args.seed, log)
        print(f"{label}: {r['n_layers']} IntLinear, held-out cosine {r['before']:.4f} -> {r['after']:.4f} "
              f"({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        rows.append((label, r))

    print(f"command: python benchmarks/peqa_minilm.py --steps {args.steps} --lr {args.lr:g} --batch {args.batch} "
          f"--method {args.method} --seed {args.seed}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; all 37 nn.Linear quantized "
          f"(method={args.method}); trainable: IntLinear.scale only; batch {args.batch} random vocab sentences/step\n")
    print("| setting | bits/param | held-out cosine before | after | gain | steps | lr | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['bits_per_param']:.3f} | {r['before']:.4f} | {r['after']:.4f} | "
              f"{r['after'] - r['before']:+.4f} | {args.steps} | {args.lr:g} | {r['wall_s']:.1f} s |")


if __name__ == "__main__":
    main()
