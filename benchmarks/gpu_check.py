"""The one GPU script: correctness of every shipped kernel config on CUDA, then timings as ratios
measured side by side in the same run. Prepared for a single call on a lent H100/H200: it starts
no new work after `--budget-s` (420 s, 200 with `--quick`; each section stops at its share, so the
default run ends within about 7.5 minutes, compiles included) and writes its JSON after every
section, so a run cut short still leaves what it measured.

    python3 benchmarks/gpu_check.py --out DIR [--quick] [--sweep] [--budget-s S]
    python3 benchmarks/gpu_check.py --dry-run [--interpret] --out DIR     # CPU rehearsal, not timed

Sections, in this order:
1. Correctness (outputs pre-filled with NaN, LOWBIT_POISON=1, so an unwritten element fails):
   4-bit quantize/dequantize bit-identical to the pure-torch reference run on the CPU (the spec);
   every config of kernels/nf4.py and kernels/intq.py (FORWARD_CONFIGS, GRAD_X_CONFIGS,
   GRAD_SCALE_CONFIGS, and DEQUANT) launched explicitly and compared with float64; the SZ decoder
   bit-identical to the bit-by-bit reference decoder; block FP4 (kernels/blockfp.py, nvfp4 and
   mxfp4, check_blockfp): dequantize bit-identical to formats.blockfp.dequantize_blockfp, every
   FORWARD_CONFIGS / GRAD_X_CONFIGS config and DEQUANT launched explicitly vs float64 on the
   reference-decoded weight (bf16; then fp16, and the defaults in fp32, as time allows), each with
   its launch counter ("blockfp.words" / ".dot" / ".grad_x" / ".dequantize"); weights with the lowest
   scale bytes (mxfp4 E8M0 0-3, nvfp4 E4M3 0 and subnormals: fp32-subnormal factors, which a
   flush-to-zero path returns as 0) checked on their own output slice; nvfp4 with K = 16 * odd
   (only DEQUANT serves it: the automatic choice must take it).
2. Timings (triton.testing.do_bench, median, L2 flushed between repetitions), what users get:
   runtime autotuning is off (LOWBIT_AUTOTUNE unset), so each call runs the shipped per-card
   table's config or the bucket's first fitting one, and every row records which.
   a. NF4 + double quant, M = 1, 2, 4, 8, 16, 64, 4096 on the Llama shapes: the public API and the
      bare launcher vs torch bf16 (cuBLAS) vs bitsandbytes' matmul_4bit when importable; grad_x
      at M = 4096; GB/s and the fraction of the measured copy bandwidth.
   b. Block FP4, nvfp4 and mxfp4 (time_blockfp): M = 1 on every Llama shape first, then M = 4, 16,
      64, 4096 (one per config bucket); the bare launcher and BlockFPLinear's forward vs lowbit nf4
      (a.'s launcher times, same run) and bf16 at the same shape and M: x_bf16, x_nf4, config,
      GB/s and the fraction of copy bandwidth; grad_x at M = 4096.
   c. The int family (int4 rows, int3 g128, int2 g64), same M and shapes, vs bf16; config, GB/s.
   d. SZ decode GB/s (4096x4096, 8192x8192), and SZLinear's fused decode-GEMV at M = 1 and 4 vs
      decode + cuBLAS vs bf16 on 4096x4096.
   e. A decode loop: a Llama-shaped stack (8 layers, hidden 4096, MLP 11008), one token at a time
      (M = 1, bf16), tokens/s for bf16 nn.Linear, bitsandbytes Linear4bit nf4, lowbit nf4, int4
      and int3 g128, each eager and replayed from a CUDA graph.
   f. vLLM serving: SmolLM2-135M decode tokens/s, bf16 vs lowbit nf4 / int4 / int3 folders
      (benchmarks/vllm_cpu.py --dtype bfloat16), when vLLM and the SmolLM2 package import here (the GPU
      image has neither: the section records the skip and why).
   g. Every shipped config timed on 8192x8192 (what the config tables are chosen from: nf4, int3
      g128, then nvfp4; `--sweep` adds nf4's other table-lookup decode methods). Not with --quick.
3. `--tune` (last): `lowbit tune` on this card, writing OUT/<card>.json.
Each section stops at its deadline, a fraction of the budget (main(): quantize 11%, nf4/int configs
36%, SZ 39%, block FP4 configs 47%, nf4 timing 58%, block FP4 timing 64%, int 74%, SZ 78%, decode
loop 89%, vLLM 92%, every config 100%); one that ends early leaves its time to the next.

bitsandbytes: the GPU machine cannot install packages. Stage it here with
`bash ../shared/device/stage-anchors.sh` and take `.carry` along (the device tool's `carry`);
this script puts `.carry/site` on sys.path when it exists. Without a lowbit install it imports
lowbit from this checkout (python/; kernels/ is lowbit.kernels through the python/lowbit/kernels symlink).
Outputs: DIR/gpu_check.log and DIR/gpu_check.json. Exit status: 0 all checks passed, 1 a check
failed or a section crashed, 2 no CUDA device.

`--dry-run` runs every section on tiny CPU shapes through the pure-torch reference (with
`--interpret`: through the Triton launchers in the interpreter, every shipped config), with
one-shot wall-clock "timings" that mean nothing: it checks this script, not the kernels. (CUDA
graphs do not exist on the CPU: there the eager call stands in for the replay.)
"""

from __future__ import annotations

import argparse
import copy
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
MS = (1, 2, 4, 8, 16, 64, 4096)  # decode (1-16: batch of sequences, speculative drafts), 64, prefill
QUICK_MS = (1, 4, 16, 4096)
INT_VARIANTS = ((4, None), (3, 128), (2, 64))  # (bits, group size): int4 rows, int3 g128, int2 g64
# The decode loop's stack: Llama-2-7B's decoder layer shapes (hidden 4096, MLP 11008), 8 layers =
# 1.6e9 weights, 3.2 GB in bf16: far past L2, so each token streams every weight once, as in decode.
DECODER = {"hidden": 4096, "intermediate": 11008, "layers": 8}
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
BFP_LOW_ROWS = 8  # block FP4 checks: rows (and the first block column) given the lowest scale bytes
BFP_ERR_ROWS = 256  # block FP4 timings: output rows compared with float64 (a sanity check, not the test)


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
    """fn(out) in a daemon thread (a run cut short does not wait for it), filling the dict `out` as
    it goes; wait(timeout) returns what is there by then, so a slow item costs only itself."""

    def __init__(self, fn) -> None:
        self.out: dict = {}
        self.err = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            fn(self.out)
        except BaseException as e:  # re-raised in wait()
            self.err = e

    def wait(self, timeout: float | None = None) -> dict:
        self.thread.join(timeout)
        if self.err is not None:
            raise self.err
        return dict(self.out)


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

    # block FP4: q a QuantBlockFP, `table` its 256-entry fp32 scale table (formats.blockfp.scale_table) on
    # q's device. The reference is the family's own ops (lowbit._blockfp: on CPU tensors the C kernels
    # when built, else the pure-torch reference), not lowbit._ops.
    def _bfp(self, launcher: str, *args, cfg=None, has_config: bool = True):
        if self.k is None:
            from lowbit import _blockfp

            return getattr(_blockfp, launcher)(*args)
        fn = getattr(self.k.blockfp, launcher)
        return fn(*args, config=cfg) if has_config else fn(*args)

    def bfp_dequantize(self, q, table, dtype):
        return self._bfp("dequantize_blockfp", q.packed, q.scales, table, q.block, q.shape[0], q.shape[1], dtype,
                         has_config=False)

    def bfp_fwd(self, x, q, table, bias, cfg):
        return self._bfp("matmul_blockfp", x, q.packed, q.scales, table, q.block, q.shape[0], bias, cfg=cfg)

    def bfp_grad_x(self, g, q, table, cfg):
        return self._bfp("matmul_blockfp_grad_x", g, q.packed, q.scales, table, q.block, q.shape[1], cfg=cfg)


class Ctx:
    """What every section needs: the implementation under test, device, sizes, timer, options."""

    def __init__(self, a, impl, kernels, dev: str, bench) -> None:
        self.a, self.impl, self.K, self.dev, self.bench = a, impl, kernels, dev, bench
        small = a.dry_run
        self.check_kn = (1024, 80) if small else (4096, 4144)  # N: multiple of 16, of no BLOCK_N
        self.quant_numel = 3 * 16384 + 17 if small else 4096 * 1024 + 17  # a short last block
        self.sz_check_shape = (32, 256) if small else (128, 1024)
        self.shapes = [(256, 128)] if small else (LLAMA_SHAPES[:2] if a.quick else LLAMA_SHAPES)
        # M = 1 and 2 and 16 and 64 cover Triton's integer specializations (== 1, % 16) and the buckets.
        self.ms = (1, 2, 16, 64) if small else (QUICK_MS if a.quick else MS)
        self.int_ms = (1, 64) if small and a.quick else (1, 16, BIG_BENCH_M) if a.quick else self.ms
        self.big_m = 64 if small else BIG_BENCH_M
        self.sweep_kn = (1024, 128) if small else (8192, 8192)
        # SZ streams to time, (shape [N, K], sz_compress's chunk_size = most symbols per lane),
        # compressed in the background; the first also serves the fused GEMV. (4096 and 1024 give
        # the same layout on these shapes: choose_layout aims at 256-1024 symbols per lane.)
        self.sz_streams = ([((64, 256), 256)] if small else [((4096, 4096), 4096)] if a.quick
                           else [((4096, 4096), 4096), ((8192, 8192), 4096)])
        self.decoder = dict(hidden=256, intermediate=384, layers=1) if small else DECODER
        # block FP4: M = 1 and one M per config bucket (4, 16, 64, the big M): a subset of nf4's, so the nf4
        # sweep's times serve as its nf4 column; K = 16 * odd for nvfp4's checks (no tile fits: DEQUANT)
        self.bfp_ms = (1, 4, 16, 64) if small else (QUICK_MS if a.quick else (1, 4, 16, 64, BIG_BENCH_M))
        self.bfp_odd_k = 16 * 13 if small else 16 * 65
        self.bf16_cache: dict = {}  # (K, N, M) -> bf16 ms: the nf4, block FP4 and int sweeps share their baseline
        self.nf4_cache: dict = {}  # (K, N, M) -> nf4 bare-launcher ms (the nf4 sweep's), block FP4's nf4 column
        self.bnb_memo = False  # load_bnb's memo (False: not tried yet)

    def launched(self, fn, counter: str | None = None):
        """fn() and whether it launched a Triton kernel (with `counter`: that launch counter's kernel,
        e.g. "blockfp.words"); always True for the reference."""
        from lowbit.kernels._common import LAUNCHES

        def count():
            return LAUNCHES[counter] if counter else sum(LAUNCHES.values())

        before = count()
        out = fn()
        return out, (self.impl.name != "triton" or count() > before)


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
                # the launchers refuse an explicit config that does not serve the call (ValueError)
                if var.startswith("nf4"):
                    fits = cfg.kind == "dequant" or nf4._fits_forward(cfg, m, k, dt, 64)
                else:
                    fits = intq._fits_forward(cfg, m, k, q.bits, q.group_len, dt)
                if not fits:
                    return None, None, None, "this config does not serve this shape / dtype"
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


# -- block FP4 -------------------------------------------------------------------------------------


def blockfp_low_scales(q):
    """`q` with the lowest scale bytes of its format in its first BFP_LOW_ROWS rows (every block) and in
    its first block column (every row), cycling: mxfp4 E8M0 bytes 0-3 (factors 2^-127 .. 2^-124, fp32
    subnormals, as are many of their products); nvfp4 E4M3 byte 0 (factor 0) and the E4M3 subnormals 1-7
    (m/8 * 2^-6) with the global scale set to 2^120, so that their factors m * 2^-129 are fp32 subnormals
    too (every product a multiple of 2^-133: exact in bf16, not representable in fp16). A GPU path that
    flushes subnormals to zero returns 0 there (docs/blockfp.md, "For kernel and layer authors"). The
    result passes formats.blockfp.validate: a legal weight, not a corrupted one."""
    from lowbit.formats import blockfp as bfp

    n, nb = q.scales.shape
    low = torch.arange(4 if q.quant_type == "mxfp4" else 8, dtype=torch.uint8)
    s = q.scales.clone()
    r = min(BFP_LOW_ROWS, n)
    s[:r] = low[(torch.arange(r)[:, None] + torch.arange(nb)[None, :]) % len(low)]
    s[:, 0] = low[torch.arange(n) % len(low)]
    g = None if q.quant_type == "mxfp4" else torch.tensor(2.0 ** 120, dtype=torch.float32)
    out = bfp.QuantBlockFP(q.quant_type, q.shape, q.packed, s, g)
    bfp.validate(out, "low-scale weight")
    return out


def bfp_counter(kind: str, cfg) -> str:
    """The launch counter that proves `cfg` ran (None: the automatic choice, checked here only where
    nothing but DEQUANT serves the call)."""
    from lowbit.kernels import _common

    if cfg is None or cfg == _common.DEQUANT:
        return "blockfp.dequantize"
    return "blockfp.grad_x" if kind == "grad_x" else f"blockfp.{cfg.kind}"


def check_blockfp(run: Run, ctx: Ctx, until: float) -> None:
    """Block FP4 (kernels/blockfp.py), nvfp4 and mxfp4, in priority order (the section's deadline cuts
    the tail): (1) dequantize bit for bit against formats.blockfp.dequantize_blockfp on the CPU (bf16, then
    fp32 and fp16) for every weight below; (2) the low-scale-byte weights (blockfp_low_scales; bf16 only,
    no bias), the M = 1 and M <= 4 words defaults, the largest bucket's dot default and DEQUANT, grad_x's
    largest-bucket default and DEQUANT, the error also measured on the low-scale slice alone (rows for
    the forward, the first block column for grad_x), where it is not lost in the norm of the rest (the
    words GEMV, fp32 in the kernel: the plain tolerance; the dot tiles and DEQUANT, which hand the
    rounded weight to the matmul unit: the plain tolerance plus what torch's own matmul of that weight
    loses on this machine, logged beside it); (3) nvfp4 with K = 16 * odd (no tile fits, DEQUANT is the
    only path): the automatic choice and DEQUANT, forward and grad_x; (4) every config of FORWARD_CONFIGS
    and GRAD_X_CONFIGS, and DEQUANT, launched explicitly, both quant types, bf16; (5) not --quick: the
    same in fp16, then the defaults in fp32. Matmuls vs float64 on the reference-decoded weight (N(0, 0.02)
    quantized on the device, decoded by formats.blockfp on the CPU); each check also needs its kernel's
    launch counter ("blockfp.words" / ".dot" / ".grad_x" / ".dequantize") to move."""
    from lowbit.formats import blockfp as bfp
    from lowbit.kernels import _common, blockfp

    k, n = ctx.check_kn
    w = torch.randn(n, k) * 0.02
    weights = {}  # name -> (QuantBlockFP on the device, its scale table there, float64 W there, CPU QuantBlockFP)

    def add(name, q):  # q on the CPU: W decoded by the reference there
        qd = q.to(ctx.dev)
        weights[name] = (qd, bfp.scale_table(qd), bfp.dequantize_blockfp(q, torch.float32).double().to(ctx.dev), q)

    def quantize(w, qt):  # on the device (seconds on the CPU at this size), the bytes back on the CPU
        return bfp.quantize_blockfp(w.to(ctx.dev), qt).to("cpu")

    for qt in ("nvfp4", "mxfp4"):
        q = quantize(w, qt)
        add(qt, q)
        add(f"{qt} low scale bytes", blockfp_low_scales(q))
    odd = f"nvfp4 K=16*{ctx.bfp_odd_k // 16}"
    add(odd, quantize(torch.randn(n, ctx.bfp_odd_k) * 0.02, "nvfp4"))

    def deq(name, dt):
        q, table, _, qc = weights[name]

        def check():
            want = bfp.dequantize_blockfp(qc, dt)
            got, ran = ctx.launched(lambda: ctx.impl.bfp_dequantize(q, table, dt), "blockfp.dequantize")
            got = got.cpu()
            same = torch.equal(want, got) and got.dtype == dt
            note = "" if ran else "no blockfp.dequantize launch"
            if not same and got.shape == want.shape:
                diff = ~((want == got) | (want.isnan() & got.isnan()))
                sub = diff & (want != 0) & (want.float().abs() < torch.finfo(torch.float32).tiny)
                note += (f" {int(diff.sum())} elements differ ({int(sub.sum())} where the reference is an fp32 "
                         f"subnormal; {int((diff & (got == 0)).sum())} returned 0)")
            return same and ran, None, None, note.strip()

        guarded(run, "blockfp dequantize", f"blockfp dequantize {name} {q.shape[0]}x{q.shape[1]} {dname(dt)}: "
                "values equal", check, quant_type=q.quant_type, dtype=dname(dt))

    def one(kind, cfg, m, dt, name):
        q, table, wd, _ = weights[name]
        kk = q.shape[1]
        low = "low scale" in name
        counter = bfp_counter(kind, cfg)

        def check():
            if kind == "forward":
                # the launcher refuses an explicit config that does not serve the call (ValueError)
                if cfg is not None and cfg.kind != "dequant" and not blockfp._fits_forward(cfg, m, kk, q.block):
                    return None, None, None, "this config does not serve this shape"
                x = torch.randn(m, kk, dtype=dt, device=ctx.dev)
                bias = None if low else torch.randn(n, dtype=dt, device=ctx.dev)
                y, ran = ctx.launched(lambda: ctx.impl.bfp_fwd(x, q, table, bias, cfg), counter)
                want = x.double() @ wd.t()
                if bias is not None:
                    want = want + bias.double()
                part = (y[:, :BFP_LOW_ROWS], want[:, :BFP_LOW_ROWS], "rows")
                platform = lambda: (x @ wd.to(dt).t())[:, :BFP_LOW_ROWS]  # noqa: E731
            else:
                if cfg is not None and cfg != _common.DEQUANT and not blockfp._fits_grad_x(cfg, kk):
                    return None, None, None, "this config does not serve this shape"
                g = torch.randn(m, n, dtype=dt, device=ctx.dev)
                y, ran = ctx.launched(lambda: ctx.impl.bfp_grad_x(g, q, table, cfg), counter)
                want = g.double() @ wd
                part = (y[:, :q.block], want[:, :q.block], "first block column")
                platform = lambda: (g @ wd.to(dt))[:, :q.block]  # noqa: E731
            e, tol = rel_err(y, want), TOL[dt]
            ok = e <= tol and tuple(y.shape) == tuple(want.shape) and y.dtype == dt and ran
            note = "" if ran else f"no {counter} launch"
            if low:  # the low-scale slice alone: its values are ~1e-36, nothing next to the rest's norm
                e_low = rel_err(part[0], part[1])
                note += f" low-scale {part[2]} err {e_low:.1e}"
                if torch.isfinite(part[0]).all() and not part[0].any():
                    note += " (all zero: flushed to zero?)"
                if kind == "grad_x" or cfg.kind != "words":
                    # The dot tiles and DEQUANT round W to the activation dtype and multiply on the matmul
                    # unit (tensor cores, cuBLAS; on the CPU oneDNN's bf16 dot flushes subnormal inputs),
                    # so they may lose what torch's own matmul of the same rounded weight loses, not more.
                    # The words GEMV multiplies in fp32 in the kernel: the plain tolerance.
                    e_plat = rel_err(platform(), part[1])
                    note += f", torch {dname(dt)} matmul of the rounded weight {e_plat:.1e}"
                    tol = TOL[dt] + e_plat
                ok = ok and e_low <= tol
                e = max(e, e_low)
            return ok, e, tol, note.strip()

        guarded(run, f"blockfp {kind}", f"{name} {kind} {cfg_str(cfg) if cfg is not None else 'automatic choice'} "
                f"M={m} K={kk} N={n} {dname(dt)}", check, config=None if cfg is None else cfg._asdict(), M=m,
                dtype=dname(dt), quant_type=q.quant_type)

    fwd, gx = blockfp.FORWARD_CONFIGS, blockfp.GRAD_X_CONFIGS
    bf16, dq, big = torch.bfloat16, _common.DEQUANT, 1 << 30
    dts = (bf16,) if ctx.a.quick else (bf16, torch.float32, torch.float16)
    todo = [lambda nm=nm, d=d: deq(nm, d) for d in dts for nm in weights]  # (1)
    for qt in ("nvfp4", "mxfp4"):  # (2)
        nm = f"{qt} low scale bytes"
        todo += [lambda a=a, nm=nm: one(*a, nm) for a in (
            ("forward", fwd[1][0], 1, bf16), ("forward", fwd[4][0], CHECK_M[4], bf16),
            ("forward", fwd[max(fwd)][0], BIG_CHECK_M, bf16), ("forward", dq, BIG_CHECK_M, bf16),
            ("grad_x", gx[max(gx)][0], BIG_CHECK_M, bf16), ("grad_x", dq, BIG_CHECK_M, bf16))]
    todo += [lambda a=a: one(*a, odd) for a in (  # (3)
        ("forward", None, 1, bf16), ("forward", None, BIG_CHECK_M, bf16), ("forward", dq, CHECK_M[16], bf16),
        ("grad_x", None, BIG_CHECK_M, bf16), ("grad_x", dq, CHECK_M[16], bf16))]
    every = [("forward", cfg, CHECK_M.get(b, BIG_CHECK_M)) for b, cfg in table_configs(fwd) + [(big, dq)]]
    every += [("grad_x", cfg, CHECK_M.get(b, BIG_CHECK_M)) for b, cfg in table_configs(gx) + [(big, dq)]]
    for dt in (bf16,) if ctx.a.quick else (bf16, torch.float16):  # (4), (5)
        todo += [lambda kind=kind, cfg=cfg, m=m, dt=dt, qt=qt: one(kind, cfg, m, dt, qt)
                 for qt in ("nvfp4", "mxfp4") for kind, cfg, m in every]
    if not ctx.a.quick:  # (5) the defaults at the smallest and largest bucket, fp32 (tf32 dots)
        firsts = [("forward", fwd[min(fwd)][0], 1), ("forward", fwd[max(fwd)][0], BIG_CHECK_M),
                  ("grad_x", gx[min(gx)][0], CHECK_M[16]), ("grad_x", gx[max(gx)][0], BIG_CHECK_M)]
        todo += [lambda kind=kind, cfg=cfg, m=m, qt=qt: one(kind, cfg, m, torch.float32, qt)
                 for qt in ("nvfp4", "mxfp4") for kind, cfg, m in firsts]
    for item in todo:
        if run.left(until) <= 0:
            run.log("  (time budget: rest of section skipped)")
            return
        item()


# ----------------------------------------------------------------------------------------------
# 2. Timings
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(run: Run, ctx: Ctx) -> float | None:
    """Device-to-device copy GB/s (bytes read + written), measured once per run: the yardstick of
    every GB/s column (a weight-streaming kernel can at best move bytes this fast)."""
    meta = run.res["meta"]
    if "copy_GBps" not in meta:
        bw = None
        if ctx.dev == "cuda":
            src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda").random_(0, 255)  # 512 MiB
            dst = torch.empty_like(src)
            bw = 2 * src.numel() / (ctx.bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
            del src, dst
            run.log(f"device-to-device copy bandwidth: {bw:.0f} GB/s")
        meta["copy_GBps"] = bw
    return meta["copy_GBps"]


def add_bandwidth(r: dict, nbytes: int, ms: float, bw: float | None) -> None:
    """r["GBps"]: bytes moved (packed weight + x + y) per second of the lowbit call; r["frac_copy_bw"]:
    that over the copy bandwidth."""
    r["GBps"] = nbytes / (ms * 1e-3) / 1e9
    r["frac_copy_bw"] = r["GBps"] / bw if bw else None


def bf16_time(ctx: Ctx, x: torch.Tensor, w: torch.Tensor) -> float:
    """x @ w.t() in bf16 (cuBLAS), once per (K, N, M) in a run: the nf4 and int sweeps share it."""
    key = (w.shape[1], w.shape[0], x.shape[0])
    if key not in ctx.bf16_cache:
        ctx.bf16_cache[key] = ctx.bench(lambda: x @ w.t())
    return ctx.bf16_cache[key]


def load_bnb(run: Run, ctx: Ctx):
    """(bitsandbytes, bitsandbytes.functional), or None when not importable (logged once)."""
    if ctx.bnb_memo is False:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbF

            run.res["meta"]["bitsandbytes"] = bnb.__version__
            ctx.bnb_memo = bnb, bnbF
        except Exception as e:
            run.log(f"bitsandbytes not importable ({type(e).__name__}: {e}); its columns stay empty "
                    "(stage it with bash ../shared/device/stage-anchors.sh and carry .carry)")
            run.res["meta"]["bitsandbytes"] = None
            ctx.bnb_memo = None
    return ctx.bnb_memo


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def first_call(ctx: Ctx, fn):
    """fn() once outside any timing (the compile, and the config choice), and its seconds."""
    t0 = time.perf_counter()
    out = fn()
    sync(ctx.dev)
    return out, time.perf_counter() - t0


def out_of_time(run: Run, until: float) -> bool:
    if run.left(until) <= 0:
        run.log("  (time budget: rest of section skipped)")
        return True
    return False


def time_nf4(run: Run, ctx: Ctx, until: float) -> list:
    """NF4 with double quant (blocksize 64) at every M on every shape: lowbit's public API and its
    bare launcher vs bf16 (cuBLAS) vs bitsandbytes' matmul_4bit; the config used; grad_x at big M."""
    import lowbit
    from lowbit import _ops
    from lowbit.kernels import _common

    bnb = load_bnb(run, ctx)
    bw = copy_bandwidth(run, ctx)
    rows = run.res.setdefault("nf4", [])
    for k, n in ctx.shapes:
        w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
        q = lowbit.quantize_4bit(w, 64, "nf4", True)
        absmax, nabs, ncode, off = q.scale_tensors()
        if bnb is not None:
            bq, bstate = bnb[1].quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        for m in ctx.ms:
            if out_of_time(run, until):
                return rows
            x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
            _, first_s = first_call(ctx, lambda: lowbit.matmul_4bit(x, q))
            cfg = _common._tuned.get(("fwd", _common.tune_m(m), n, k, x.dtype, True, 64))
            r = {"K": k, "N": n, "M": m, "config": cfg._asdict() if cfg else None, "first_call_s": first_s,
                 "bf16_ms": bf16_time(ctx, x, w),
                 "lowbit_ms": ctx.bench(lambda: lowbit.matmul_4bit(x, q)),
                 "launcher_ms": ctx.bench(lambda: ctx.impl.fwd(x, q, None, None)), "bnb_ms": None}
            if bnb is not None:
                try:
                    r["bnb_ms"] = ctx.bench(lambda: bnb[0].matmul_4bit(x, bq.t(), quant_state=bstate))
                except Exception as e:
                    run.log(f"  bitsandbytes failed at M={m}: {type(e).__name__}: {e}")
            r["x_bf16"] = r["bf16_ms"] / r["lowbit_ms"]
            r["x_bnb"] = r["bnb_ms"] / r["lowbit_ms"] if r["bnb_ms"] else None
            ctx.nf4_cache[(k, n, m)] = r["launcher_ms"]
            add_bandwidth(r, q.nbytes + x.numel() * 2 + m * n * 2, r["lowbit_ms"], bw)
            if m == ctx.big_m:
                g = torch.randn(m, n, device=ctx.dev, dtype=torch.bfloat16)
                def gx():
                    return _ops.matmul_4bit_grad_x(g, q.codes, absmax, q.code, 64, k, nabs, ncode, off, 256)

                gx()
                r["grad_x_ms"], r["grad_x_bf16_ms"] = ctx.bench(gx), ctx.bench(lambda: g @ w)
            rows.append(r)
            run.log(f"  K={k} N={n} M={m}: bf16 {r['bf16_ms']:.4f} ms, lowbit {r['lowbit_ms']:.4f} ms "
                    f"(launcher {r['launcher_ms']:.4f}), bnb {r['bnb_ms'] or float('nan'):.4f} ms, x{r['x_bf16']:.2f} "
                    f"of bf16, {r['GBps']:.0f} GB/s, config {tuple(cfg) if cfg else None}")
    return rows


def time_blockfp(run: Run, ctx: Ctx, until: float) -> list:
    """nvfp4 and mxfp4 (BlockFPLinear.from_linear of a bf16 N(0, 0.02) weight), M = 1 on every shape first,
    then M = 4, 16, 64 and the big M (one M per config bucket; --quick: nf4's quick M) shape by shape,
    side by side with lowbit nf4 + double quant (its bare launcher: the nf4 sweep's time in this run,
    else timed here) and bf16 (cuBLAS; shared with the nf4 sweep) at the same K, N, M. Timed: the bare
    launcher (config None: the shipped table's config or the bucket's first that fits, recorded) and the
    layer's forward (what users get; for nvfp4 it also divides its 256-entry scale table by the global
    scale per call). x_bf16 and x_nf4 = other time / launcher time (> 1: block FP4 faster); GB/s and the
    fraction of copy bandwidth from the launcher's time; rel err on the first output rows vs float64;
    grad_x (the op) vs bf16 at the big M."""
    import lowbit
    from lowbit import _blockfp
    from lowbit.formats import blockfp as bfp
    from lowbit.kernels import _common

    bw = copy_bandwidth(run, ctx)
    rows = run.res.setdefault("blockfp", [])
    built: dict = {}  # (K, N) -> {"w": bf16 W, qt: (layer, q, scale table, float64 head rows of W), "nf4": q}

    def build(k, n):
        if (k, n) not in built:
            w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
            lin = torch.nn.Linear(k, n, bias=False, device=ctx.dev, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            d = {"w": w}
            h = min(n, BFP_ERR_ROWS)
            for qt in ("nvfp4", "mxfp4"):
                layer = lowbit.BlockFPLinear.from_linear(lin, quant_type=qt)
                q = layer.quantized_weight
                head = bfp.QuantBlockFP(qt, (h, k), q.packed[:h], q.scales[:h], q.global_scale)
                d[qt] = (layer, q, bfp.scale_table(q), bfp.dequantize_blockfp(head, torch.float32).double())
            built[(k, n)] = d
        return built[(k, n)]

    first, rest = ctx.bfp_ms[0], ctx.bfp_ms[1:]
    order = [(k, n, first) for k, n in ctx.shapes] + [(k, n, m) for k, n in ctx.shapes for m in rest]
    with torch.no_grad():
        for k, n, m in order:
            if out_of_time(run, until):
                return rows
            d = build(k, n)
            x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
            nf4_ms, nf4_src = ctx.nf4_cache.get((k, n, m)), "nf4 sweep"
            if nf4_ms is None:  # the nf4 sweep did not time this K, N, M (cut short, or not its M)
                if "nf4" not in d:
                    d["nf4"] = lowbit.quantize_4bit(d["w"], 64, "nf4", True)
                q4 = d["nf4"]
                first_call(ctx, lambda: ctx.impl.fwd(x, q4, None, None))
                nf4_ms, nf4_src = ctx.bench(lambda: ctx.impl.fwd(x, q4, None, None)), "timed here"
            bf16_ms = bf16_time(ctx, x, d["w"])
            for qt in ("nvfp4", "mxfp4"):
                if out_of_time(run, until):
                    return rows
                layer, q, table, head = d[qt]
                y, first_s = first_call(ctx, lambda: ctx.impl.bfp_fwd(x, q, table, None, None))
                cfg = _common._tuned.get(("bfp_fwd", _common.tune_m(m), n, k, x.dtype, q.block))
                r = {"quant_type": qt, "K": k, "N": n, "M": m, "config": cfg._asdict() if cfg else None,
                     "first_call_s": first_s, "err": rel_err(y[:, :head.shape[0]], x.double() @ head.t()),
                     "bits_per_param": q.bits_per_param(), "bf16_ms": bf16_ms, "nf4_ms": nf4_ms,
                     "nf4_source": nf4_src,
                     "launcher_ms": ctx.bench(lambda: ctx.impl.bfp_fwd(x, q, table, None, None)),
                     "layer_ms": ctx.bench(lambda: layer(x))}
                r["x_bf16"] = r["bf16_ms"] / r["launcher_ms"]
                r["x_nf4"] = r["nf4_ms"] / r["launcher_ms"]
                r["layer_x_bf16"] = r["bf16_ms"] / r["layer_ms"]
                add_bandwidth(r, q.nbytes + x.numel() * 2 + m * n * 2, r["launcher_ms"], bw)
                if m == ctx.big_m:
                    g = torch.randn(m, n, device=ctx.dev, dtype=torch.bfloat16)

                    def gx():
                        return _blockfp.matmul_blockfp_grad_x(g, q.packed, q.scales, table, q.block, k)

                    gx()
                    r["grad_x_ms"], r["grad_x_bf16_ms"] = ctx.bench(gx), ctx.bench(lambda: g @ d["w"])
                rows.append(r)
                run.log(f"  {qt} K={k} N={n} M={m}: launcher {r['launcher_ms'] * 1e3:.1f} us (layer "
                        f"{r['layer_ms'] * 1e3:.1f}) vs bf16 {bf16_ms * 1e3:.1f} us (x{r['x_bf16']:.2f}) vs nf4 "
                        f"{nf4_ms * 1e3:.1f} us (x{r['x_nf4']:.2f}, {nf4_src}), {r['GBps']:.0f} GB/s, rel err "
                        f"{r['err']:.1e}, config {tuple(cfg) if cfg else None}")
    return rows


def time_int(run: Run, ctx: Ctx, until: float) -> list:
    """int4 rows, int3 g128, int2 g64 (RTN) at every M on every shape: lowbit.matmul_int vs bf16,
    with the config it used (the shipped table's, else the bucket's first that fits: at M = 1 the
    "words" GEMV), GB/s and the fraction of copy bandwidth; grad_x at the big M."""
    import lowbit
    from lowbit import _ops
    from lowbit.kernels import _common

    bw = copy_bandwidth(run, ctx)
    rows = run.res.setdefault("int", [])
    for k, n in ctx.shapes:  # shapes outside, so a budget cut keeps whole shapes
        w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
        for bits, gs in INT_VARIANTS:
            if out_of_time(run, until):
                return rows
            q = lowbit.quantize_int(w, bits=bits, group_size=gs, method="rtn")
            wd = lowbit.dequantize_int(q, torch.float32).double()
            for m in ctx.int_ms:
                if out_of_time(run, until):
                    return rows
                x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
                y, first_s = first_call(ctx, lambda: lowbit.matmul_int(x, q))
                err = rel_err(y, x.double() @ wd.t())
                cfg = _common._tuned.get(("int_fwd", _common.tune_m(m), n, k, x.dtype, bits, q.group_len))
                r = {"bits": bits, "group": gs, "K": k, "N": n, "M": m, "config": cfg._asdict() if cfg else None,
                     "first_call_s": first_s, "err": err, "bf16_ms": bf16_time(ctx, x, w),
                     "lowbit_ms": ctx.bench(lambda: lowbit.matmul_int(x, q))}
                r["x_bf16"] = r["bf16_ms"] / r["lowbit_ms"]
                add_bandwidth(r, q.nbytes + x.numel() * 2 + m * n * 2, r["lowbit_ms"], bw)
                if m == ctx.big_m:
                    g = torch.randn(m, n, device=ctx.dev, dtype=torch.bfloat16)
                    def gx():
                        return _ops.int_matmul_grad_x(g, q.codes, q.scale, q.zeros, q.bits, q.group_len, k)

                    gx()
                    r["grad_x_ms"], r["grad_x_bf16_ms"] = ctx.bench(gx), ctx.bench(lambda: g @ w)
                rows.append(r)
                run.log(f"  int{bits} group={gs} K={k} N={n} M={m}: {r['lowbit_ms'] * 1e3:.1f} us vs bf16 "
                        f"{r['bf16_ms'] * 1e3:.1f} us (x{r['x_bf16']:.2f}), {r['GBps']:.0f} GB/s, rel err {err:.1e}, "
                        f"config {tuple(cfg) if cfg else None}")
    return rows


def time_sz(run: Run, ctx: Ctx, until: float, streams: Background) -> list:
    """Decoded bytes per second (bf16 output), the bare launcher and the public sz_decompress (which
    also copies the stream to the device); then SZLinear's forward at M = 1 and 4 (the fused
    decode-GEMV, lowbit._ops.sz_matmul) vs decode + cuBLAS (what it does past M = 16) vs bf16."""
    import lowbit
    from lowbit import _ops
    from lowbit.formats import sz as ref
    from lowbit.kernels._common import LAUNCHES

    rows = run.res.setdefault("sz", [])
    # The streams compress on the CPU in the background; wait for them no longer than this
    # section's share allows (less ~10 s for the GEMV part): a late stream is left out, logged.
    ready = streams.wait(max(0.0, run.left(until) - 10))
    for key in ctx.sz_streams:
        if key not in ready:
            run.log(f"  sz stream {key[0]} chunk={key[1]}: not compressed in time, not timed")
            continue
        if out_of_time(run, until):
            return rows
        c, compress_s = ready[key]
        args = c.decoder_args(ctx.dev)
        f = lambda: ctx.impl.sz_decode(args, c, torch.bfloat16)  # noqa: E731
        same = torch.equal(f().cpu(), ref.decode_vectorized(*c.decoder_args(), c.numel, c.chunk_size, c.max_len,
                                                            c.radius, torch.bfloat16))
        ms = ctx.bench(f)
        api_ms = ctx.bench(lambda: lowbit.sz_decompress(c, ctx.dev, torch.bfloat16))
        r = {"shape": list(c.shape), "chunk_size_arg": key[1], "chunk": c.chunk_size, "lanes": c.lanes, "ms": ms,
             "decoded_GBps": c.numel * 2 / (ms * 1e-3) / 1e9, "api_ms": api_ms, "bits_per_param": c.bits_per_param,
             "equal_to_vectorized_decoder": same, "compress_s": compress_s}
        rows.append(r)
        run.log(f"  sz decode {tuple(c.shape)} (chunks of {c.chunk_size}, {c.lanes} lanes): {ms * 1e3:.0f} us = "
                f"{r['decoded_GBps']:.1f} GB/s of bf16 (sz_decompress {api_ms * 1e3:.0f} us), {c.bits_per_param:.3f} "
                f"bits/param, equal to the vectorized CPU decoder: {same}")
        if not same:
            run.record("sz decode", f"sz decode {tuple(c.shape)} = vectorized decoder", False)

    gemv = run.res.setdefault("sz_gemv", [])
    if ctx.sz_streams[0] not in ready:
        return rows
    c = ready[ctx.sz_streams[0]][0]
    n, k = c.shape
    layer = lowbit.SZLinear(k, n, bias=False, device=ctx.dev, error_bound=c.error_bound, mode=c.mode,
                            chunk_size=ctx.sz_streams[0][1])
    layer.load_sz(c, verify=False)
    wb = layer.dequantized_weight(torch.bfloat16)  # the bf16 baseline's weight
    wd = layer.dequantized_weight(torch.float32).double()
    dec_args = (layer.payload, layer.lane_start, layer.table, layer.step, layer.outlier_idx, layer.outlier_val)

    def decode_cublas(x):  # what SZLinear does without the fused kernel: decode W, then F.linear
        w = _ops.sz_decode(*dec_args, n * k, c.chunk_size, c.max_len, c.radius, x.dtype)
        return torch.nn.functional.linear(x, w.view(n, k))

    with torch.no_grad():
        for m in (1, 4):
            if out_of_time(run, until):
                break
            x = torch.randn(m, k, device=ctx.dev, dtype=torch.bfloat16)
            before = LAUNCHES["sz.gemv"]
            y = layer(x)
            fused = LAUNCHES["sz.gemv"] > before  # did forward take the fused route?
            r = {"shape": [n, k], "chunk": c.chunk_size, "M": m, "fused_gemv": fused,
                 "err": rel_err(y, x.double() @ wd.t()),
                 "sz_linear_ms": ctx.bench(lambda: layer(x)), "decode_cublas_ms": ctx.bench(lambda: decode_cublas(x)),
                 "bf16_ms": ctx.bench(lambda: x @ wb.t())}
            r["x_decode_cublas"] = r["decode_cublas_ms"] / r["sz_linear_ms"]
            r["x_bf16"] = r["bf16_ms"] / r["sz_linear_ms"]
            gemv.append(r)
            run.log(f"  SZLinear {n}x{k} M={m} ({'fused GEMV' if fused else 'NOT fused'}): "
                    f"{r['sz_linear_ms'] * 1e3:.1f} us; decode + cuBLAS {r['decode_cublas_ms'] * 1e3:.1f} us "
                    f"(x{r['x_decode_cublas']:.2f}); bf16 {r['bf16_ms'] * 1e3:.1f} us (x{r['x_bf16']:.2f}); "
                    f"rel err {r['err']:.1e}")
    return rows


# -- the decode loop -----------------------------------------------------------------------------


class DecoderLayer(torch.nn.Module):
    """The seven linear layers of a Llama decoder layer (transformers' names, so replace_linear and
    the bitsandbytes swap see what they see in a real checkpoint), RMSNorms and the SwiGLU MLP,
    around a trivial attention: one token and no KV cache, so softmax over its single score is 1
    and attention returns v. What the stack measures is the linear layers as decode runs them."""

    def __init__(self, hidden: int, intermediate: int, device, dtype) -> None:
        super().__init__()

        def lin(i, o):
            return torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype)

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(hidden, hidden) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, intermediate), lin(hidden, intermediate), \
            lin(intermediate, hidden)
        self.input_layernorm = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=dtype)
        self.post_attention_layernorm = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=dtype)
        self.scale = hidden ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        p = torch.softmax((q * k).sum(-1, keepdim=True) * self.scale, dim=-1)  # one position: p = 1
        x = x + self.o_proj(p * v)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def bnb_stack(base: torch.nn.Module, bnb) -> torch.nn.Module:
    """A copy of `base` with every nn.Linear a bitsandbytes Linear4bit (nf4, double quant,
    blocksize 64: the QLoRA defaults, and lowbit's), quantized by bitsandbytes when moved to the
    device (bitsandbytes' own test idiom: the layer built on "meta", the weight set, then .to)."""
    model = copy.deepcopy(base)
    for name, lin in [(nm, mod) for nm, mod in model.named_modules() if type(mod) is torch.nn.Linear]:
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                         quant_type="nf4", module=layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(lin.weight.device))
    return model.eval()


def cuda_graph(fn, dev: str):
    """(replay, static output, error): fn warmed up on a side stream (compiles, config choices,
    cached workspaces happen there, outside the capture), then captured on that stream into a CUDA
    graph; replay() reruns it and refreshes the static output. A failed capture returns its error
    string instead of raising. On the CPU (dry run) there are no graphs: the eager call stands in."""
    if dev != "cuda":
        return fn, None, None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: the SZ compression thread (CPU work) cannot invalidate this capture
        with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
            out = fn()
        g.replay()
        torch.cuda.synchronize()
        return g.replay, out, None
    except Exception as e:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None, None, f"{type(e).__name__}: {str(e)[:300]}"


def time_decode(run: Run, ctx: Ctx, until: float) -> list:
    """Tokens/s of a Llama-shaped stack decoding one token at a time (x [1, 1, hidden] bf16, M = 1):
    bf16 nn.Linear, bitsandbytes Linear4bit nf4 (when importable), lowbit.replace_linear to nf4,
    int4 (rows) and int3 (g128); each eager, then replayed from a CUDA graph (no Python, no launch
    overhead: the kernels alone). One token = one do_bench call; tokens/s = 1000 / its median ms."""
    import lowbit

    d = ctx.decoder
    torch.manual_seed(0)
    base = torch.nn.Sequential(*(DecoderLayer(d["hidden"], d["intermediate"], ctx.dev, torch.bfloat16)
                                 for _ in range(d["layers"]))).eval()
    x = torch.randn(1, 1, d["hidden"], device=ctx.dev, dtype=torch.bfloat16)
    bnb = load_bnb(run, ctx)

    def lowbit_stack(quant_type, **opts):
        return lambda: lowbit.replace_linear(copy.deepcopy(base), quant_type, progress=False, **opts)

    variants = {"bf16": lambda: base}  # name -> builder (each stack is built when timed, dropped after)
    if bnb is not None:
        variants["bnb nf4"] = lambda: bnb_stack(base, bnb[0])
    variants.update({"lowbit nf4": lowbit_stack("nf4"), "lowbit int4": lowbit_stack("int4"),
                     "lowbit int3 g128": lowbit_stack("int3", group_size=128)})
    rows = run.res.setdefault("decode", [])
    run.log(f"  stack: {d['layers']} layers, hidden {d['hidden']}, MLP {d['intermediate']}, "
            f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M weights")
    with torch.no_grad():
        want = base(x)
        for name, build in variants.items():
            if out_of_time(run, until):
                break
            r = {"variant": name, **d, "M": 1}
            try:
                model, r["build_s"] = first_call(ctx, build)
                y, r["first_call_s"] = first_call(ctx, lambda: model(x))
                r["err_vs_bf16"] = rel_err(y, want)
                r["eager_ms"] = ctx.bench(lambda: model(x))
            except Exception as e:  # e.g. bitsandbytes without its CUDA library: the others go on
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                run.log(f"  {name}: {r['error']}")
                rows.append(r)
                continue
            if run.left(until) > 0:
                replay, out, err = cuda_graph(lambda: model(x), ctx.dev)
                if err:
                    r["graph_error"] = err
                else:
                    r["graph_ms"] = ctx.bench(replay)
                    if out is not None:
                        r["graph_err_vs_eager"] = rel_err(out, y)
                    else:
                        r["graph_note"] = "dry run: no CUDA graphs on the CPU, the eager call stood in"
                replay = out = None  # the graph and its memory pool go before the next stack is built
            r["eager_tok_s"] = 1e3 / r["eager_ms"]
            r["graph_tok_s"] = 1e3 / r["graph_ms"] if r.get("graph_ms") else None
            rows.append(r)
            g = f"{r['graph_tok_s']:.0f} tok/s" if r["graph_tok_s"] else f"not captured ({r.get('graph_error')})"
            g += " (dry run: the eager call stood in)" if r.get("graph_note") else ""
            run.log(f"  {name:17} eager {r['eager_tok_s']:8.1f} tok/s, CUDA graph {g}; rel err vs bf16 "
                    f"{r['err_vs_bf16']:.1e} (built in {r['build_s']:.1f} s)")
            model = None
            if ctx.dev == "cuda":
                torch.cuda.empty_cache()
    # ratios, same mode against same mode: >1 = this variant decodes faster
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for mode in ("eager", "graph"):
            for ref, col in (("bf16", "x_bf16"), ("bnb nf4", "x_bnb")):
                t, b = r.get(f"{mode}_ms"), by.get(ref, {}).get(f"{mode}_ms")
                r[f"{mode}_{col}"] = b / t if t and b else None
        r["graph_speedup"] = r["eager_ms"] / r["graph_ms"] if r.get("eager_ms") and r.get("graph_ms") else None
    return rows


def time_configs(run: Run, ctx: Ctx, until: float) -> list:
    """Every shipped config on one shape (bf16), against bf16: the table the config lists come from
    (nf4, int3 g128, then nvfp4 last: the first cut when time runs short). With --sweep, each nf4
    config also with the other table-lookup decodes (0 global gather, 1 select tree; 2 = tl.gather
    is shipped)."""
    import lowbit
    from lowbit.formats import blockfp as bfp
    from lowbit.kernels import _common, blockfp, intq, nf4

    k, n = ctx.sweep_kn
    w = torch.randn(n, k, device=ctx.dev, dtype=torch.bfloat16) * 0.02
    q4 = lowbit.quantize_4bit(w, 64, "nf4", True)
    qi = lowbit.quantize_int(w, 3, 128)
    wd4, wdi = lowbit.dequantize_4bit(q4, torch.float32).double(), lowbit.dequantize_int(qi, torch.float32).double()
    qb = bfp.quantize_blockfp(w, "nvfp4")
    tb, wdb = bfp.scale_table(qb), bfp.dequantize_blockfp(qb, torch.float32).double()
    rows = run.res.setdefault("configs", [])
    small = ctx.a.dry_run

    def bench_m(b):
        m = BENCH_M.get(b, ctx.big_m)
        return min(m, 64) if small else m

    decodes = (0, 1, 2) if ctx.a.sweep else (None,)
    plan = [  # (case, table, fn(x, config), float64 W, x is g [M, N], extras: "nf4" decodes + DEQUANT, "dequant")
        ("nf4 forward", nf4.FORWARD_CONFIGS, lambda x, c: ctx.impl.fwd(x, q4, None, c), wd4, False, "nf4"),
        ("nf4 grad_x", nf4.GRAD_X_CONFIGS, lambda g, c: ctx.impl.grad_x(g, q4, c), wd4, True, "nf4"),
        ("int3 g128 forward", intq.FORWARD_CONFIGS, lambda x, c: ctx.impl.int_fwd(x, qi, None, c), wdi, False, None),
        ("int3 g128 grad_x", intq.GRAD_X_CONFIGS, lambda g, c: ctx.impl.int_grad_x(g, qi, c), wdi, True, None),
        ("nvfp4 forward", blockfp.FORWARD_CONFIGS, lambda x, c: ctx.impl.bfp_fwd(x, qb, tb, None, c), wdb, False,
         "dequant"),
        ("nvfp4 grad_x", blockfp.GRAD_X_CONFIGS, lambda g, c: ctx.impl.bfp_grad_x(g, qb, tb, c), wdb, True, "dequant"),
    ]
    cases = []  # (case, M, config, fn, float64 W, x is g)
    for case, table, fn, wd, is_g, extras in plan:
        for b, c in table_configs(table):
            for d in decodes if extras == "nf4" else (None,):
                cases.append((case, bench_m(b), c if d is None else c._replace(decode=d), fn, wd, is_g))
        if extras:  # dequantize + cuBLAS at each bucket's M
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
    """lowbit from an install, else from this checkout (python/ on sys.path). Plus .carry/site (staged
    bitsandbytes)."""
    if importlib.util.find_spec("lowbit") is None:
        sys.path.insert(0, str(REPO / "python"))
    import lowbit

    # python/lowbit/kernels is a symlink to kernels/ (a namespace package, no __init__.py): import
    # every family's module so that lowbit.kernels.<family> is an attribute
    import lowbit.kernels.blockfp  # noqa: F401
    import lowbit.kernels.intq  # noqa: F401
    import lowbit.kernels.nf4  # noqa: F401
    import lowbit.kernels.sz  # noqa: F401

    site = REPO / ".carry" / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def summary(run: Run) -> None:
    """The compact tables, printed last; their key ratios also go to the JSON's "key_ratios"."""
    key = run.res["key_ratios"] = {}
    rows = run.res.get("nf4") or []
    if rows:
        run.log("")
        run.log("nf4 + double quant (x = other time / lowbit time: >1 lowbit faster)")
        run.log(f"{'K x N':>13} {'M':>5} {'bf16 ms':>9} {'lowbit ms':>9} {'launch ms':>9} {'bnb ms':>9} {'x bf16':>7} "
                f"{'x bnb':>6} {'GB/s':>6} {'%bw':>5} {'gx/bf16':>7}")
    for r in rows:
        bw = f"{100 * r['frac_copy_bw']:4.0f}%" if r["frac_copy_bw"] else "-"
        gx = f"{r['grad_x_bf16_ms'] / r['grad_x_ms']:.2f}" if r.get("grad_x_ms") else ""
        run.log(f"{r['K']:>6}x{r['N']:<6} {r['M']:>5} {r['bf16_ms']:>9.4f} {r['lowbit_ms']:>9.4f} "
                f"{r['launcher_ms']:>9.4f} {fmt(r['bnb_ms'], '.4f'):>9} {r['x_bf16']:>7.2f} {fmt(r['x_bnb']):>6} "
                f"{r['GBps']:>6.0f} {bw:>5} {gx:>7}")
        key[f"nf4 {r['K']}x{r['N']} M={r['M']} x_bf16"] = r["x_bf16"]
        key[f"nf4 {r['K']}x{r['N']} M={r['M']} x_bnb"] = r["x_bnb"]

    rows = run.res.get("blockfp") or []
    if rows:  # one line per (format, shape), M across
        ms = sorted({r["M"] for r in rows})
        run.log("")
        run.log("block FP4 (bare launcher): x bf16 / x nf4 by M (other time / block FP4 time: >1 block FP4 faster); "
                "at M=1: % of copy bandwidth, kernel kind")
        run.log(f"{'format':>6} {'K x N':>13} " + " ".join(f"{'M=' + str(m):>11}" for m in ms)
                + f" {'%bw@1':>6} {'kind@1':>7}")
        groups = {}
        for r in rows:
            groups.setdefault((r["quant_type"], r["K"], r["N"]), {})[r["M"]] = r
        for (qt, k, n), by_m in groups.items():
            one = by_m.get(1)
            bw = f"{100 * one['frac_copy_bw']:5.0f}%" if one and one["frac_copy_bw"] else "-"
            kind = (one["config"] or {}).get("kind", "-") if one else "-"
            cells = [f"{by_m[m]['x_bf16']:.2f}/{by_m[m]['x_nf4']:.2f}" if m in by_m else "-" for m in ms]
            run.log(f"{qt:>6} {k:>6}x{n:<6} " + " ".join(f"{c:>11}" for c in cells) + f" {bw:>6} {kind:>7}")
            for m, r in by_m.items():
                key[f"{qt} {k}x{n} M={m} x_bf16"] = r["x_bf16"]
                key[f"{qt} {k}x{n} M={m} x_nf4"] = r["x_nf4"]

    rows = run.res.get("int") or []
    if rows:  # one line per (format, shape), M across: compact enough for 4 shapes x 3 formats x 7 M
        ms = sorted({r["M"] for r in rows})
        run.log("")
        run.log("int (RTN): x bf16 by M (bf16 time / lowbit time); at M=1: % of copy bandwidth and kernel kind")
        run.log(f"{'format':>9} {'K x N':>13} " + " ".join(f"{'M=' + str(m):>7}" for m in ms)
                + f" {'%bw@1':>6} {'kind@1':>7}")
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["bits"], r["group"], r["K"], r["N"]), {})[r["M"]] = r
        for (bits, gs, k, n), by_m in groups.items():
            name = f"int{bits} " + ("rows" if gs is None else f"g{gs}")
            one = by_m.get(1)
            bw = f"{100 * one['frac_copy_bw']:5.0f}%" if one and one["frac_copy_bw"] else "-"
            kind = (one["config"] or {}).get("kind", "-") if one else "-"
            run.log(f"{name:>9} {k:>6}x{n:<6} " + " ".join(f"{fmt(by_m[m]['x_bf16'] if m in by_m else None):>7}"
                                                          for m in ms) + f" {bw:>6} {kind:>7}")
            for m, r in by_m.items():
                key[f"{name} {k}x{n} M={m} x_bf16"] = r["x_bf16"]

    rows = run.res.get("sz") or []
    if rows:
        run.log("")
    for r in rows:
        run.log(f"sz decode {r['shape'][0]}x{r['shape'][1]}: {r['decoded_GBps']:.0f} GB/s of bf16, "
                f"{r['bits_per_param']:.2f} bits/param")
        key[f"sz decode {r['shape'][0]}x{r['shape'][1]} GBps"] = r["decoded_GBps"]
    for r in run.res.get("sz_gemv") or []:
        run.log(f"SZLinear {r['shape'][0]}x{r['shape'][1]} M={r['M']} ({'fused' if r['fused_gemv'] else 'NOT fused'}): "
                f"x{r['x_decode_cublas']:.2f} of decode + cuBLAS, x{r['x_bf16']:.2f} of bf16")
        key[f"sz_linear M={r['M']} x_decode_cublas"] = r["x_decode_cublas"]
        key[f"sz_linear M={r['M']} x_bf16"] = r["x_bf16"]

    rows = run.res.get("decode") or []
    if rows:
        r0 = rows[0]
        run.log("")
        run.log(f"decode loop: {r0['layers']} layers, hidden {r0['hidden']}, MLP {r0['intermediate']}, M=1 bf16, "
                "tokens/s (x = same mode vs bf16 / vs bnb: >1 faster)")
        run.log(f"{'variant':>17} {'eager':>8} {'graph':>8} {'eager x bf16':>12} {'graph x bf16':>12} "
                f"{'eager x bnb':>11} {'graph x bnb':>11} {'graph/eager':>11}")
    for r in rows:
        if "error" in r:
            run.log(f"{r['variant']:>17} failed: {r['error'][:90]}")
            continue
        run.log(f"{r['variant']:>17} {r['eager_tok_s']:>8.0f} {fmt(r['graph_tok_s'], '.0f', 'no graph'):>8} "
                f"{fmt(r['eager_x_bf16']):>12} {fmt(r['graph_x_bf16']):>12} {fmt(r['eager_x_bnb']):>11} "
                f"{fmt(r['graph_x_bnb']):>11} {fmt(r['graph_speedup']):>11}")
        for col in ("eager_tok_s", "graph_tok_s", "eager_x_bf16", "graph_x_bf16", "eager_x_bnb", "graph_x_bnb"):
            key[f"decode {r['variant']} {col}"] = r[col]
        if r.get("graph_error"):
            run.log(f"{'':>17} CUDA graph capture failed: {r['graph_error'][:120]}")
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


def time_vllm(run: Run, ctx: Ctx, until: float) -> None:
    """SmolLM2-135M decode tokens/s in vLLM, bf16 vs lowbit nf4 / int4 / int3 folders, side by side
    (benchmarks/vllm_cpu.py --dtype bfloat16 in a subprocess, within this section's share of the budget).
    Needs vLLM importable on this machine and the SmolLM2 GGUF package (lowbit.smollm2); the GPU image has
    neither unless staged, and then the section records why it was skipped instead of timing."""
    import subprocess

    missing = [m for m in ("vllm", "gguf") if importlib.util.find_spec(m) is None]
    if missing or ctx.dev != "cuda":
        why = f"not importable here: {', '.join(missing)}" if missing else "no CUDA device (dry run)"
        run.record("vllm", "SmolLM2 tokens/s", None, note=f"skipped: {why}")
        return run.log(f"  vLLM section skipped ({why})")
    left = max(30.0, run.left(until))
    cmd = [sys.executable, str(Path(__file__).with_name("vllm_cpu.py")), "--dtype", "bfloat16", "--json",
           "--formats", "nf4", "int4", "int3", "--tokens", "64", "--repeats", "2"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        run.record("vllm", "SmolLM2 tokens/s", None, note=f"skipped: over the section's {left:.0f} s")
        return run.log("  vLLM section: out of time")
    if p.returncode:
        raise RuntimeError(f"benchmarks/vllm_cpu.py failed (rc {p.returncode}): {p.stderr[-2000:]}")
    res = json.loads(p.stdout)
    base = res["results"]["fp32"]["decode_tok_s"]
    for name, r in res["results"].items():
        run.record("vllm", f"SmolLM2 decode tok/s {name}", True, note=f"{r['decode_tok_s']:.1f} tok/s, "
                   f"{r['decode_tok_s'] / base:.2f}x bf16", tok_s=r["decode_tok_s"], text=r["text"])
        run.log(f"  vLLM {name}: {r['decode_tok_s']:.1f} tok/s ({r['decode_tok_s'] / base:.2f}x bf16)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.log / .json ($OUT)")
    p.add_argument("--quick", action="store_true", help="bf16-only checks, two shapes, fewer timings (budget 200 s)")
    p.add_argument("--sweep", action="store_true", help="also time the nf4 configs with decode methods 0 and 1")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new work after this many seconds (420; 200 with --quick; none with --dry-run)")
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
    budget = a.budget_s if a.budget_s is not None else (1e9 if a.dry_run else 200.0 if a.quick else 420.0)
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
    if dev == "cuda":  # which configs the timings get: this card's shipped table, else each bucket's first
        from lowbit.kernels import _common

        try:
            card = _common.card_name()
            meta["config_table"] = {"card": card, "entries": len(_common.load_table(card))}
        except Exception as e:
            meta["config_table"] = f"{type(e).__name__}: {e}"
        run.log(f"shipped config table: {meta['config_table']}")
    torch.manual_seed(0)
    ctx = Ctx(a, impl, K, dev, bench)
    # SZ streams for the timing compress on the CPU (numpy and C) while the GPU sections compile and run.
    def make_streams(out: dict) -> None:
        for shape, chunk in ctx.sz_streams:
            t = time.perf_counter()
            c = sz_stream(shape, chunk, outliers=False)
            out[(shape, chunk)] = (c, time.perf_counter() - t)

    streams = Background(make_streams)

    if not a.skip_correctness:
        os.environ["LOWBIT_POISON"] = "1"
        run.section("correctness: 4-bit quantize/dequantize", check_quant, ctx, until=0.11)
        run.section("correctness: nf4 and int matmul configs", check_matmul, ctx, until=0.36)
        run.section("correctness: sz decode", check_sz, ctx, until=0.39)
        run.section("correctness: block FP4 (nvfp4, mxfp4) configs", check_blockfp, ctx, until=0.47)
        os.environ.pop("LOWBIT_POISON")
    # Deadlines as fractions of the budget: a section that finishes early leaves its time to the next.
    run.section("timing: nf4 matmul sweep", time_nf4, ctx, until=0.58)
    run.section("timing: block FP4 (nvfp4, mxfp4) vs nf4 and bf16", time_blockfp, ctx, until=0.64)
    run.section("timing: int matmul sweep", time_int, ctx, until=0.74)
    run.section("timing: sz decode and fused GEMV", lambda r, c, until: time_sz(r, c, until, streams), ctx,
                until=0.78)
    run.section("timing: decode loop (Llama-shaped stack)", time_decode, ctx, until=0.89)
    run.section("timing: vLLM serving (SmolLM2)", time_vllm, ctx, until=0.92)
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
