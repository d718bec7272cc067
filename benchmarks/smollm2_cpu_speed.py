"""SmolLM2-135M-Instruct on the CPU: prefill (one 512-token forward) and decode (M = 1 steps with a KV cache)
tokens/s, fp32 vs each lowbit format, every model in one process, round-robin, median of the rounds.

    python benchmarks/smollm2_cpu_speed.py [FORMAT ...] [--rounds 5] [--threads 2]

FORMAT: nf4 (+ double quant), int4 / int3 (group 128, ragged on K = 576), sz (abs bound 0.03), nvfp4, mxfp4;
default all.
210 projections quantized, embeddings and lm_head fp32. Ratios are time / fp32 time from the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

FORMATS = {"nf4": {}, "int4": dict(group_size=128), "int3": dict(group_size=128), "sz": dict(error_bound=0.03),
           "nvfp4": {}, "mxfp4": {}}


def main() -> None:
    from transformers import AutoModelForCausalLM

    from lowbit import nn as lnn, smollm2

    p = argparse.ArgumentParser()
    p.add_argument("formats", nargs="*", default=list(FORMATS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base = AutoModelForCausalLM.from_pretrained(smollm2.model_dir(), dtype=torch.float32).eval()
    models = {"fp32": base}
    for name in a.formats:
        models[name] = lnn.replace_linear(copy.deepcopy(base), name, progress=False, **FORMATS[name])
    ids = torch.randint(0, base.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(ids[:, :64])  # warm-up
        for _ in range(a.rounds):
            for k, m in models.items():
                t = time.perf_counter()
                out = m(ids, use_cache=True)
                pre[k].append(time.perf_counter() - t)
                cache, tok = out.past_key_values, ids[:, -1:]
                t = time.perf_counter()
                for _ in range(a.decode_steps):
                    cache = m(tok, past_key_values=cache, use_cache=True).past_key_values
                dec[k].append((time.perf_counter() - t) / a.decode_steps)

    def med(v):
        return sorted(v)[len(v) // 2]

    print(f"| model | prefill tok/s (512) | time vs fp32 | decode tok/s | time vs fp32 |")
    print("|---|---|---|---|---|")
    for k in models:
        print(f"| {k} | {512 / med(pre[k]):.0f} | {med(pre[k]) / med(pre['fp32']):.2f}x | {1 / med(dec[k]):.1f} | "
              f"{med(dec[k]) / med(dec['fp32']):.2f}x |")
    print(f"\n{a.threads} threads, {a.rounds} rounds, torch {torch.__version__}")


if __name__ == "__main__":
    main()
