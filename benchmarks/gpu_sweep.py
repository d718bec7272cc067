"""Sweep the fused 4-bit kernels' configs and decode methods on a GPU (one run, ~2 minutes).

    python benchmarks/gpu_sweep.py [--out DIR]

For each case (M=1 and M=16 decode on 8192x8192, M=4096 forward and grad_x on 8192x8192) every
candidate is checked against a float64 reference, then timed with triton.testing.do_bench
(median, L2 flushed); torch bf16 and the dequantize+cuBLAS path are timed alongside. The result
table is what the config tables in kernels/matmul4bit.py are chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

GEMV = [(32, 128, 2, 4), (16, 128, 4, 2), (64, 64, 2, 4), (32, 64, 4, 4), (64, 128, 1, 8), (16, 256, 2, 4)]
DOT16 = [(16, 64, 128, 4, 4, 3), (16, 32, 128, 8, 4, 3), (16, 128, 64, 2, 4, 3), (16, 64, 64, 4, 4, 4)]
DOT_BIG = [(128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3)]
GX_BIG = [(128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3), (128, 128, 128, 1, 8, 3)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    import lowbit
    import lowbit.kernels.matmul4bit as K

    rows = []
    logf = open(os.path.join(a.out, "gpu_sweep.log"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")

    def bench(fn):
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    k = n = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = lowbit.quantize_4bit(w, 64, "nf4", True)
    wd = lowbit.dequantize_4bit(q, torch.float32).double()
    args = (q.codes, q.absmax, q.code, 64)
    dq = (q.nested_absmax, q.nested_code, q.offset, 256)

    def case(name, m, cands, kind):
        x = torch.randn(m, k if kind != "gx" else n, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ wd.t()) if kind != "gx" else (x.double() @ wd)
        t_bf16 = bench(lambda: x @ w.t()) if kind != "gx" else bench(lambda: x @ w)
        log(f"== {name}: bf16 {t_bf16 * 1e3:.1f} us")
        for cfg in cands:
            try:
                if kind == "gx":
                    f = lambda: K.matmul_4bit_grad_x(x, *args, k, *dq, config=cfg)  # noqa: E731
                else:
                    f = lambda: K.matmul_4bit(x, *args, n, *dq, None, config=cfg)  # noqa: E731
                out = f()
                err = float((out.double() - ref).norm() / ref.norm())
                t = bench(f)
            except Exception as e:
                log(f"   {cfg}: FAILED {type(e).__name__}: {str(e)[:120]}")
                continue
            r = {"case": name, "cfg": list(cfg), "us": t * 1e3, "x_bf16": t_bf16 / t, "err": err}
            rows.append(r)
            log(f"   {str(cfg):48} {t * 1e3:9.1f} us  x{t_bf16 / t:5.2f} of bf16  err {err:.1e}")

    dec = (0, 1, 2)
    case("M=1 fwd", 1, [("gemv", 1, bn, bk, sp, wp, 3, d) for (bn, bk, sp, wp) in GEMV for d in dec]
         + [K.DEQUANT_CONFIG], "fwd")
    case("M=16 fwd", 16, [("dot", *c, d) for c in DOT16 for d in dec] + [K.DEQUANT_CONFIG], "fwd")
    case("M=4096 fwd", 4096, [("dot", *c, d) for c in DOT_BIG for d in dec] + [K.DEQUANT_CONFIG], "fwd")
    case("M=4096 grad_x", 4096, [(*c, d) for c in GX_BIG for d in dec] + [K.DEQUANT_CONFIG], "gx")
    with open(os.path.join(a.out, "gpu_sweep.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    log("\nbest per case:")
    for c in ("M=1 fwd", "M=16 fwd", "M=4096 fwd", "M=4096 grad_x"):
        rs = sorted((r for r in rows if r["case"] == c and r["err"] < 1e-2), key=lambda r: r["us"])
        for r in rs[:3]:
            log(f"{c:14} {str(tuple(r['cfg'])):48} {r['us']:8.1f} us  x{r['x_bf16']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
