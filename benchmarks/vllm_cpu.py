"""CPU decode tokens/s of SmolLM2-135M-Instruct in vLLM: fp32 vs lowbit folders, side by side in one run.

    .venv-vllm/bin/python benchmarks/vllm_cpu.py [--formats nf4 int4] [--tokens 128] [--repeats 3] [--json]
                                                 [--dtype float32|bfloat16]

Needs the vLLM environment (`make install-vllm`). Quantizes SmolLM2 with `lowbit quantize` into a temporary
folder (nf4: blocksize 64, double-quantized scales; int4/int3: groups of 128), then for fp32 and each format
starts vllm.LLM(dtype="float32", max_model_len=512, enforce_eager=True; VLLM_CPU_KVCACHE_SPACE=1; vLLM's own
multiprocess engine, as `vllm serve` runs it; all engines at once), then times one greedy request (batch 1)
on each in turn, --repeats rounds: decode tokens/s = (N - 1) / (time of N new tokens - time of 1 new token),
the median of the rounds. Prints a markdown table
(docs/integrations.md quotes it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a short story about a robot who learns to paint."
OPTIONS = {"nf4": ["--format", "nf4"], "int4": ["--format", "int4", "--group-size", "128"],
           "int3": ["--format", "int3", "--group-size", "128"], "fp4": ["--format", "fp4"]}


def _time(llm, sp_cls, prompt, n: int) -> float:
    sp = sp_cls(temperature=0.0, max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)
    dt = time.perf_counter() - t
    assert len(out[0].outputs[0].token_ids) == n
    return dt


def measure(folders: dict, tokens: int, repeats: int, dtype: str = "float32") -> dict:
    """Every folder's engine is started first; then `repeats` rounds time each in turn (interleaved, so that
    a change in the machine's load during the run hits every row alike)."""
    from vllm import LLM, SamplingParams

    llms, results = {}, {}
    for name, folder in folders.items():
        t = time.perf_counter()
        llms[name] = LLM(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0)
        results[name] = {"load_s": time.perf_counter() - t, "all": [], "prefill": []}
        _time(llms[name], SamplingParams, PROMPT, 8)  # warm-up
    for _ in range(repeats):
        for name, llm in llms.items():
            t1 = _time(llm, SamplingParams, PROMPT, 1)
            tn = _time(llm, SamplingParams, PROMPT, tokens)
            results[name]["all"].append((tokens - 1) / (tn - t1))
            results[name]["prefill"].append(t1)
    for name, llm in llms.items():
        r = results[name]
        r["decode_tok_s"] = statistics.median(r["all"])
        r["first_token_s"] = statistics.median(r.pop("prefill"))
        r["text"] = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8),
                                 use_tqdm=False)[0].outputs[0].text
        print(f"{name}: {r['decode_tok_s']:.1f} tok/s ({', '.join(f'{v:.1f}' for v in r['all'])})", file=sys.stderr,
              flush=True)
    llms.clear()
    gc.collect()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["nf4", "int4"], choices=sorted(OPTIONS))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="vLLM's compute dtype (benchmarks/gpu_check.py runs this script with bfloat16 on a GPU)")
    a = ap.parse_args()

    import torch
    import vllm

    from lowbit import smollm2
    from lowbit._version import __version__

    src = smollm2.model_dir()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-vllm-bench-") as tmp:
        folders = {"fp32": src}
        for fmt in a.formats:
            out = os.path.join(tmp, fmt)
            subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", src, out, *OPTIONS[fmt]], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            folders[fmt] = out
        results = measure(folders, a.tokens, a.repeats, a.dtype)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"date": datetime.date.today().isoformat(), "machine": gpu or f"{os.cpu_count()}-core CPU container",
            "dtype": a.dtype,
            "cpu": platform.processor() or platform.machine(), "vllm": vllm.__version__, "torch": torch.__version__,
            "lowbit": __version__, "tokens": a.tokens, "repeats": a.repeats, "results": results}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    base = results["fp32"]["decode_tok_s"]  # the unquantized folder, run in --dtype
    print(f"SmolLM2-135M-Instruct in vLLM {vllm.__version__} ({gpu or 'CPU'}, torch {torch.__version__}), dtype {a.dtype}, "
          f"batch 1, {a.tokens} new tokens, median of {a.repeats}; {info['date']}, {info['machine']}\n")
    print("| weights | decode tokens/s (median) | rounds | vs fp32 | first token (s) | load (s) "
          "| 'The capital of France is' |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rounds = " ".join(f"{v:.1f}" for v in r["all"])
        print(f"| {name} | {r['decode_tok_s']:.1f} | {rounds} | {r['decode_tok_s'] / base:.2f}x | "
              f"{r['first_token_s']:.3f} | "
              f"{r['load_s']:.0f} | {r['text']!r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
