"""The one GPU script: correctness of every shipped kernel config on CUDA, then timings as ratios
measured side by side in the same run. Prepared for a single call on a lent H100/H200: it starts
no new work after `--budget-s` (330 s, 170 with `--quick`; each section stops at its share) and
writes its JSON after every section, so a run cut short still leaves what it measured.

    python3 benchmarks/gpu_check.py --out DIR [--quick] [--sweep] [--budget-s S]
    python3 benchmarks/gpu_check.py --dry-run [--interpret] --out DIR     # CPU rehearsal, not timed

Sections, in this order:
1. Correctness (outputs pre-filled with NaN, LOWBIT_POISON=1, so an unwritten element fails):
   4-bit quantize/dequantize bit-identical to the pure-torch reference run on the CPU (the spec);
   every config of kernels/nf4.py and kernels/intq.py (FORWARD_CONFIGS, GRAD_X_CONFIGS,
   GRAD_SCALE_CONFIGS, and DEQUANT) launched explicitly and compared with float64; the SZ decoder
   bit-identical to the bit-by-bit reference decoder.
2. Timings (triton.testing.do_bench, median, L2 flushed between repetitions): NF4 matmul through
   the public API and through the bare launcher vs torch bf16 (cuBLAS) vs bitsandbytes'
   matmul_4bit when importable, M = 1, 4, 16, 4096 on Llama shapes, grad_x at M = 4096; the int
   family on 8192x8192; SZ decode GB/s; then every shipped config timed on 8192x8192 (what the
   config tables are chosen from; `--sweep` adds the other table-lookup decode methods).

bitsandbytes: the GPU machine cannot install packages. Stage it here with
`bash ../shared/device/stage-anchors.sh` and take `.carry` along (the device tool's `carry`);
this script puts `.carry/site` on sys.path when it exists. Without a lowbit install it imports
lowbit from this checkout (python/, and kernels/ as lowbit.kernels, as setup.py maps them).
Outputs: DIR/gpu_check.log and DIR/gpu_check.json. Exit status: 0 all checks passed, 1 a check
failed or a section crashed, 2 no CUDA device.

`--dry-run` runs every section on tiny CPU shapes through the pure-torch reference (with
`--interpret`: through the Triton launchers in the interpreter, every shipped config), with
one-shot wall-clock "timings" that mean nothing: it checks this script, not the kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (K, N): 7B attn; 70B attn, up, down
MS = (1, 4, 16, 4096)
# Relative Frobenius error vs float64, by activation dtype. Measured on an H100 (2026-11-26 run 3):
# bf16 ~2.3e-3 (bf16 rounding of W tiles and of the output), fp16 ~3e-4, fp32 ~8e-4 (tensor-core
# dots run in tf32: x and W rounded to 10-bit mantissas). Each tolerance is about 4-7x that.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 3e-3}
# M of the checks per config bucket: not a multiple of the tile (the masks run), and specialized
# like the M the timings use (Triton specializes ints on == 1 and % 16 == 0), so the timed runs
# reuse the checked compiles instead of compiling again.
CHECK_M = {1: 1, 4: 3, 16: 16, 64: 48, 256: 208}
BENCH_M = {1: 1, 4: 4, 16: 16, 64: 64, 256: 256}
BIG_CHECK_M, BIG_BENCH_M = 272, 4096


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def dname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def cfg_str(cfg) -> str:
    return f"{type(cfg).__name__}{tuple(cfg)}"


def table_configs(table: dict) -> list:
    """[(bucket, config)] of a config table, in order, each config once."""
    out, seen = [], set()
    for b in sorted(table):
        for c in table[b]:
            if c not in seen:
                seen.add(c)
                out.append((b, c))
    return out


class Run:
    """Log, results, clock. `left(frac)`: seconds left until frac of the budget is used."""

    def __init__(self, out: str, budget_s: float) -> None:
        os.makedirs(out, exist_ok=True)
        self.out, self.budget, self.t0 = out, budget_s, time.time()
        self.logf = open(os.path.join(out, "gpu_check.log"), "w")
        self.res: dict = {"meta": {}, "sections": {}, "checks": []}

    def log(self, s: str) -> None:
        print(s, flush=True)
        self.logf.write(s + "\n")
        self.logf.flush()

    def left(self, frac: float = 1.0) -> float:
        return frac * self.budget - (time.time() - self.t0)

    def record(self, section: str, name: str, ok, err=None, tol=None, note: str = "", **info) -> None:
        self.res["checks"].append({"section": section, "check": name, "ok": ok, "err": err, "tol": tol,
                                   "note": note, **info})
        status = {True: "OK", False: "FAIL", None: "SKIP"}[ok]
        e = "" if err is None else f" err {err:.2e}" + ("" if tol is None else f" (tol {tol:.0e})")
        self.log(f"  {status:4} {name}{e}{' ' + note if note else ''}")

    def save(self) -> None:
        self.res["wall_s"] = time.time() - self.t0
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def section(self, name: str, fn, *args, until: float = 1.0):
        """Run one section; a crash is logged and recorded, the run goes on."""
        t = time.time()
        if self.left(until) <= 0:
            self.log(f"== {name}: skipped (time budget)")
            self.res["sections"][name] = {"status": "skipped (time budget)"}
            return None
        self.log(f"== {name}")
        try:
            out = fn(self, *args, until=until)
            status = "ok"
        except Exception as e:  # keep the other sections' results
            self.log(traceback.format_exc())
            out, status = None, f"error: {type(e).__name__}: {e}"
        self.res["sections"][name] = {"status": status, "seconds": round(time.time() - t, 1)}
        self.log(f"   ({time.time() - t:.0f} s, {time.time() - self.t0:.0f} s in all)")
        self.save()
        return out


class Background:
    """fn() in a daemon thread (a run cut short does not wait for it); result() joins."""

    def __init__(self, fn) -> None:
        self.out, self.err = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.out = fn()
        except BaseException as e:  # re-raised in result()
            self.err = e

    def result(self):
        self.thread.join()
        if self.err is not None:
            raise self.err
        return self.out


class Impl:
    """The implementation under test: the Triton launchers with an explicit config (CUDA, or CPU
    tensors under --interpret), or with kernels=None the registered ops, which on CPU tensors run
    the pure-torch references (configs ignored). Launchers and ops take the same arguments."""

    def __init__(self, kernels=None) -> None:
        from lowbit import _ops

        self.k, self.ops, self.name = kernels, _ops, "reference" if kernels is None else "triton"

    def _call(self, family: str, launcher: str, op: str, *args, cfg=None, has_config: bool = True):
        if self.k is None:
            return getattr(self.ops, op)(*args)
        fn = getattr(getattr(self.k, family), launcher)
        return fn(*args, config=cfg) if has_config else fn(*args)

    def quantize(self, flat, bs, bounds, order):
        return self._call("nf4", "quantize_4bit", "quantize_4bit", flat, bs, bounds, order, has_config=False)

    def dequantize(self, q, dtype):
        a, na, nc, off = q.scale_tensors()
        return self._call("nf4", "dequantize_4bit", "dequantize_4bit", q.codes, a, q.code, q.blocksize, q.numel,
                          dtype, na, nc, off, q.nested_blocksize, has_config=False)

    def fwd(self, x, q, bias, cfg):
        a, na, nc, off = q.scale_tensors()
        return self._call("nf4", "matmul_4bit", "matmul_4bit", x, q.codes, a, q.code, q.blocksize, q.shape[0], na,
                          nc, off, q.nested_blocksize, bias, cfg=cfg)

    def grad_x(self, g, q, cfg):
        a, na, nc, off = q.scale_tensors()
        return self._call("nf4", "matmul_4bit_grad_x", "matmul_4bit_grad_x", g, q.codes, a, q.code, q.blocksize,
                          q.shape[1], na, nc, off, q.nested_blocksize, cfg=cfg)

    def int_fwd(self, x, q, bias, cfg):
        return self._call("intq", "matmul_int", "int_matmul", x, q.codes, q.scale, q.zeros, q.bits, q.group_len,
                          q.shape[0], bias, cfg=cfg)

    def int_grad_x(self, g, q, cfg):
        return self._call("intq", "matmul_int_grad_x", "int_matmul_grad_x", g, q.codes, q.scale, q.zeros, q.bits,
                          q.group_len, q.shape[1], cfg=cfg)

    def int_grad_scale(self, g, x, q, cfg):
        return self._call("intq", "matmul_int_grad_scale", "int_matmul_grad_scale", g, x, q.codes, q.zeros, q.bits,
                          q.group_len, cfg=cfg)

    def sz_decode(self, args, c, dtype):
        return self._call("sz", "sz_decode", "sz_decode", *args, c.numel, c.chunk_size, c.max_len, c.radius, dtype,
                          has_config=False)


class Ctx:
    """What every section needs: the implementation under test, device, sizes, timer, options."""

    def __init__(self, a, impl, kernels, dev: str, bench) -> None:
        self.a, self.impl, self.K, self.dev, self.bench = a, impl, kernels, dev, bench
        small = a.dry_run
        self.check_kn = (1024, 80) if small else (4096, 4144)  # N: multiple of 16, of no BLOCK_N
        self.quant_numel = 3 * 16384 + 17 if small else 4096 * 1024 + 17  # a short last block
        self.sz_check_shape = (32, 256) if small else (128, 1024)
        self.shapes = [(256, 128)] if small else (LLAMA_SHAPES[:2] if a.quick else LLAMA_SHAPES)
        self.ms = (1, 4, 16, 64) if small else MS
        self.big_m = 64 if small else BIG_BENCH_M
        self.int_kn = (1024, 128) if small else (8192, 8192)
        self.sweep_kn = (1024, 128) if small else (8192, 8192)

    def launched(self, fn):
        """fn() and whether it launched a Triton kernel (always True for the reference)."""
        from lowbit.kernels._common import LAUNCHES

        before = sum(LAUNCHES.values())
        out = fn()
        return out, (self.impl.name != "triton" or sum(LAUNCHES.values()) > before)


def guarded(run: Run, section: str, name: str, fn, **info) -> None:
    """fn() -> (ok, err, tol, note); an exception is a failed check, except OutOfResources (a config
    too big for this card in this dtype: the tuner skips it the same way)."""
    try:
        ok, err, tol, note = fn()
    except Exception as e:
        if type(e).__name__ == "OutOfResources":
            ok, err, tol, note = None, None, None, f"OutOfResources ({e}); the tuner skips this config too"
        else:
            ok, err, tol, note = False, None, None, f"{type(e).__name__}: {str(e)[:300]}"
    run.record(section, name, ok, err, tol, note, **info)


# ----------------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------------


def check_quant(run: Run, ctx: Ctx, until: float) -> None:
    """Triton quantize/dequantize vs the reference on the CPU, bit for bit; and the public API."""
    import lowbit
    from lowbit.formats import codebooks
    from lowbit.formats import nf4 as ref

    dtypes = [torch.bfloat16] if ctx.a.quick else [torch.float32, torch.float16, torch.bfloat16]
    for qt in ("nf4", "fp4"):
        bounds, order = codebooks.quantize_bounds(codebooks.code_table(qt))
        for dt in dtypes:
            for bs in ((64,) if (ctx.a.quick or dt != torch.float32) else (64, 4096)):
                if run.left(until) <= 0:
                    return run.log("  (time budget: rest of section skipped)")
                w = torch.randn(ctx.quant_numel, dtype=dt)

                def quant():
                    p1, a1 = ref.quantize_flat(w, bs, bounds, order)
                    (p2, a2), ran = ctx.launched(lambda: ctx.impl.quantize(w.to(ctx.dev), bs, bounds.to(ctx.dev),
                                                                           order.to(ctx.dev)))
                    ok = torch.equal(p1, p2.cpu()) and torch.equal(a1, a2.cpu()) and ran
                    return ok, None, None, "" if ran else "no kernel launched"

                guarded(run, "quantize", f"quantize {qt} {dname(dt)} blocksize={bs}: bytes equal", quant)
                for dq in (True,) if ctx.a.quick else (False, True):
                    q = lowbit.quantize_4bit(w, bs, qt, dq)  # CPU: the reference

                    def deq():
                        want = ref.dequantize_flat(q.codes, q.scales(), q.code, bs, q.numel, dt)
                        got, ran = ctx.launched(lambda: ctx.impl.dequantize(q.to(ctx.dev), dt))
                        return torch.equal(want, got.cpu()) and ran, None, None, "" if ran else "no kernel launched"

                    guarded(run, "quantize", f"dequantize {qt} {dname(dt)} blocksize={bs} double_quant={dq}: "
                            "values equal", deq)
    w = torch.randn(ctx.quant_numel, dtype=torch.bfloat16)

    def api():  # the public functions route to the kernels on the device (no double quant: its offset
        # is a mean, whose last bit may differ between CPU and CUDA reductions)
        bounds, order = codebooks.quantize_bounds(codebooks.code_table("nf4"))
        p1, a1 = ref.quantize_flat(w, 64, bounds, order)
        q2, ran = ctx.launched(lambda: lowbit.quantize_4bit(w.to(ctx.dev), 64, "nf4", False))
        d2, ran2 = ctx.launched(lambda: lowbit.dequantize_4bit(q2))
        ok = torch.equal(p1, q2.codes.cpu()) and torch.equal(a1, q2.absmax.cpu())
        ok = ok and torch.equal(ref.dequantize_flat(p1, a1, q2.code.cpu(), 64, w.numel(), w.dtype), d2.cpu())
        return ok and ran and ran2, None, None, "" if ran and ran2 else "no kernel launched"

    guarded(run, "quantize", "lowbit.quantize_4bit / dequantize_4bit on the device = on the CPU", api)


def check_matmul(run: Run, ctx: Ctx, until: float) -> None:
    """Every shipped config of kernels/nf4.py and kernels/intq.py, launched explicitly, vs float64
    from the reference weight: bf16 activations, NF4 with double quant / int3 in groups of 128. The
    default (first) config of the smallest and the largest M bucket also runs fp16, fp32 and the
    other weight variants (NF4 plain scales; int4 rows, int2 g64)."""
    import lowbit
    from lowbit.formats import intq as int_ref
    from lowbit.formats import nf4 as nf4_ref
    from lowbit.kernels import _common, intq, nf4

    k, n = ctx.check_kn
    w = torch.randn(n, k) * 0.02
    weights = {}  # variant -> (format object on the device, float64 W, float64 Q - z for int)
    for dq in (True, False):
        q = lowbit.quantize_4bit(w, 64, "nf4", dq)  # CPU
        wd = nf4_ref.dequantize_flat(q.codes, q.scales(), q.code, 64, n * k, torch.float32).view(n, k)
        weights["nf4" if dq else "nf4 plain scales"] = (q.to(ctx.dev), wd.double().to(ctx.dev), None)
    for bits, gs in ((3, 128), (4, None), (2, 64)):
        q = lowbit.quantize_int(w, bits, gs)  # CPU
        wd = int_ref.reference_weight(q.codes, q.scale, q.zeros, bits, q.group_len, n, k)
        qz = int_ref.reference_int_weight(q.codes, q.zeros, bits, q.group_len, n, k)
        weights[f"int{bits} group={gs}"] = (q.to(ctx.dev), wd.double().to(ctx.dev), qz.double().to(ctx.dev))
    im = ctx.impl
    plan = [  # (kind, table, function, main variant, other variants)
        ("forward", nf4.FORWARD_CONFIGS, im.fwd, "nf4", ["nf4 plain scales"]),
        ("grad_x", nf4.GRAD_X_CONFIGS, im.grad_x, "nf4", ["nf4 plain scales"]),
        ("forward", intq.FORWARD_CONFIGS, im.int_fwd, "int3 group=128", ["int4 group=None", "int2 group=64"]),
        ("grad_x", intq.GRAD_X_CONFIGS, im.int_grad_x, "int3 group=128", ["int4 group=None", "int2 group=64"]),
        ("grad_scale", {1 << 30: intq.GRAD_SCALE_CONFIGS}, im.int_grad_scale, "int3 group=128", []),
        ("grad_scale", {1 << 30: intq.GRAD_SCALE_CONFIGS_FP32}, im.int_grad_scale, "int3 group=128", []),
    ]

    def one(kind, fn, cfg, m, dt, var):
        q, wd, qz = weights[var]

        def check():
            if kind == "forward":
                if k % (cfg.block_k * cfg.split_k or 1):
                    return None, None, None, "K does not fit this config"
                x = torch.randn(m, k, dtype=dt, device=ctx.dev)
                bias = torch.randn(n, dtype=dt, device=ctx.dev)
                y, ran = ctx.launched(lambda: fn(x, q, bias, cfg))
                want = x.double() @ wd.t() + bias.double()
            elif kind == "grad_x":
                g = torch.randn(m, n, dtype=dt, device=ctx.dev)
                y, ran = ctx.launched(lambda: fn(g, q, cfg))
                want = g.double() @ wd
            else:  # dL/ds[n, group] = sum over the group of (Q - z) * (g^T x)
                g = torch.randn(m, n, dtype=dt, device=ctx.dev)
                x = torch.randn(m, k, dtype=dt, device=ctx.dev)
                y, ran = ctx.launched(lambda: fn(g, x, q, cfg))
                want = (qz * (g.double().t() @ x.double())).view(n, k // q.group_len, q.group_len).sum(-1)
            e = rel_err(y, want)
            ok = e <= TOL[dt] and tuple(y.shape) == tuple(want.shape) and ran
            return ok, e, TOL[dt], "" if ran else "no kernel launched"

        guarded(run, f"{var.split()[0]} {kind}", f"{var} {kind} {cfg_str(cfg)} M={m} K={k} N={n} {dname(dt)}", check,
                config=cfg._asdict(), M=m, dtype=dname(dt))

    todo, extra = [], []  # every config first, then the variants (the first to go if time runs short)
    for kind, table, fn, main, others in plan:
        firsts = {table[min(table)][0], table[max(table)][0]}  # the defaults at the smallest and largest M
        dt = torch.float32 if table is plan[-1][1] else torch.bfloat16
        for b, cfg in table_configs(table) + ([(1 << 30, _common.DEQUANT)] if main == "nf4" else []):
            m = CHECK_M.get(b, BIG_CHECK_M)
            todo.append((kind, fn, cfg, m, dt, main))
            if cfg in firsts and kind != "grad_scale" and not ctx.a.quick:
                extra += [(kind, fn, cfg, m, d, main) for d in (torch.float16, torch.float32)]
                extra += [(kind, fn, cfg, m, torch.bfloat16, v) for v in others]
    for item in todo + extra:
        if run.left(until) <= 0:
            run.log("  (time budget: rest of section skipped)")
            return
        one(*item)


def sz_stream(shape, chunk: int, outliers: bool):
    """N(0, 0.02) fp32 weights (fixed seed), abs bound 2e-3; with `outliers` a few values far past
    the code alphabet, stored as outliers."""
    from lowbit import sz_compress

    w = torch.randn(shape, generator=torch.Generator().manual_seed(chunk)) * 0.02
    if outliers:
        w.view(-1)[::max(1, w.numel() // 7)] = 5.0
    return sz_compress(w, 2e-3, chunk_size=chunk)


def check_sz(run: Run, ctx: Ctx, until: float) -> None:
    """The decoder vs the bit-by-bit reference decoder (the spec), every output dtype."""
    from lowbit.formats import sz as ref

    for chunk in (1024, 256):
        c = sz_stream(ctx.sz_check_shape, chunk, outliers=True)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            def dec():
                want = ref.decode_reference(c, dt).view(-1)
                got, ran = ctx.launched(lambda: ctx.impl.sz_decode(c.decoder_args(ctx.dev), c, dt))
                return torch.equal(want, got.cpu()) and ran, None, None, f"{len(c.outlier_idx)} outliers"

            guarded(run, "sz decode", f"sz decode {ctx.sz_check_shape} chunk={chunk} {dname(dt)}: values equal", dec)


# ----------------------------------------------------------------------------------------------
# 2. Timings
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(ctx: Ctx) -> float | None:
    if ctx.dev != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda").random_(0, 255)  # 512 MiB
    dst = torch.empty_like(src)
    ms = ctx.bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def load_bnb(run: Run):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as e:
        run.log(f"bitsandbytes not importable ({type(e).__name__}: {e}); its column stays empty "
                "(stage it with bash ../shared/device/stage-anchors.sh and carry .carry)")
        return None
    run.res["meta"]["bitsandbytes"] = bnb.__version__
    return bnb, bnbF


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_nf4(run: Run, ctx: Ctx, until: float) -> list:
    import lowbit
    from lowbit import _ops
    from lowbit.kernels import _common

    bnb = load_bnb(run)
    bw = copy_bandwidth(ctx)
    run.res["meta"]["copy_GBps"] = bw
    if bw:
        run.log(f"device-to-device copy bandwidth: {bw:.0f} GB/s")
    rows = run.res.setdefault("nf4", [])
    for k, n in ctx.shapes:
        w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
        q = lowbit.quantize_4bit(w, 64, "nf4", True)
        absmax, nabs, ncode, off = q.scale_tensors()
        if bnb is not None:
            bq, bstate = bnb[1].quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        for m in ctx.ms:
            if run.left(until) <= 0:
                run.log("  (time budget: rest of section skipped)")
                return rows
            x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            lowbit.matmul_4bit(x, q)  # compile + tune outside the timing
            sync(ctx.dev)
            tune_s = time.perf_counter() - t0
            cfg = _common._tuned.get(("fwd", _common.tune_m(m), n, k, x.dtype, True, 64))
            r = {"K": k, "N": n, "M": m, "config": cfg._asdict() if cfg else None, "tune_s": tune_s,
                 "bf16_ms": ctx.bench(lambda: x @ w.t()),
                 "lowbit_ms": ctx.bench(lambda: lowbit.matmul_4bit(x, q)),
                 "launcher_ms": ctx.bench(lambda: ctx.impl.fwd(x, q, None, None)), "bnb_ms": None}
            if bnb is not None:
                try:
                    r["bnb_ms"] = ctx.bench(lambda: bnb[0].matmul_4bit(x, bq.t(), quant_state=bstate))
                except Exception as e:
                    run.log(f"  bitsandbytes failed at M={m}: {type(e).__name__}: {e}")
            moved = q.nbytes + x.numel() * 2 + m * n * 2
            r["x_bf16"] = r["bf16_ms"] / r["lowbit_ms"]
            r["x_bnb"] = r["bnb_ms"] / r["lowbit_ms"] if r["bnb_ms"] else None
            r["GBps"] = moved / (r["lowbit_ms"] * 1e-3) / 1e9
            r["frac_copy_bw"] = r["GBps"] / bw if bw else None
            if m == ctx.big_m:
                g = torch.randn(m, n, device=ctx.dev, dtype=torch.bfloat16)
                def gx():
                    return _ops.matmul_4bit_grad_x(g, q.codes, absmax, q.code, 64, k, nabs, ncode, off, 256)

                gx()
                r["grad_x_ms"], r["grad_x_bf16_ms"] = ctx.bench(gx), ctx.bench(lambda: g @ w)
            rows.append(r)
            run.log(f"  K={k} N={n} M={m}: bf16 {r['bf16_ms']:.4f} ms, lowbit {r['lowbit_ms']:.4f} ms "
                    f"(launcher {r['launcher_ms']:.4f}), bnb {r['bnb_ms'] or float('nan'):.4f} ms, x{r['x_bf16']:.2f} "
                    f"of bf16, config {tuple(cfg) if cfg else None}")
    return rows


def time_int(run: Run, ctx: Ctx, until: float) -> list:
    import lowbit
    from lowbit import _ops

    k, n = ctx.int_kn
    w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
    rows = run.res.setdefault("int", [])
    ms = (ctx.ms[0], ctx.big_m) if ctx.a.quick else ctx.ms
    for bits, gs in ((4, None), (3, 128), (2, 64)):
        q = lowbit.quantize_int(w, bits=bits, group_size=gs, method="rtn")
        wd = lowbit.dequantize_int(q, torch.float32).double()
        for m in ms:
            if run.left(until) <= 0:
                run.log("  (time budget: rest of section skipped)")
                return rows
            x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
            err = rel_err(lowbit.matmul_int(x, q), x.double() @ wd.t())
            r = {"bits": bits, "group": gs, "K": k, "N": n, "M": m, "err": err,
                 "bf16_ms": ctx.bench(lambda: x @ w.t()), "lowbit_ms": ctx.bench(lambda: lowbit.matmul_int(x, q))}
            r["x_bf16"] = r["bf16_ms"] / r["lowbit_ms"]
            if m == ctx.big_m:
                g = torch.randn(m, n, device=ctx.dev, dtype=torch.bfloat16)
                def gx():
                    return _ops.int_matmul_grad_x(g, q.codes, q.scale, q.zeros, q.bits, q.group_len, k)

                gx()
                r["grad_x_ms"], r["grad_x_bf16_ms"] = ctx.bench(gx), ctx.bench(lambda: g @ w)
            rows.append(r)
            run.log(f"  int{bits} group={gs} M={m}: {r['lowbit_ms'] * 1e3:.1f} us vs bf16 {r['bf16_ms'] * 1e3:.1f} us "
                    f"(x{r['x_bf16']:.2f}), rel err {err:.1e}")
    return rows


def time_sz(run: Run, ctx: Ctx, until: float, streams) -> list:
    """Decoded bytes per second (bf16 output), the bare launcher and the public sz_decompress (which
    also copies the stream to the device)."""
    import lowbit
    from lowbit.formats import sz as ref

    rows = run.res.setdefault("sz", [])
    for chunk, (c, compress_s) in streams.result().items():
        if run.left(until) <= 0:
            run.log("  (time budget: rest of section skipped)")
            return rows
        args = c.decoder_args(ctx.dev)
        f = lambda: ctx.impl.sz_decode(args, c, torch.bfloat16)  # noqa: E731
        same = torch.equal(f().cpu(), ref.decode_vectorized(*c.decoder_args(), c.numel, c.chunk_size, c.max_len,
                                                            c.radius, torch.bfloat16))
        ms = ctx.bench(f)
        api_ms = ctx.bench(lambda: lowbit.sz_decompress(c, ctx.dev, torch.bfloat16))
        r = {"shape": list(c.shape), "chunk": chunk, "ms": ms, "decoded_GBps": c.numel * 2 / (ms * 1e-3) / 1e9,
             "api_ms": api_ms, "bits_per_param": c.bits_per_param, "equal_to_vectorized_decoder": same,
             "compress_s": compress_s}
        rows.append(r)
        run.log(f"  sz decode {tuple(c.shape)} chunk={chunk}: {ms * 1e3:.0f} us = {r['decoded_GBps']:.1f} GB/s of bf16 "
                f"(sz_decompress {api_ms * 1e3:.0f} us), {c.bits_per_param:.3f} bits/param, equal to the "
                f"vectorized CPU decoder: {same}")
        if not same:
            run.record("sz decode", f"sz decode {tuple(c.shape)} chunk={chunk} = vectorized decoder", False)
    return rows


def time_configs(run: Run, ctx: Ctx, until: float) -> list:
    """Every shipped config on one shape (bf16), against bf16: the table the config lists come from.
    With --sweep, each nf4 config also with the other table-lookup decodes (0 global gather, 1
    select tree; 2 = tl.gather is shipped)."""
    import lowbit
    from lowbit.kernels import _common, intq, nf4

    k, n = ctx.sweep_kn
    w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
    q4 = lowbit.quantize_4bit(w, 64, "nf4", True)
    qi = lowbit.quantize_int(w, 3, 128)
    wd4, wdi = lowbit.dequantize_4bit(q4, torch.float32).double(), lowbit.dequantize_int(qi, torch.float32).double()
    rows = run.res.setdefault("configs", [])
    small = ctx.a.dry_run

    def bench_m(b):
        m = BENCH_M.get(b, ctx.big_m)
        return min(m, 64) if small else m

    decodes = (0, 1, 2) if ctx.a.sweep else (None,)
    plan = [  # (case, table, fn(x, config), float64 W, x is g [M, N], nf4)
        ("nf4 forward", nf4.FORWARD_CONFIGS, lambda x, c: ctx.impl.fwd(x, q4, None, c), wd4, False, True),
        ("nf4 grad_x", nf4.GRAD_X_CONFIGS, lambda g, c: ctx.impl.grad_x(g, q4, c), wd4, True, True),
        ("int3 g128 forward", intq.FORWARD_CONFIGS, lambda x, c: ctx.impl.int_fwd(x, qi, None, c), wdi, False, False),
        ("int3 g128 grad_x", intq.GRAD_X_CONFIGS, lambda g, c: ctx.impl.int_grad_x(g, qi, c), wdi, True, False),
    ]
    cases = []  # (case, M, config, fn, float64 W, x is g)
    for case, table, fn, wd, is_g, is_nf4 in plan:
        for b, c in table_configs(table):
            for d in decodes if is_nf4 else (None,):
                cases.append((case, bench_m(b), c if d is None else c._replace(decode=d), fn, wd, is_g))
        if is_nf4:  # dequantize + cuBLAS at each bucket's M
            cases += [(case, m, _common.DEQUANT, fn, wd, is_g) for m in sorted({bench_m(b) for b in table})]
    bf16_ms = {}
    for case, m, cfg, fn, wd, is_g in cases:
        if run.left(until) <= 0:
            run.log("  (time budget: rest of section skipped)")
            break
        if k % (cfg.block_k * getattr(cfg, "split_k", 1) or 1):
            run.log(f"  {case} M={m} {cfg_str(cfg)}: K={k} does not fit, not timed")
            continue
        x = torch.randn(m, n if is_g else k, device=ctx.dev, dtype=torch.bfloat16)
        key = (m, is_g)
        if key not in bf16_ms:
            bf16_ms[key] = ctx.bench((lambda: x @ w) if is_g else (lambda: x @ w.t()))
        try:
            err = rel_err(fn(x, cfg), x.double() @ (wd if is_g else wd.t()))
            t = ctx.bench(lambda: fn(x, cfg))
        except Exception as e:
            run.log(f"  {case} M={m} {cfg_str(cfg)}: {type(e).__name__}: {str(e)[:150]}")
            continue
        r = {"case": f"{case} M={m}", "config": cfg._asdict(), "ms": t, "x_bf16": bf16_ms[key] / t, "err": err}
        rows.append(r)
        run.log(f"  {r['case']:24} {str(tuple(cfg)):44} {t * 1e3:9.1f} us  x{r['x_bf16']:5.2f} of bf16  err {err:.1e}")
    run.log("  fastest per case (err < 1e-2):")
    for case in dict.fromkeys(r["case"] for r in rows):
        best = sorted((r for r in rows if r["case"] == case and r["err"] < 1e-2), key=lambda r: r["ms"])[:3]
        for r in best:
            run.log(f"  {case:24} {str(tuple(r['config'].values())):44} {r['ms'] * 1e3:9.1f} us  x{r['x_bf16']:.2f}")
    return rows


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def import_lowbit() -> None:
    """lowbit from an install, else from this checkout: python/ on sys.path and kernels/ as
    lowbit.kernels (what setup.py's package_dir does). Plus .carry/site (staged bitsandbytes)."""
    if importlib.util.find_spec("lowbit") is None:
        sys.path.insert(0, str(REPO / "python"))
    import lowbit

    if importlib.util.find_spec("lowbit.kernels") is None:
        spec = importlib.util.spec_from_file_location("lowbit.kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["lowbit.kernels"] = mod
        spec.loader.exec_module(mod)
        lowbit.kernels = mod
    site = REPO / ".carry" / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))


def summary(run: Run) -> None:
    rows = run.res.get("nf4") or []
    if rows:
        run.log("")
        run.log(f"{'K x N':>13} {'M':>5} {'bf16 ms':>9} {'lowbit ms':>9} {'launch ms':>9} {'bnb ms':>9} {'x bf16':>7} "
                f"{'x bnb':>6} {'GB/s':>6} {'%bw':>5} {'gx/bf16':>7}")
    for r in rows:
        bnb_ms = f"{r['bnb_ms']:.4f}" if r["bnb_ms"] else "-"
        xb = f"{r['x_bnb']:.2f}" if r["x_bnb"] else "-"
        bw = f"{100 * r['frac_copy_bw']:4.0f}%" if r["frac_copy_bw"] else "-"
        gx = f"{r['grad_x_bf16_ms'] / r['grad_x_ms']:.2f}" if r.get("grad_x_ms") else ""
        run.log(f"{r['K']:>6}x{r['N']:<6} {r['M']:>5} {r['bf16_ms']:>9.4f} {r['lowbit_ms']:>9.4f} "
                f"{r['launcher_ms']:>9.4f} {bnb_ms:>9} {r['x_bf16']:>7.2f} {xb:>6} {r['GBps']:>6.0f} {bw:>5} {gx:>7}")
    from lowbit.kernels import _common

    run.res["tuned"] = [{"key": [str(x) for x in key], "config": cfg._asdict()} for key, cfg in _common._tuned.items()]
    for key, cfg in _common._tuned.items():
        run.log(f"tuned {key[0]} M<={key[1]} N={key[2]} K={key[3]} {dname(key[4])}: {tuple(cfg)}")
    checks = run.res["checks"]
    failed = [c for c in checks if c["ok"] is False]
    run.log(f"checks: {sum(c['ok'] is True for c in checks)} ok, {len(failed)} failed, "
            f"{sum(c['ok'] is None for c in checks)} skipped; sections: "
            + ", ".join(f"{k} {v['status']}" for k, v in run.res["sections"].items()))
    for c in failed:
        run.log(f"FAILED: {c['check']} {c['note']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.log / .json ($OUT)")
    p.add_argument("--quick", action="store_true", help="bf16-only checks, two shapes, fewer timings (~2-3 min)")
    p.add_argument("--sweep", action="store_true", help="also time the nf4 configs with decode methods 0 and 1")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new work after this many seconds (330; 170 with --quick; none with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal on tiny shapes; nothing is timed")
    p.add_argument("--tune", action="store_true", help="last: `lowbit tune` for M in 1, 4, 16 on the Llama shapes, "
                   "writing OUT/<card>.json (commit it to kernels/_configs/)")
    p.add_argument("--interpret", action="store_true", help="with --dry-run: the Triton launchers in the interpreter")
    a = p.parse_args(argv)
    if a.interpret and not a.dry_run:
        p.error("--interpret goes with --dry-run")
    if not a.dry_run and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu_check: no CUDA device ({why}; torch {torch.__version__}). This script checks and times the "
              "Triton kernels on a GPU: run it on a CUDA machine, or use --dry-run for the CPU rehearsal.",
              file=sys.stderr)
        return 2
    # Triton reads TRITON_INTERPRET when lowbit.kernels is imported (at decoration time): set it first.
    os.environ["TRITON_INTERPRET"] = "1" if a.interpret else "0"
    if a.interpret:  # the ops route CPU tensors to the kernels too, as they do CUDA tensors
        os.environ["LOWBIT_CPU_BACKEND"] = "triton"
    budget = a.budget_s if a.budget_s is not None else (1e9 if a.dry_run else 170.0 if a.quick else 330.0)
    run = Run(a.out, budget)
    import_lowbit()
    import lowbit
    import triton

    import lowbit.kernels as K

    dev = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        impl = Impl(K if a.interpret else None)

        def bench(fn):  # one call, wall clock: the dry run checks the script, not the speed
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    else:
        from triton.testing import do_bench

        impl = Impl(K)

        def bench(fn):
            return do_bench(fn, warmup=10, rep=60, return_mode="median")

    meta = run.res["meta"]
    meta.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)", torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, lowbit=lowbit.__version__,
                lowbit_path=str(Path(lowbit.__file__).parent), implementation=impl.name, args=vars(a),
                autotune=os.environ.get("LOWBIT_AUTOTUNE", "0"), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    run.log(f"gpu_check: {meta['device']}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton "
            f"{triton.__version__}  lowbit {lowbit.__version__} from {meta['lowbit_path']}  implementation "
            f"{impl.name}  budget {budget:.0f} s{'  DRY RUN: nothing is timed' if a.dry_run else ''}")
    torch.manual_seed(0)
    ctx = Ctx(a, impl, K, dev, bench)
    # SZ streams for the timing compress on the CPU (numpy) while the GPU sections compile and run.
    shape = (64, 256) if a.dry_run else (4096, 4096)
    chunks = (256,) if a.dry_run else (1024,) if a.quick else (4096, 1024)

    def make_streams():
        out = {}
        for chunk in chunks:
            t = time.perf_counter()
            out[chunk] = (sz_stream(shape, chunk, outliers=False), time.perf_counter() - t)
        return out

    streams = Background(make_streams)

    if not a.skip_correctness:
        os.environ["LOWBIT_POISON"] = "1"
        run.section("correctness: 4-bit quantize/dequantize", check_quant, ctx, until=0.15)
        run.section("correctness: nf4 and int matmul configs", check_matmul, ctx, until=0.5)
        run.section("correctness: sz decode", check_sz, ctx, until=0.55)
        os.environ.pop("LOWBIT_POISON")
    run.section("timing: nf4 matmul", time_nf4, ctx, until=0.8)
    run.section("timing: int matmul", time_int, ctx, until=0.88)
    run.section("timing: sz decode", lambda r, c, until: time_sz(r, c, until, streams), ctx, until=0.95)
    if not a.quick:
        run.section("timing: every shipped config", time_configs, ctx, until=1.0)
    if a.tune and not a.dry_run:
        def tune_section(r, c, until):
            from lowbit._tune import tune
            from lowbit.kernels._common import card_name

            table = tune(ms=(1, 4, 16), log=r.log)
            path = os.path.join(a.out, card_name() + ".json")
            with open(path, "w") as f:
                json.dump(table, f, indent=1)
            r.log(f"  wrote {path} ({len(table['entries'])} entries)")
        run.section("tune: per-card config table", tune_section, ctx, until=1.0)
    summary(run)
    run.save()
    crashed = any(s["status"].startswith("error") for s in run.res["sections"].values())
    return 1 if crashed or any(c["ok"] is False for c in run.res["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
