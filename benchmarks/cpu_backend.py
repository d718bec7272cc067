"""lowbit's CPU backend against its pure-torch reference, bitsandbytes and dense matmuls, side by side.

    python benchmarks/cpu_backend.py                  # 4096x4096, M = 1, 64, 512, 1 thread and all
    python benchmarks/cpu_backend.py --m 1 --threads 1 --reps 31

Every configuration is timed in one process, round-robin (one call of each kernel per round), so that
a noisy neighbour slows all of them alike. Reported: the median wall time of `--reps` rounds and the
spread (max - min) / median; a spread over 20% is flagged, as the machine is then too noisy to trust.
x is bf16 (the issue's setting); the weight is 4096x4096 unless --n/--k say otherwise.

bitsandbytes is timed two ways: `bnb.matmul_4bit` (its general CPU path: dequantize, then a bf16
matmul) and its CPU inference path (`Linear4bit` in eval mode repacks the weight for its AVX512-BF16
kernel; bf16 scales, so not bit-compatible with its own format). Both are reported when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import lowbit
from lowbit import _cpu


def _bnb(w: torch.Tensor):
    """{name: fn(x)} for bitsandbytes' CPU 4-bit paths (nf4, double quant, blocksize 64), or {} without it."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes as bnb
            import bitsandbytes.functional as bF

            qw, qs = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception:
        return {}
    fns = {"bnb nf4+dq (matmul_4bit)": lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=qs)}
    try:
        pw, pqs = bF._convert_weight_packed_for_cpu(qw.clone(), copy.deepcopy(qs))
        probe = torch.randn(2, w.shape[1], dtype=torch.bfloat16)
        bnb.matmul_4bit(probe, pw, quant_state=pqs)
        fns["bnb nf4+dq (CPU-packed, eval)"] = lambda x: bnb.matmul_4bit(x, pw, quant_state=pqs)
    except Exception:  # an older bitsandbytes, or a CPU without AVX512-BF16
        pass
    return fns


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get("LOWBIT_CPU_BACKEND")
    os.environ["LOWBIT_CPU_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWBIT_CPU_BACKEND"]
        else:
            os.environ["LOWBIT_CPU_BACKEND"] = old


def _on(backend: str, fn):
    def run(x):
        with _backend(backend):
            return fn(x)

    return run


def _bnb_quant(w: torch.Tensor):
    """{name: fn(w)} for bitsandbytes' CPU quantize and dequantize (nf4, double quant), or {} without it."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes.functional as bF

            qw, qs = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception:
        return {}
    return {"bnb quantize_4bit": lambda v: bF.quantize_4bit(v, blocksize=64, quant_type="nf4",
                                                             compress_statistics=True),
            "bnb dequantize_4bit": lambda v: bF.dequantize_4bit(qw, qs)}


def _round_robin(fns: dict, x: torch.Tensor, reps: int, slow_reps: int) -> dict:
    """{name: [seconds]}: one warmup call each, then `reps` rounds of one call each (slow ones fewer)."""
    times = {name: [] for name in fns}
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(x)
        first[name] = time.perf_counter() - t0
    for r in range(reps):
        for name, fn in fns.items():
            if first[name] > 0.1 and r >= slow_reps:
                continue
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return times


def _row(name, ts, base):
    med = statistics.median(ts)
    spread = (max(ts) - min(ts)) / med
    flag = " (noisy)" if spread > 0.2 else ""
    return f"| {name} | {med * 1e3:.2f} | {spread * 100:.0f}%{flag} | {len(ts)} | {base / med:.2f}x |"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="out_features")
    p.add_argument("--k", type=int, default=4096, help="in_features")
    p.add_argument("--m", default="1,64,512", help="rows of x, comma separated")
    p.add_argument("--threads", default="1,all", help="torch/lowbit thread counts; 'all' = every CPU")
    p.add_argument("--reps", type=int, default=15, help="timed rounds per configuration")
    p.add_argument("--no-reference", action="store_true", help="skip lowbit's pure-torch reference (slow)")
    args = p.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    threads = list(dict.fromkeys(threads))

    with tempfile.TemporaryDirectory() as d:  # time a fresh build (an empty cache)
        old_cache, os.environ["LOWBIT_CACHE_DIR"], t0 = os.environ.get("LOWBIT_CACHE_DIR"), d, time.perf_counter()
        try:
            _cpu.build()
            build_s = f"{time.perf_counter() - t0:.2f} s"
        except Exception as e:
            build_s = f"failed ({e})"
        finally:
            if old_cache is None:
                del os.environ["LOWBIT_CACHE_DIR"]
            else:
                os.environ["LOWBIT_CACHE_DIR"] = old_cache
    if _cpu.library() is None:
        print("lowbit's fast CPU backend could not be built here; nothing to compare", file=sys.stderr)
        return 1

    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.n, args.k, generator=g) * 0.02
    wb = w.bfloat16()
    q4 = lowbit.quantize_4bit(w, 64, "nf4", True)
    qi = {b: lowbit.quantize_int(w, b, gs) for b, gs in ((4, None), (3, 128), (2, 64))}
    fns = {
        "dense bf16 (F.linear)": lambda x: torch.nn.functional.linear(x, wb),
        "dense fp32 (F.linear)": lambda x: torch.nn.functional.linear(x.float(), w),
        **_bnb(wb),
        "lowbit nf4+dq": _on("fast", lambda x: lowbit.matmul_4bit(x, q4)),
        "lowbit int4 rows": _on("fast", lambda x: lowbit.matmul_int(x, qi[4])),
        "lowbit int3 g128": _on("fast", lambda x: lowbit.matmul_int(x, qi[3])),
        "lowbit int2 g64": _on("fast", lambda x: lowbit.matmul_int(x, qi[2])),
    }
    if not args.no_reference:
        fns["lowbit nf4+dq, reference"] = _on("reference", lambda x: lowbit.matmul_4bit(x, q4))
        fns["lowbit int4 rows, reference"] = _on("reference", lambda x: lowbit.matmul_int(x, qi[4]))

    print(f"# lowbit CPU backend, {args.n}x{args.k} weight, bf16 x\n")
    print(f"machine: {_machine()}; torch {torch.__version__}; date {datetime.date.today()}")
    print(f"kernel build (once per machine, then cached): {build_s}; "
          f"AVX-512 kernels: {'yes' if _cpu.library().lb_isa() else 'no (plain C)'}\n")
    q4b = lowbit.quantize_4bit(wb, 64, "nf4", True)
    quant = {
        "lowbit quantize_4bit": _on("fast", lambda v: lowbit.quantize_4bit(v, 64, "nf4", True)),
        "lowbit quantize_4bit, reference": _on("reference", lambda v: lowbit.quantize_4bit(v, 64, "nf4", True)),
        "lowbit dequantize_4bit": _on("fast", lambda v: lowbit.dequantize_4bit(q4b)),
        "lowbit dequantize_4bit, reference": _on("reference", lambda v: lowbit.dequantize_4bit(q4b)),
        **_bnb_quant(wb),
    }
    old_threads = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            times = _round_robin(quant, wb, max(3, args.reps // 3), slow_reps=3)
            print(f"\n## quantize / dequantize, bf16 {args.n}x{args.k}, nf4 + double quant, {t} thread"
                  f"{'s' if t > 1 else ''}\n")
            print("| op | median ms | spread | runs |")
            print("|---|---|---|---|")
            for name, ts in times.items():
                print(_row(name, ts, statistics.median(ts)).rsplit(" |", 2)[0] + " |")
            for m in ms:
                x = torch.randn(m, args.k, generator=g).bfloat16()
                times = _round_robin(fns, x, args.reps, slow_reps=max(3, args.reps // 3))
                base = statistics.median(times["dense bf16 (F.linear)"])
                print(f"\n## M = {m}, {t} thread{'s' if t > 1 else ''}\n")
                print("| kernel | median ms | spread | runs | speed vs dense bf16 |")
                print("|---|---|---|---|---|")
                for name, ts in times.items():
                    print(_row(name, ts, base))
                lb = statistics.median(times["lowbit nf4+dq"])
                for name in times:
                    if name.startswith("bnb"):
                        print(f"\nlowbit nf4+dq vs {name}: {statistics.median(times[name]) / lb:.2f}x faster")
                sys.stdout.flush()
    finally:
        torch.set_num_threads(old_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
