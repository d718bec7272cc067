"""The block-FP C backend (lowbit/_blockfp_cpu.py, csrc/blockfp.c) against its neighbours on the CPU, side by side in
one process: SmolLM2-135M's linear layer shapes (576x576 attention, 1536x576 up/gate, 576x1536 down) at M = 1 (the
fused GEMV) and M = 64 (dequantize + BLAS), fp32 activations.

Candidates (each a call at the launcher level, the level lowbit's ops dispatch to; every one is checked against
the fp32 dense result of its own weight before timing):
  nvfp4, mxfp4   lowbit._blockfp_cpu.matmul (this backend)
  nf4            lowbit._cpu.matmul_4bit (blocksize 64, double-quantized scales: lowbit.Linear4bit's default)
  torch nvfp4    the pure-torch path the family had before: formats.blockfp.dequantize_blockfp + F.linear
  fp32           F.linear on the fp32 weight

Timing: round-robin (one timed batch of each candidate per round, so drift hits all alike), the median of the
rounds, `--threads` torch threads (2 by default). The C kernels use one thread below lowbit._cpu.PARALLEL_MIN weight
elements (1M: all these shapes), as in production; `--parallel-min 0` threads them too.

    python benchmarks/bench_blockfp_cpu.py [--rounds 31] [--threads 2] [--parallel-min N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit import _blockfp_cpu, _cpu
from lowbit.formats import blockfp as bfp

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in) = (N, K)
MS = [1, 64]


def candidates(n: int, k: int, m: int):
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k)
    out = {}
    for qt in ("nvfp4", "mxfp4"):
        q = bfp.quantize_blockfp(w, qt)
        t = bfp.scale_table(q)
        out[qt] = (lambda q=q, t=t: _blockfp_cpu.matmul(x, q.packed, q.scales, t, q.block, n, None),
                   bfp.dequantize_blockfp(q))
    q4 = lowbit.quantize_4bit(w, 64, "nf4", True)
    absmax, nabs, ncode, off = q4.scale_tensors()
    out["nf4"] = (lambda: _cpu.matmul_4bit(x, q4.codes, absmax, q4.code, 64, n, nabs, ncode, off,
                                           q4.nested_blocksize, None), lowbit.dequantize_4bit(q4, torch.float32))
    qn = bfp.quantize_blockfp(w, "nvfp4")
    out["torch nvfp4"] = (lambda: F.linear(x, bfp.dequantize_blockfp(qn)), bfp.dequantize_blockfp(qn))
    out["fp32"] = (lambda: F.linear(x, w), w)
    for name, (fn, wd) in out.items():  # a broken candidate fails here instead of timing garbage
        y, ref = fn(), x @ wd.t()
        err = float((y - ref).norm() / ref.norm())
        assert err < 1e-5, (name, n, k, m, err)
    return {name: fn for name, (fn, _) in out.items()}


def batch_size(fn, target_s: float = 2e-3) -> int:
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return max(1, min(200, int(target_s / max(dt, 1e-7))))


def bench(fns: dict, rounds: int) -> dict:
    for fn in fns.values():  # warm up (caches, threads, the library)
        for _ in range(3):
            fn()
    reps = {name: batch_size(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            r = reps[name]
            t = time.perf_counter()
            for _ in range(r):
                fn()
            times[name].append((time.perf_counter() - t) / r)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel-min", type=int, default=None, help="override lowbit._cpu.PARALLEL_MIN")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.parallel_min is not None:
        _cpu.PARALLEL_MIN = a.parallel_min
    lib = _cpu.library()
    assert lib is not None, "the C kernels did not build"
    print(f"torch {torch.__version__}, {a.threads} threads, AVX-512 kernels: {bool(lib.lb_isa())}, "
          f"PARALLEL_MIN {_cpu.PARALLEL_MIN}, median of {a.rounds} round-robin rounds; times in microseconds")
    names = ["nvfp4", "mxfp4", "nf4", "torch nvfp4", "fp32"]
    head = f"{'N x K':>10} {'M':>3} " + " ".join(f"{n:>11}" for n in names)
    head += f" {'nvfp4/nf4':>9} {'mxfp4/nf4':>9} {'torch/nvfp4':>11} {'fp32/nvfp4':>10}"
    print(head)
    for n, k in SHAPES:
        for m in MS:
            t = bench(candidates(n, k, m), a.rounds)
            row = f"{f'{n}x{k}':>10} {m:>3} " + " ".join(f"{t[x] * 1e6:>11.1f}" for x in names)
            row += (f" {t['nvfp4'] / t['nf4']:>9.2f} {t['mxfp4'] / t['nf4']:>9.2f}"
                    f" {t['torch nvfp4'] / t['nvfp4']:>11.1f} {t['fp32'] / t['nvfp4']:>10.2f}")
            print(row, flush=True)


if __name__ == "__main__":
    main()
