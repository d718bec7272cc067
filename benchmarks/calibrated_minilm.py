"""Does the activation-aware `optimal` fit (and importance-scaled SZ) carry over to all-MiniLM-L6-v2?

    python benchmarks/calibrated_minilm.py [--windows 16] [--ctx 128]

Calibration: the Lee corpus' articles 0-149 (lowbit.smollm2.calibration_text), tokenized by MiniLM's tokenizer,
`windows` x `ctx` tokens, one forward (lowbit.calibration). Score: mean cosine between the quantized and the fp32
model's sentence embeddings over 8 held-out sentences (lowbit.minilm.SENTENCES) and over 64 held-out Lee
sentences (articles 150-299), as docs/demo-report.md's MiniLM table. All 36 encoder Linears + pooler quantized.
"""

from __future__ import annotations

import argparse
import copy
import re

import torch

import lowbit
from lowbit import calibration, smollm2
from lowbit.minilm import SENTENCES, embed, load_minilm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_minilm()
    model.eval()
    ids = torch.tensor(tok(smollm2.calibration_text(), add_special_tokens=False)["input_ids"])
    h = calibration.input_second_moments(model, calibration.calibration_windows(ids, a.ctx, a.windows), skip=())
    held = [s for art in smollm2.lee_articles()[150:] for s in re.split(r"(?<=[.!?])\s+", art) if len(s) > 40][:64]
    with torch.no_grad():
        ref8, ref64 = embed(model, tok, SENTENCES), embed(model, tok, held)
    rows = [("nf4 + dq", "nf4", {}, None), ("optimal + dq", "optimal", {}, None),
            ("optimal + dq, calibrated", "optimal", {}, h),
            ("sz abs 0.01", "sz", {"error_bound": 0.01}, None),
            ("sz abs 0.01, importance-scaled", "sz", {"error_bound": 0.01}, h)]
    print("| format | bits/param | cosine, 8 sentences | cosine, 64 Lee sentences |")
    print("|---|---|---|---|")
    for label, fmt, opts, cal in rows:
        kw = dict(opts)
        if cal is not None:
            kw["calibration"] = cal
        q = lowbit.replace_linear(copy.deepcopy(model), fmt, skip=(), progress=False, **kw)
        layers = [m for m in q.modules() if hasattr(m, "bits_per_param") and hasattr(m, "in_features")]
        bits = sum(m.bits_per_param * m.in_features * m.out_features for m in layers) / sum(
            m.in_features * m.out_features for m in layers)
        with torch.no_grad():
            c8 = float((embed(q, tok, SENTENCES) * ref8).sum(-1).mean())
            c64 = float((embed(q, tok, held) * ref64).sum(-1).mean())
        print(f"| {label} | {bits:.3f} | {c8:.4f} | {c64:.4f} |", flush=True)


if __name__ == "__main__":
    main()
