"""lowbit SZ vs SZ3 (PyPI pysz) on the 37 nn.Linear weights of all-MiniLM-L6-v2 (fp32), plus a
predictor study (none / per-row mean / 1-D and 2-D Lorenzo) on the same weights.

    pip install --target /tmp/pysz_t pysz==1.1.0   # SZ3's Python binding (optional: without it only lowbit)
    PYTHONPATH=/tmp/pysz_t python benchmarks/sz_vs_sz3.py [--steps 10] [--no-predictors] [--threads 1,2]
        [--plot docs/sz_vs_sz3_rate_distortion.png]

Then timings of lowbit alone, warm (each the least of 3 runs): compress and decompress of the 37
weights at their bisected bounds, and of a 4096 x 4096 N(0, 0.02) fp32 tensor at eb = 2.5e-3.

Then, side by side with SZ3 in the same process (`side_by_side`): at NF4's per-matrix RMSE (each
compressor bisected to it) and at 3.0 bits/param (each bisected per matrix to the smallest bound
whose stream is <= 3.0 bits/param): bits/param, RMSE, max error, and warm compress / decompress
time of the 37 weights and of the 4096 x 4096 tensor (least of 7 rounds in which the compressors
take turns) with 1 and 2 torch threads
(`--threads`). SZ3 through pysz 1.1.0 runs on one thread either way (its `openmp` switch changes
nothing in that wheel). With `--plot`, a rate-distortion figure (bits/param vs RMSE over bounds
0.5x..4x lowbit's NF4-RMSE bound, matplotlib) is written there.

Per matrix: the RMSE of NF4 (blocksize 64, double quant, 4.127 bits/param) is the target. lowbit's
abs bound is bisected (log scale) to the largest bound whose RMSE is <= that target; lowbit and
every SZ3 predictor then run at exactly that bound. SZ3 is also bisected on its own to the NF4
RMSE (its RMSE at a given bound differs slightly). Sizes are whole streams (headers included):
lowbit `SZTensor.nbytes`, SZ3 the length of `sz.compress`'s output. Times are CPU wall time,
summed over the 37 matrices, one run each. Output: markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

import lowbit
from lowbit import sz_compress, sz_decompress
from lowbit.formats import _entropy
from lowbit.formats import sz as lsz
from lowbit.minilm import load_minilm

try:
    import pysz
    from pysz import sz as sz3, szAlgorithm, szConfig, szErrorBoundMode
except ImportError:  # pragma: no cover - optional anchor
    pysz = None

PYSZ_HOWTO = ("pysz (SZ3's Python binding) is not installed, so only lowbit is measured. To compare with SZ3: "
              "pip install --target /tmp/pysz_t pysz==1.1.0, then run with PYTHONPATH=/tmp/pysz_t")

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
SZ3_ALGOS = (("interp+lorenzo (default)", "INTERP_LORENZO"), ("interp", "INTERP"),
             ("lorenzo+regression", "LORENZO_REG"), ("none", "NOPRED"))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))))


def maxerr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def cast_ratio(out: np.ndarray, w: np.ndarray, eb: float, dtype: torch.dtype) -> float:
    """max |d(out) - w| / max(eb, |d(w) - w|) for output dtype d (float64 arithmetic)."""
    w64 = torch.from_numpy(w).double()
    err = (torch.from_numpy(out).to(dtype).double() - w64).abs()
    floor = (torch.from_numpy(w).to(dtype).double() - w64).abs().clamp(min=eb)
    return float((err / floor).max())


# --------------------------------------------------------------------------- compressors


def lowbit_run(w: np.ndarray, eb: float):
    t0 = time.perf_counter()
    c = sz_compress(torch.from_numpy(w), eb)
    t1 = time.perf_counter()
    out = sz_decompress(c).numpy()
    t2 = time.perf_counter()
    return c.nbytes, out, t1 - t0, t2 - t1, c


def sz3_run(w: np.ndarray, eb: float, algo: str):
    conf = szConfig()
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.absErrorBound = eb
    conf.cmprAlgo = getattr(szAlgorithm, algo)
    t0 = time.perf_counter()
    blob, _ = sz3.compress(w, conf)
    t1 = time.perf_counter()
    out, _ = sz3.decompress(blob, np.float32, w.shape)
    t2 = time.perf_counter()
    return int(blob.size), out, t1 - t0, t2 - t1, None


def bisect_to_rmse(run, w: np.ndarray, target: float, steps: int):
    """Largest abs bound (log bisection) whose RMSE is <= target; returns (bound, run result).

    The bracket starts at [1.5, 2.0] x target (eb / RMSE is ~sqrt(3) for uniform quantization) and
    is widened and the bisection redone only when it turns out not to bracket the answer."""
    lo, hi = 1.5 * target, 2.0 * target
    while True:
        a, b, best, hi_failed = lo, hi, None, False
        for _ in range(steps):
            mid = math.sqrt(a * b)
            r = run(w, mid)
            if rmse(r[1], w) <= target:
                a, best = mid, r
            else:
                b, hi_failed = mid, True
        if best is None:  # even the lowest mid failed: move the bracket down
            lo, hi = lo / 1.5, lo
        elif not hi_failed:  # every mid passed: move it up
            lo, hi = hi, hi * 1.5
        else:
            return a, best


# --------------------------------------------------------------------------- predictor study


def _huffman_bits(codes: np.ndarray, radius: int = lsz.MAX_RADIUS) -> float:
    """Bits of a 12-bit-limited Huffman code of `codes` (|code| <= radius; the rest are charged
    as outliers at 8 bytes each, a pessimistic lowbit-like cost) plus a 4-bit length per symbol."""
    inside = np.abs(codes) <= radius
    sym = (codes[inside] + radius).astype(np.int64)
    hist = np.bincount(sym, minlength=2 * radius + 1)
    lengths = _entropy.huffman_lengths(hist, lsz.MAX_LEN).astype(np.int64)
    used = np.flatnonzero(hist)
    table = 4 * (used.max() - used.min() + 1) if len(used) else 0
    return float((hist * lengths).sum()) + table + 64.0 * int((~inside).sum())


def _entropy_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def predictor_codes(w: np.ndarray, eb: float) -> dict:
    """Integer codes (and side-information bits) of each predictor at bound eb, step float32(2 eb).

    Lorenzo predicts from the *reconstructed* neighbour. Starting from 0, every reconstruction is a
    multiple of the step, so r[i] = r[i-1] + step * round((w[i] - r[i-1]) / step) = step * round(w[i] / step):
    SZ's sequential 1-D Lorenzo on this grid is exactly the difference of the no-predictor codes
    (same reconstruction, same error bound), which vectorizes. 2-D Lorenzo likewise."""
    step = float(np.float32(2 * eb))
    w64 = w.astype(np.float64)
    q = np.rint(w64 / step).astype(np.int64)
    rows, cols = w.shape
    mu = w64.mean(axis=1, keepdims=True).astype(np.float32).astype(np.float64)
    q_mean = np.rint((w64 - mu) / step).astype(np.int64)
    d_row = np.diff(q, axis=1, prepend=0)  # predict from the left neighbour in the row
    d_col = np.diff(q, axis=0, prepend=0)  # predict from the same column, previous row
    d_2d = np.diff(d_row, axis=0, prepend=0)  # q[i,j] - q[i,j-1] - q[i-1,j] + q[i-1,j-1]
    return {
        "none": (q, 0.0),
        "per-row mean (fp32 mean per row)": (q_mean, 32.0 * rows),
        "1-D Lorenzo along rows (w[i, j-1])": (d_row, 0.0),
        "1-D Lorenzo down columns (w[i-1, j])": (d_col, 0.0),
        "2-D Lorenzo": (d_2d, 0.0),
    }


def predictor_study(weights, bounds) -> None:
    tot_n = sum(w.size for _, w in weights)
    acc: dict = {}
    corr_r, corr_c = [], []
    for (name, w), eb in zip(weights, bounds):
        w64 = w.astype(np.float64)
        corr_r.append(np.corrcoef(w64[:, 1:].ravel(), w64[:, :-1].ravel())[0, 1])
        corr_c.append(np.corrcoef(w64[1:, :].ravel(), w64[:-1, :].ravel())[0, 1])
        for pname, (codes, side) in predictor_codes(w, eb).items():
            a = acc.setdefault(pname, [0.0, 0.0, 0.0])
            flat = codes.ravel()
            a[0] += _entropy_bits(flat) + side
            a[1] += _huffman_bits(flat) + side
            a[2] += side
    print("\n### Predictors (at each matrix's NF4-RMSE bound, all 37 weights, weighted by size)\n")
    print(f"lag-1 correlation of w: along rows mean {np.mean(corr_r):+.4f} (range {min(corr_r):+.4f}.."
          f"{max(corr_r):+.4f}), down columns mean {np.mean(corr_c):+.4f} (range {min(corr_c):+.4f}.."
          f"{max(corr_c):+.4f})\n")
    base = acc["none"]
    print("| predictor | entropy H0 of codes + side info, bits/param | Huffman-coded codes + side info, bits/param "
          "| of which side info | vs none (Huffman) |")
    print("|---|---|---|---|---|")
    for pname, (h, hb, side) in acc.items():
        print(f"| {pname} | {h / tot_n:.4f} | {hb / tot_n:.4f} | {side / tot_n:.4f} | {(hb - base[1]) / tot_n:+.4f} |")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="bisection steps per matrix (default 10)")
    ap.add_argument("--no-predictors", action="store_true")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for the side-by-side timings (default 1,2)")
    ap.add_argument("--plot", default=None, help="write a rate-distortion figure (PNG) to this path")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads must be positive integers separated by commas, got {args.threads!r}")
    if pysz is None:
        print(PYSZ_HOWTO + "\n")
    t_start = time.perf_counter()

    model, _ = load_minilm()
    weights = [(n, m.weight.detach().float().contiguous().numpy())
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tot_n = sum(w.size for _, w in weights)
    print(f"{len(weights)} Linear weights, {tot_n} params; torch {torch.__version__}, numpy {np.__version__}, "
          f"pysz {getattr(pysz, '__version__', None) or _pysz_version()}, {platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)\n")

    rows = []  # per matrix
    bounds = []
    names = ["lowbit"] + ([a for _, a in SZ3_ALGOS] if pysz else [])
    agg = {k: dict(bytes=0, sq=0.0, maxr=0.0, maxr16=0.0, maxrbf=0.0, tc=0.0, td=0.0) for k in names}
    agg_nf4 = dict(sq=0.0, tc=0.0, td=0.0, maxe=0.0)
    own = {a: dict(bytes=0, sq=0.0, eb=[], abs=[]) for _, a in SZ3_ALGOS} if pysz else {}
    targets = []  # NF4's RMSE per matrix
    out_stats = dict(outlier_bytes=0, payload_bytes=0, index_bytes=0, n_out=0, min_bytes=0)
    streams = []  # lowbit's stream per matrix at its bisected bound
    for name, w in weights:
        wt = torch.from_numpy(w)
        t0 = time.perf_counter()
        q4 = lowbit.quantize_4bit(wt, 64, "nf4", True)
        t1 = time.perf_counter()
        d4 = lowbit.dequantize_4bit(q4, torch.float32).numpy()
        t2 = time.perf_counter()
        target = rmse(d4, w)
        targets.append(target)
        agg_nf4["sq"] += target ** 2 * w.size
        agg_nf4["tc"] += t1 - t0
        agg_nf4["td"] += t2 - t1
        agg_nf4["maxe"] = max(agg_nf4["maxe"], maxerr(d4, w) / target)
        eb, _ = bisect_to_rmse(lowbit_run, w, target, args.steps)
        bounds.append(eb)
        row = [name, f"{target:.3e}", f"{eb:.3e}"]
        for k in names:
            nbytes, out, tc, td, c = lowbit_run(w, eb) if k == "lowbit" else sz3_run(w, eb, k)
            e_max = maxerr(out, w)
            a = agg[k]
            a["bytes"] += nbytes
            a["sq"] += rmse(out, w) ** 2 * w.size
            a["maxr"] = max(a["maxr"], e_max / eb)
            # The same output cast to fp16 / bf16 (for lowbit this equals decoding in that dtype),
            # against lowbit's guarantee max(bound, |d(w) - w|) (d cannot hold some w within the bound).
            a["maxr16"] = max(a["maxr16"], cast_ratio(out, w, eb, torch.float16))
            a["maxrbf"] = max(a["maxrbf"], cast_ratio(out, w, eb, torch.bfloat16))
            a["tc"] += tc
            a["td"] += td
            row.append(f"{8 * nbytes / w.size:.3f}")
            if c is not None:
                ob = _entropy.varint_len(_entropy.gaps(c.outlier_idx)) + len(c.outlier_idx) * c.outlier_val.element_size()
                out_stats["outlier_bytes"] += ob
                out_stats["payload_bytes"] += 4 * len(c.payload)
                out_stats["index_bytes"] += c.index_nbytes
                out_stats["n_out"] += len(c.outlier_idx)
                streams.append((wt, eb, c))
                row.insert(3, f"{c.lanes}x{c.lane_symbols}")
        rows.append(row)
        # lowbit's size is not monotone in the bound (bf16-rounding outliers): the smallest stream
        # among bounds up to 3 % below the bisected one, keeping RMSE <= NF4's (each meets that bound).
        best = sz_compress(wt, eb).nbytes
        for k in range(1, 13):
            c = sz_compress(wt, eb * (1 - 0.0025 * k))
            if c.nbytes < best and rmse(sz_decompress(c).numpy(), w) <= target:
                best = c.nbytes
        out_stats["min_bytes"] += best
        for _, k in (SZ3_ALGOS if pysz else ()):
            eb3, r3 = bisect_to_rmse(lambda x, e, k=k: sz3_run(x, e, k), w, target, args.steps)
            own[k]["bytes"] += r3[0]
            own[k]["sq"] += rmse(r3[1], w) ** 2 * w.size
            own[k]["eb"].append(eb3 / eb)
            own[k]["abs"].append(eb3)

    label = {"lowbit": "lowbit SZ (no predictor, Huffman)"} | {a: f"SZ3 {n}" for n, a in SZ3_ALGOS}
    print("### Same abs bound per matrix (lowbit's bound at NF4's RMSE), all 37 weights\n")
    print("| compressor | mean bits/param | RMSE (all weights) | max error / bound, fp32 output (worst matrix) "
          "| output cast to fp16 / bf16: max error / max(bound, error of casting w) | compress s (total) | decompress s (total) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| NF4 + double quant (reference) | {NF4_BITS:.3f} | {math.sqrt(agg_nf4['sq'] / tot_n):.4e} | "
          f"unbounded (max error = {agg_nf4['maxe']:.2f} x RMSE, worst matrix) | - | {agg_nf4['tc']:.3f} | "
          f"{agg_nf4['td']:.3f} |")
    for k in names:
        a = agg[k]
        print(f"| {label[k]} | {8 * a['bytes'] / tot_n:.3f} | {math.sqrt(a['sq'] / tot_n):.4e} | {a['maxr']:.6f} | "
              f"{a['maxr16']:.4f} / {a['maxrbf']:.4f} | {a['tc']:.3f} | {a['td']:.3f} |")
    print(f"\nlowbit stream breakdown (all 37): Huffman payload {8 * out_stats['payload_bytes'] / tot_n:.4f} "
          f"bits/param, lane index {8 * out_stats['index_bytes'] / tot_n:.4f}, outliers "
          f"{8 * out_stats['outlier_bytes'] / tot_n:.4f} ({out_stats['n_out'] / tot_n:.3%} of weights), headers and "
          f"code-length tables the rest")
    timings(streams)

    if pysz:
        print("\n### Each bisected to NF4's per-matrix RMSE, all 37 weights\n")
        print("| compressor | mean bits/param | RMSE (all weights) | its bound / lowbit's bound (range) |")
        print("|---|---|---|---|")
        a = agg["lowbit"]
        print(f"| {label['lowbit']} | {8 * a['bytes'] / tot_n:.3f} | {math.sqrt(a['sq'] / tot_n):.4e} | 1 |")
        print(f"| lowbit SZ, smallest stream over bounds 0.97..1 x the bisected one | "
              f"{8 * out_stats['min_bytes'] / tot_n:.3f} | <= NF4 per matrix | 0.97..1 |")
        for _, k in SZ3_ALGOS:
            o = own[k]
            print(f"| {label[k]} | {8 * o['bytes'] / tot_n:.3f} | {math.sqrt(o['sq'] / tot_n):.4e} | "
                  f"{min(o['eb']):.4f}..{max(o['eb']):.4f} |")

    print("\n### Per matrix, bits/param at the same bound\n")
    print("| matrix | NF4 RMSE | bound | lowbit lanes x symbols/lane | " + " | ".join(label[k] for k in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        print("| " + " | ".join(r) + " |")

    side_by_side(weights, targets, bounds, {k: o["abs"] for k, o in own.items()}, args.steps, threads)
    if args.plot:
        plot_rate_distortion(weights, targets, bounds, args.plot)
    if not args.no_predictors:
        predictor_study(weights, bounds)
    print(f"\ntotal runtime {time.perf_counter() - t_start:.1f} s; load average at the end "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) on {os.cpu_count()} CPUs")


def timings(streams) -> None:
    """lowbit compress / decompress, warm, the least of 3 runs: the 37 weights, then 4096 x 4096."""
    tc = _least(lambda: [sz_compress(w, eb) for w, eb, _ in streams])
    td = _least(lambda: [sz_decompress(c) for _, _, c in streams])
    n = sum(w.numel() for w, _, _ in streams)
    print(f"\nlowbit, warm (least of 3 runs): the {len(streams)} weights ({n} params) compress {tc:.3f} s, "
          f"decompress {td:.3f} s")
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    c = sz_compress(w, 2.5e-3)
    tc = _least(lambda: sz_compress(w, 2.5e-3))
    td = _least(lambda: sz_decompress(c))
    print(f"lowbit 4096 x 4096 N(0, 0.02) fp32 at eb 2.5e-3 ({c.bits_per_param:.3f} bits/param, {c.n_lanes} lanes of "
          f"{c.lane_symbols} symbols): compress {tc:.2f} s, decompress {td:.2f} s")


# --------------------------------------------------------------------------- side by side with SZ3


def _codec(name: str):
    """(compress(w, eb) -> stream, decompress(stream, w) -> fp32 array, nbytes(stream)) of a compressor."""
    if name == "lowbit":
        return (lambda w, eb: sz_compress(torch.from_numpy(w), eb), lambda c, w: sz_decompress(c).numpy(),
                lambda c: c.nbytes)
    conf = szConfig()
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.cmprAlgo = getattr(szAlgorithm, name)

    def comp(w, eb):
        conf.absErrorBound = eb
        return sz3.compress(w, conf)[0]
    return comp, lambda blob, w: sz3.decompress(blob, np.float32, w.shape)[0], lambda blob: int(blob.size)


def bisect_to_bits(name: str, w: np.ndarray, eb0: float, bits: float, steps: int) -> float:
    """The smallest abs bound (log bisection from [eb0, 4 eb0], widened when needed) whose stream
    is <= `bits` bits/param."""
    comp, _, size = _codec(name)
    fits = lambda eb: 8 * size(comp(w, eb)) / w.size <= bits  # noqa: E731
    lo, hi = eb0, 4 * eb0
    while fits(lo):
        lo, hi = lo / 2, lo
    while not fits(hi):
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


REPS = 7  # timing rounds in side_by_side


def _least(f, reps: int = 3) -> float:
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return min(t)


def side_by_side(weights, targets, bounds, sz3_bounds: dict, steps: int, threads: list) -> None:
    """lowbit and SZ3 at NF4's RMSE (each bisected to it) and at 3.0 bits/param, same process."""
    names = ["lowbit"] + ([a for _, a in SZ3_ALGOS] if pysz else [])
    label = {"lowbit": "lowbit SZ"} | {a: f"SZ3 {n}" for n, a in SZ3_ALGOS}
    tot_n = sum(w.size for _, w in weights)
    points = {"NF4's RMSE": {"lowbit": list(bounds)} | {k: sz3_bounds[k] for k in names[1:]}}
    t0 = time.perf_counter()
    points["3.0 bits/param"] = {k: [bisect_to_bits(k, w, eb, 3.0, steps) for (_, w), eb in zip(weights, bounds)]
                                for k in names}
    print(f"\n### Side by side, same process (3.0 bits/param bisection took {time.perf_counter() - t0:.1f} s)\n")
    print("Each compressor's abs bound per matrix: bisected to NF4's RMSE, or the smallest bound whose stream is "
          f"<= 3.0 bits/param. Times: warm, all 37 weights, the least of {REPS} rounds in which the compressors take turns; SZ3 "
          "(pysz 1.1.0) is single-threaded, so its columns differ by noise only.\n")
    tcols = " | ".join(f"compress s ({t} thr) | decompress s ({t} thr)" for t in threads)
    print(f"| operating point | compressor | bits/param | RMSE | max abs error | max error / bound (worst matrix) "
          f"| {tcols} |")
    print("|---|---|---|---|---|---|" + "---|---|" * len(threads))
    old = torch.get_num_threads()
    summary = {}
    for point, per in points.items():
        rows, streams = {}, {}
        for k in names:
            comp, dec, size = _codec(k)
            streams[k] = [comp(w, eb) for (_, w), eb in zip(weights, per[k])]
            nbytes, sq, emax, ratio = 0, 0.0, 0.0, 0.0
            for (_, w), eb, c in zip(weights, per[k], streams[k]):
                out = dec(c, w)
                nbytes += size(c)
                sq += rmse(out, w) ** 2 * w.size
                e = maxerr(out, w)
                emax, ratio = max(emax, e), max(ratio, e / eb)
            rows[k] = f"| {point} | {label[k]} | {8 * nbytes / tot_n:.3f} | {math.sqrt(sq / tot_n):.4e} | {emax:.4e} | " \
                      f"{ratio:.6f} | "
        # Timing: the compressors take turns within every round (a shared machine's load hits them alike);
        # each compressor's least time over REPS rounds.
        best = {(k, t, op): math.inf for k in names for t in threads for op in (0, 1)}
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(REPS):
                for k in names:
                    comp, dec, _ = _codec(k)
                    tc = _least(lambda: [comp(w, eb) for (_, w), eb in zip(weights, per[k])], 1)
                    td = _least(lambda: [dec(c, w) for (_, w), c in zip(weights, streams[k])], 1)
                    best[(k, t, 0)] = min(best[(k, t, 0)], tc)
                    best[(k, t, 1)] = min(best[(k, t, 1)], td)
        torch.set_num_threads(old)
        for k in names:
            times = [best[(k, t, op)] for t in threads for op in (0, 1)]
            summary[(point, k)] = times
            print(rows[k] + " | ".join(f"{x:.3f}" for x in times) + " |")
    if pysz:
        print("\nlowbit's time / SZ3's (goals: compress <= 3x, decompress <= 2x):\n")
        print("| operating point | vs | " + " | ".join(f"compress ({t} thr) | decompress ({t} thr)" for t in threads)
              + " |")
        print("|---|---|" + "---|---|" * len(threads))
        for point in points:
            for k in ("NOPRED", "INTERP_LORENZO"):
                r = [a / b for a, b in zip(summary[(point, "lowbit")], summary[(point, k)])]
                print(f"| {point} | {label[k]} | " + " | ".join(f"{x:.2f}x" for x in r) + " |")
    # 4096 x 4096
    w = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).numpy()
    print(f"\n4096 x 4096 N(0, 0.02) fp32 at eb 2.5e-3, warm, least of {REPS} rounds (taking turns):\n")
    print(f"| compressor | bits/param | max abs error | {tcols} |")
    print("|---|---|---|" + "---|---|" * len(threads))
    blobs = {k: _codec(k)[0](w, 2.5e-3) for k in names}
    best = {(k, t, op): math.inf for k in names for t in threads for op in (0, 1)}
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(REPS):
            for k in names:
                comp, dec, _ = _codec(k)
                best[(k, t, 0)] = min(best[(k, t, 0)], _least(lambda: comp(w, 2.5e-3), 1))
                best[(k, t, 1)] = min(best[(k, t, 1)], _least(lambda: dec(blobs[k], w), 1))
    torch.set_num_threads(old)
    for k in names:
        _, dec, size = _codec(k)
        print(f"| {label[k]} | {8 * size(blobs[k]) / w.size:.3f} | {maxerr(dec(blobs[k], w), w):.4e} | "
              + " | ".join(f"{best[(k, t, op)]:.3f}" for t in threads for op in (0, 1)) + " |")
    if pysz:
        print("\nlowbit's time / SZ3 none's, 4096 x 4096: " + ", ".join(
            f"{('compress', 'decompress')[op]} ({t} thr) {best[('lowbit', t, op)] / best[('NOPRED', t, op)]:.2f}x"
            for t in threads for op in (0, 1)))


def plot_rate_distortion(weights, targets, bounds, path: str) -> None:
    """bits/param vs RMSE (all 37 weights) for lowbit and SZ3 at bounds f x lowbit's NF4-RMSE bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["lowbit"] + ([a for _, a in SZ3_ALGOS] if pysz else [])
    label = {"lowbit": "lowbit SZ (no predictor, Huffman)"} | {a: f"SZ3 {n}" for n, a in SZ3_ALGOS}
    tot_n = sum(w.size for _, w in weights)
    factors = [0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, marker in zip(names, "osv^D"):
        comp, dec, size = _codec(k)
        xs, ys = [], []
        for f in factors:
            nbytes, sq = 0, 0.0
            for (_, w), eb in zip(weights, bounds):
                c = comp(w, f * eb)
                nbytes += size(c)
                sq += rmse(dec(c, w), w) ** 2 * w.size
            xs.append(8 * nbytes / tot_n)
            ys.append(math.sqrt(sq / tot_n))
        ax.plot(xs, ys, marker=marker, label=label[k])
    nf4 = math.sqrt(sum(t * t * w.size for t, (_, w) in zip(targets, weights)) / tot_n)
    ax.plot([NF4_BITS], [nf4], "k*", markersize=12, label="NF4 + double quant")
    ax.axvline(3.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("bits / param (whole streams)")
    ax.set_ylabel("weight RMSE vs fp32 (all 37 weights)")
    ax.set_title("all-MiniLM-L6-v2, 37 Linear weights: lowbit SZ vs SZ3 (pysz 1.1.0)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nrate-distortion figure: {path} (bounds {factors} x lowbit's NF4-RMSE bound per matrix)")


def _pysz_version() -> str:
    try:
        from importlib.metadata import version
        return version("pysz")
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
