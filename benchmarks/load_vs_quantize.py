"""SmolLM2-135M: `lowbit quantize` time vs load_quantized time and peak RSS, per format (one process each).

    python benchmarks/load_vs_quantize.py     # prints a markdown table (docs/eval.md)
"""
import json, os, subprocess, sys, time, resource
from lowbit import smollm2
src = smollm2.model_dir()
FORMATS = [("nf4", []), ("fp4", []), ("optimal", []), ("int4", ["--group-size", "128"]), ("int3", ["--group-size", "128"]),
           ("int2", ["--group-size", "64"]), ("sz", ["--error-bound", "0.03"])]
LOAD = r'''
import resource, sys, time, torch, transformers, lowbit
torch.set_num_threads(2)
cfg = transformers.AutoConfig.from_pretrained(sys.argv[1])
m = transformers.AutoModelForCausalLM.from_config(cfg)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); lowbit.load_quantized(m, sys.argv[1]); dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base / 1024)
'''
print("| format | quantize (lowbit quantize, s) | load_quantized (s) | load / quantize | peak RSS of the loading process (MB) |")
print("|---|---|---|---|---|")
for fmt, extra in FORMATS:
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lowbit-load-vs-quantize", fmt)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", src, out, "--format", fmt, "--force", *extra],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    q = time.perf_counter() - t
    r = subprocess.run([sys.executable, "-c", LOAD, out], check=True, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    dt, peak, base = (float(v) for v in r.stdout.split()[-3:])
    print(f"| {fmt} {' '.join(extra)} | {q:.1f} | {dt:.2f} | {dt / q:.3f} | {peak:.0f} (model built: {base:.0f}) |", flush=True)
