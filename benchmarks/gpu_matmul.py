"""GPU check and benchmark of the fused 4-bit matmul (one run, inside 5 minutes on an H100).

    python benchmarks/gpu_matmul.py [--out DIR] [--quick]

1. Correctness at real sizes: lowbit's Triton forward / grad_x against a float64 reference
   built from lowbit's own dequantized weight (which is byte-checked against bitsandbytes on the
   CPU in the test suite), and Triton quantize/dequantize against the reference on CUDA.
2. Timings with triton.testing.do_bench (median, L2 flushed between runs): lowbit vs torch bf16
   (cuBLAS) vs bitsandbytes' matmul_4bit when importable, and achieved GB/s against the measured
   device-to-device copy bandwidth. Prints a compact table last; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (K, N)
MS = [1, 4, 16, 64, 256, 4096]


def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def check_correctness(log) -> list[dict]:
    import lowbit
    from lowbit import codes, reference
    import lowbit.kernels as K

    rows = []
    # quantize / dequantize: Triton on CUDA vs the reference on CUDA, bit for bit
    for qt in ("nf4", "fp4"):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            w = torch.randn(4096 * 1024 + 17, device="cuda", dtype=dt)
            code = codes.code_table(qt).cuda()
            b, o = codes.quantize_bounds(code)
            p1, a1 = reference.quantize_4bit(w, 64, b, o)
            p2, a2 = K.quant4bit.quantize_4bit(w, 64, b, o)
            q = lowbit.quantize_4bit(w, 64, qt, True)
            ok_q = torch.equal(p1, p2) and torch.equal(a1, a2)
            d_ref = reference.dequantize_4bit(q.codes, q.scales(), q.code, 64, q.numel, dt)
            d_tri = lowbit.dequantize_4bit(q)
            ok_d = torch.equal(d_ref, d_tri)
            rows.append({"check": f"quant/dequant {qt} {dt}", "ok": ok_q and ok_d})
            log(f"quantize {qt} {dt}: bytes equal {ok_q}, dequant equal {ok_d}")
    # matmul forward and grad_x at real sizes
    for (k, n) in [(4096, 4096), (8192, 8192), (4096, 11008)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = lowbit.quantize_4bit(w, 64, "nf4", True)
        wd = lowbit.dequantize_4bit(q, torch.float32).double()
        for m in (1, 3, 16, 33, 512):
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(m, k, device="cuda", dtype=dt, requires_grad=True)
                bias = torch.randn(n, device="cuda", dtype=dt)
                y = lowbit.matmul_4bit(x, q, bias)
                ref = x.double() @ wd.t() + bias.double()
                gy = torch.randn_like(y)
                (gx,) = torch.autograd.grad(y, x, gy)
                gref = gy.double() @ wd
                e1, e2 = rel_err(y, ref), rel_err(gx, gref)
                tol = 1e-2 if dt != torch.float32 else 1e-3
                ok = e1 <= tol and e2 <= tol
                rows.append({"check": f"matmul K={k} N={n} M={m} {dt}", "fwd_err": e1, "gx_err": e2, "ok": ok})
                log(f"matmul K={k} N={n} M={m} {dt}: fwd {e1:.2e} grad_x {e2:.2e} {'OK' if ok else 'FAIL'}")
    return rows


def bench(log, quick: bool) -> list[dict]:
    from triton.testing import do_bench

    import lowbit

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as e:  # staged by ../shared/device/stage-anchors.sh
        log(f"bitsandbytes not importable ({type(e).__name__}: {e}); its column is empty")
        bnb = None
    bw = copy_bandwidth()
    log(f"device-to-device copy bandwidth: {bw:.0f} GB/s")
    results = []
    shapes = SHAPES[:2] if quick else SHAPES
    for (k, n) in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = lowbit.quantize_4bit(w, 64, "nf4", True)
        if bnb is not None:
            bq, bstate = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t0 = time.time()
            lowbit.matmul_4bit(x, q)  # compile + autotune outside the timing
            tune_s = time.time() - t0
            t_bf16 = do_bench(lambda: x @ w.t(), warmup=10, rep=60, return_mode="median")
            t_lb = do_bench(lambda: lowbit.matmul_4bit(x, q), warmup=10, rep=60, return_mode="median")
            t_bnb = None
            if bnb is not None:
                try:
                    t_bnb = do_bench(lambda: bnb.matmul_4bit(x, bq.t(), quant_state=bstate), warmup=10, rep=60,
                                     return_mode="median")
                except Exception as e:
                    log(f"bnb failed at M={m}: {e}")
            t_gx = t_gx_bf16 = None
            if m == 4096:
                g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                from lowbit import ops

                absmax, nabs, ncode, off = q.scale_tensors()
                t_gx = do_bench(lambda: ops.matmul_4bit_grad_x_2d(g, q.codes, absmax, q.code, 64, k, nabs, ncode, off, 256),
                                warmup=10, rep=60, return_mode="median")
                t_gx_bf16 = do_bench(lambda: g @ w, warmup=10, rep=60, return_mode="median")
            bytes_moved = q.nbytes + x.numel() * 2 + m * n * 2
            r = {"K": k, "N": n, "M": m, "bf16_ms": t_bf16, "lowbit_ms": t_lb, "bnb_ms": t_bnb,
                 "speedup_vs_bf16": t_bf16 / t_lb, "speedup_vs_bnb": (t_bnb / t_lb) if t_bnb else None,
                 "lowbit_GBps": bytes_moved / (t_lb * 1e-3) / 1e9, "frac_of_copy_bw": bytes_moved / (t_lb * 1e-3) / 1e9 / bw,
                 "grad_x_ms": t_gx, "grad_x_bf16_ms": t_gx_bf16, "tune_s": tune_s}
            results.append(r)
            log(json.dumps(r))
    return results


def bench_int(log) -> list[dict]:
    """int4 rows / int3 g128 / int2 g64 on 8192x8192 vs torch bf16 (not yet run on a GPU)."""
    from triton.testing import do_bench

    import lowbit

    k = n = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    out = []
    for bits, gs in ((4, None), (3, 128), (2, 64)):
        q = lowbit.quantize_int(w, bits=bits, group_size=gs, method="rtn")
        wd = lowbit.dequantize_int(q, torch.float32).double()
        for m in (1, 16, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = lowbit.matmul_int(x, q)
            err = rel_err(y, x.double() @ wd.t())
            t_bf16 = do_bench(lambda: x @ w.t(), warmup=10, rep=60, return_mode="median")
            t_lb = do_bench(lambda: lowbit.matmul_int(x, q), warmup=10, rep=60, return_mode="median")
            r = {"bits": bits, "group": gs, "M": m, "bf16_ms": t_bf16, "lowbit_ms": t_lb, "x_bf16": t_bf16 / t_lb,
                 "err": err}
            out.append(r)
            log(f"int{bits} group={gs} M={m}: {t_lb * 1e3:.1f} us vs bf16 {t_bf16 * 1e3:.1f} us "
                f"(x{t_bf16 / t_lb:.2f}), rel err {err:.1e}")
    return out


def bench_sz(log) -> dict:
    """GPU decode throughput of the SZ codec (decoded bytes per second, output dtype bf16)."""
    from triton.testing import do_bench

    from lowbit.sz import decode_reference, sz_compress, sz_decode_flat

    w = torch.randn(4096, 4096) * 0.02
    res = {}
    for chunk in (4096, 1024):
        c = sz_compress(w, 2e-3, chunk_size=chunk)
        args = c.decoder_args("cuda")
        f = lambda: sz_decode_flat(*args, c.numel, c.chunk_size, c.max_len, c.radius, torch.bfloat16)  # noqa: E731
        ok = torch.equal(f().cpu().view(c.shape), decode_reference(c, torch.bfloat16))
        ms = do_bench(f, warmup=10, rep=100, return_mode="median")
        gbps = c.numel * 2 / (ms * 1e-3) / 1e9
        res[chunk] = {"ms": ms, "decoded_GBps": gbps, "bits_per_param": c.bits_per_param, "bit_identical": ok}
        log(f"sz decode 4096x4096 chunk={chunk}: {ms * 1e3:.0f} us, {gbps:.1f} GB/s of bf16 output, "
            f"{c.bits_per_param:.3f} bits/param, bit-identical to the reference: {ok}")
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-correctness", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_matmul: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "gpu_matmul.log"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    import triton

    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    t0 = time.time()
    checks = [] if a.skip_correctness else check_correctness(log)
    log(f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} ok in {time.time() - t0:.0f}s")
    res = bench(log, a.quick)
    try:
        ints = bench_int(log)
    except Exception as e:
        log(f"int bench failed: {type(e).__name__}: {e}")
        ints = None
    try:
        sz = bench_sz(log)
    except Exception as e:  # report, keep the matmul table
        log(f"sz bench failed: {type(e).__name__}: {e}")
        sz = None
    import lowbit.kernels.matmul4bit as K

    for key, cfg in K._tuned.items():
        log(f"tuned {key[0]} M-bucket={key[1]} N={key[2]} K={key[3]} {key[4]}: {cfg}")
    with open(os.path.join(a.out, "gpu_matmul.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "checks": checks, "bench": res, "int": ints, "sz": sz}, f, indent=1)
    log("")
    log(f"{'K x N':>13} {'M':>5} {'bf16 ms':>9} {'lowbit ms':>9} {'bnb ms':>9} {'x bf16':>7} {'x bnb':>6} {'GB/s':>6} {'%bw':>5} {'gx/bf16':>7}")
    for r in res:
        bnb_ms = f"{r['bnb_ms']:.4f}" if r["bnb_ms"] else "-"
        xb = f"{r['speedup_vs_bnb']:.2f}" if r["speedup_vs_bnb"] else "-"
        gx = f"{r['grad_x_bf16_ms'] / r['grad_x_ms']:.2f}" if r["grad_x_ms"] else ""
        log(f"{r['K']:>6}x{r['N']:<6} {r['M']:>5} {r['bf16_ms']:>9.4f} {r['lowbit_ms']:>9.4f} {bnb_ms:>9} "
            f"{r['speedup_vs_bf16']:>7.2f} {xb:>6} {r['lowbit_GBps']:>6.0f} {100 * r['frac_of_copy_bw']:>4.0f}% {gx:>7}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
