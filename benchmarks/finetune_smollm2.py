"""QLoRA on the real model: lowbit finetune (nf4 + LoRA) vs dense LoRA on SmolLM2-135M-Instruct, trained on the
Lee corpus' calibration articles (0-149), perplexity before/after on the evaluation articles (150-299).

    python benchmarks/finetune_smollm2.py [--steps 60] [--seq-len 128] [--batch 4] [--eval-windows 8]

Each variant runs in its own process (`lowbit._finetune.run`), so its peak RSS is its own. Memory columns:
the process's peak resident set (weights, activations, optimizer, Python, libraries), and the bytes of the
weights + optimizer states held after the run (lowbit's CPU `memory_bytes`). CPU: fp32 compute for both
(bf16 LoRA is the CUDA default); LoRA r = 16, alpha 32, lr 3e-3, gradient checkpointing, OffloadedAdamW.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, torch
from lowbit import _finetune, smollm2
kw = json.loads(sys.argv[1])
torch.set_num_threads(kw.pop("threads"))
res = _finetune.run(smollm2.model_dir(), smollm2.calibration_text(), eval_text=smollm2.evaluation_text(),
                    progress=False, **kw)
res.pop("losses")
print("RESULT " + json.dumps(res))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rows = []
    for label, quantized in (("nf4 + LoRA (lowbit)", True), ("dense fp32 + LoRA", False)):
        kw = dict(steps=a.steps, seq_len=a.seq_len, batch=a.batch, eval_windows=a.eval_windows, quantized=quantized,
                  threads=a.threads)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
        res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        res["wall_s"] = time.perf_counter() - t0
        rows.append((label, res))
        print(f"{label}: ppl {res['ppl_before']:.2f} -> {res['ppl_after']:.2f}, peak RSS "
              f"{res['peak_rss_bytes'] / 2**20:.0f} MiB, weights+optimizer {res['memory_bytes'] / 2**20:.0f} MiB, "
              f"{res['wall_s']:.0f} s", flush=True)
    print()
    print(f"| run | held-out ppl before | after | peak RSS (MiB) | weights + optimizer (MiB) | trainable | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
              f"{r['memory_bytes'] / 2**20:.0f} | {r['trainable']:,} | {r['wall_s']:.0f} |")
    print(f"\n{a.steps} steps x {a.batch} x {a.seq_len} tokens of articles 0-149; perplexity on the first "
          f"{a.eval_windows} windows of {a.seq_len} tokens of articles 150-299; {a.threads} threads")


if __name__ == "__main__":
    main()
