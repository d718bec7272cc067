"""`lowbit bench`: kernel timings against torch's dense matmul on this device (ratios from one run)."""

from __future__ import annotations

import contextlib
import json
import os
import time

from ._tools import UsageError, _threads

NOISY = 0.20  # a spread above this (of the median) makes a timing untrustworthy
KERNEL_W = 34  # the longest kernel name: "sz3_decompress (pysz, same bound)"


def _cpu_time(fn, budget_s: float = 0.25, max_reps: int = 50, spreads: list | None = None) -> float:
    """Median seconds of fn() after one warmup call, repeated until budget_s or max_reps; the
    spread of the repeats (`relative_spread`) is appended to `spreads`."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    min_reps = 5 if first < budget_s / 5 else 1  # slow kernels: one timed call after the warmup
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    if spreads is not None and len(times) >= 3:
        spreads.append(relative_spread(times))
    return med


def relative_spread(times) -> float:
    """Interquartile range / median of repeated timings.

    Not (max - min) / median: on a busy machine one repeat of a microseconds-long kernel that
    waits for the scheduler takes milliseconds, and that single stall made spreads of 170513%.
    The quartiles ignore a stall or two and still grow when the timings really scatter."""
    import statistics

    ts = sorted(times)
    q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return (q3 - q1) / med if med > 0 else 0.0


def format_spread(spread) -> str:
    """A spread (a fraction of the median) as a percentage, e.g. 0.123 -> "12%"; "-" when none."""
    if spread is None:
        return "-"
    if spread >= 10:
        return ">999%"  # the timing is meaningless either way; keep the column's width
    return f"{spread:.0%}"


def format_header(cuda: bool) -> str:
    """The column names of `format_row`'s lines."""
    extra = f" {'GB/s':>7s} {'of copy':>8s}" if cuda else f" {'spread':>7s}"
    return f"{'kernel':{KERNEL_W}s} {'K':>5s} {'N':>5s} {'M':>4s} {'median ms':>10s} {'vs dense':>9s}{extra}"


def format_row(r: dict, cuda: bool) -> str:
    """One result as a line under `format_header`; a decoder row (M 0) shows M as "-" (its vs dense
    is relative to the M=1 dense matmul)."""
    m = str(r["M"]) if r["M"] else "-"
    if cuda:
        extra = f" {r['gbs']:7.0f} {r['frac_copy_bw']:8.0%}" if "gbs" in r else f" {'-':>7s} {'-':>8s}"
    else:
        extra = f" {format_spread(r.get('spread')):>7s}"
    return (f"{r['kernel']:{KERNEL_W}s} {r['K']:5d} {r['N']:5d} {m:>4s} {r['ms']:10.3f} "
            f"{'x' + format(r['vs_dense'], '.2f'):>9s}{extra}")


def noise_warning(noisy: list, threads: int) -> str | None:
    """The warning for timings whose spread is over NOISY, or None when there are none. The advice
    to rerun with --threads 1 only when the run used more than one thread."""
    if not noisy:
        return None
    advice = "rerun on a quiet machine or with --threads 1" if threads > 1 else "rerun on a quieter machine"
    return (f"warning: {len(noisy)} timings spread over {NOISY:.0%} of their median (e.g. {noisy[0]}): "
            f"this machine is too noisy to trust them; {advice}")


def _bnb_4bit(w):
    """(fn(x) -> y) for bitsandbytes' matmul_4bit on w's device, or None when it does not run here."""
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):
            import bitsandbytes as bnb
            import bitsandbytes.functional as bF

            q, qs = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception:
        return None

    def fn(x):
        return bnb.matmul_4bit(x, q.t(), quant_state=qs)

    return fn


def _pysz_decoder(w32, bound: float):
    """SZ3 (PyPI pysz, no predictor: its best mode on weights) at the same abs bound: a function
    that decompresses, or None when pysz is not installed."""
    try:
        import numpy as np
        from pysz import sz, szAlgorithm, szConfig, szErrorBoundMode
    except ImportError:
        return None
    conf = szConfig()
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.absErrorBound = bound
    conf.cmprAlgo = szAlgorithm.NOPRED
    arr = np.ascontiguousarray(w32.numpy(), dtype=np.float32)
    blob, _ = sz.compress(arr, conf)
    return lambda: sz.decompress(blob, np.float32, arr.shape)


def run_bench(device: str = "cpu", quick: bool = False, log=None) -> dict:
    """Time lowbit's matmuls and decoders vs torch's dense matmul at a few shapes on `device`.

    Each result has ms (median) and vs_dense = ms / dense ms at the same (M, K, N) in this run
    (> 1: slower than dense). On CUDA: triton.testing.do_bench, plus GB/s and the fraction of the
    measured device-to-device copy bandwidth (bytes = quantized weight + activations in and out)."""
    import torch
    from torch import nn

    import lowbit
    from lowbit import SZLinear, sz_decompress

    log = log or (lambda s: None)
    cuda = device == "cuda"
    dev = torch.device(device)
    if quick:
        shapes, ms_list = [(256, 256)], [1, 8]
    else:
        shapes, ms_list = [(1024, 1024), (4096, 1024)], [1, 16, 256]  # (K = in, N = out)
    dt = torch.bfloat16 if cuda else torch.float32
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "lowbit": lowbit.__version__, "dtype": str(dt).replace("torch.", ""), "quick": quick,
           "threads": torch.get_num_threads(), "results": []}
    if cuda:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=10, rep=50 if quick else 100, return_mode="median") * 1e-3

        src = torch.empty(1 << (24 if quick else 28), dtype=torch.uint8, device=dev)
        src.random_(0, 255)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() / timer(lambda: dst.copy_(src)) / 1e9
        del src, dst
        res["copy_bandwidth_gbs"] = bw
        log(f"device-to-device copy bandwidth: {bw:.0f} GB/s")
    else:
        def timer(fn):
            spreads.clear()
            return _cpu_time(fn, 0.05 if quick else 0.15, 10 if quick else 40, spreads)
        bw = None

    spreads: list = []  # the last CPU timing's spread (empty on CUDA)
    noisy: list = []
    log(format_header(cuda))
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w32 = torch.randn(n, k, generator=gen) * 0.02
        w = w32.to(dev, dt)
        q4 = lowbit.quantize_4bit(w, 64, "nf4", True)
        qi = lowbit.quantize_int(w, 4, None)
        q3 = lowbit.quantize_int(w, 3, 128 if k % 128 == 0 else None)
        bnb_fn = _bnb_4bit(w)
        lin = nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w32)
        sz_lin = SZLinear.from_linear(lin, error_bound=0.13 * float(w32.std()))  # ~4 bits/param on a Gaussian weight
        sz_c = sz_lin.to_sz()
        sz_lin = sz_lin.to(dev)
        wbytes = {"dense": w.numel() * w.element_size(), "lowbit_nf4": q4.nbytes, "lowbit_int4_rows": qi.nbytes,
                  "lowbit_int3_g128": q3.nbytes, "bnb_nf4": q4.nbytes, "sz_linear": sz_c.nbytes}
        # decoders alone (weight -> dense), timed once per shape
        dec = {"lowbit_dequant_nf4": (lambda: lowbit.dequantize_4bit(q4, dt), q4.nbytes),
               "sz_decompress": ((lambda: sz_lin.dequantized_weight(dt)) if cuda else
                                 (lambda: sz_decompress(sz_c, dtype=dt, allow_unbounded=True)), sz_c.nbytes)}
        sz3 = None if cuda else _pysz_decoder(w32, sz_c.bound)
        if sz3 is not None:
            dec["sz3_decompress (pysz, same bound)"] = (sz3, 0)
        x0 = torch.randn(1, k, generator=gen).to(dev, dt)
        t_dense1 = timer(lambda: x0 @ w.t())
        for name, (fn, nb) in dec.items():
            t = timer(fn)
            r = {"kernel": name, "M": 0, "K": k, "N": n, "ms": t * 1e3, "vs_dense": t / t_dense1,
                 "note": "decode the whole weight; vs_dense relative to the M=1 dense matmul"}
            if spreads:
                r["spread"] = spreads[-1]
                if spreads[-1] > NOISY:
                    noisy.append(f"{name} K={k} N={n}")
            if cuda:
                r["gbs"] = (nb + w.numel() * w.element_size()) / t / 1e9
                r["frac_copy_bw"] = r["gbs"] / bw
            res["results"].append(r)
            log(format_row(r, cuda))
        for m in ms_list:
            x = torch.randn(m, k, generator=gen).to(dev, dt)
            kern = {"dense": lambda: x @ w.t(),
                    "lowbit_nf4": lambda: lowbit.matmul_4bit(x, q4),
                    "lowbit_int4_rows": lambda: lowbit.matmul_int(x, qi),
                    "lowbit_int3_g128": lambda: lowbit.matmul_int(x, q3),
                    "sz_linear": lambda: sz_lin(x)}
            if m not in (ms_list[0], ms_list[-1]):
                del kern["sz_linear"]  # decode-bound: its time hardly depends on M; keep the run short
            if bnb_fn is not None:
                kern["bnb_nf4"] = lambda: bnb_fn(x)
            t_dense = None
            for name, fn in kern.items():
                with torch.no_grad():
                    try:
                        t = timer(fn)
                    except Exception as e:  # e.g. a bitsandbytes build without this device's kernels
                        log(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                        continue
                if name == "dense":
                    t_dense = t
                r = {"kernel": name, "M": m, "K": k, "N": n, "ms": t * 1e3, "vs_dense": t / t_dense}
                if spreads:
                    r["spread"] = spreads[-1]
                    if spreads[-1] > NOISY:
                        noisy.append(f"{name} M={m} K={k} N={n}")
                if cuda:
                    r["gbs"] = (wbytes[name] + (m * k + m * n) * x.element_size()) / t / 1e9
                    r["frac_copy_bw"] = r["gbs"] / bw
                res["results"].append(r)
                log(format_row(r, cuda))
    res["bitsandbytes"] = any(r["kernel"] == "bnb_nf4" for r in res["results"])
    res["noisy"] = noisy
    warning = noise_warning(noisy, res["threads"])
    if warning:
        log(warning)
    return res


def _bench(a) -> int:
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if a.device == "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "0")
    quick = a.quick or os.environ.get("LOWBIT_BENCH_QUICK", "") not in ("", "0")
    t0 = time.perf_counter()
    with _threads(a.threads):
        res = run_bench(a.device, quick, log=None if a.json else print)
    res["wall_s"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        spread = "" if a.device == "cuda" else "; spread: interquartile range of the repeats / median"
        print(f"(vs dense: time / torch dense matmul time in this run, M - rows: decoding the whole weight, "
              f"vs the M=1 dense matmul{spread}; torch threads: {res['threads']}; {res['wall_s']:.1f} s)")
    return 0


