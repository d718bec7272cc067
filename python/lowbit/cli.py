"""Command line (`lowbit ...`, or `python -m lowbit.cli ...`).

    lowbit demo     [--out DIR] [--no-plot]
        Quantize every Linear of the real all-MiniLM-L6-v2 with each format at its usual setting
        (nf4, fp4, optimal, int4 rows, int3 g128, int2 g64, sz) and report bits/param, size,
        weight RMSE / max error, sentence-embedding cosine to fp32 and CPU forward latency vs fp32;
        writes DIR/report.md and, when matplotlib imports, DIR/rate_distortion.png.
    lowbit quantize MODEL_DIR OUT_DIR --format F [--skip a,b] [--group-size N] [--blocksize N]
                    [--no-double-quant] [--error-bound X] [--mode abs|rel] [--force]
        Quantize a Hugging Face model folder; writes OUT_DIR/model.safetensors, lowbit.json,
        config.json. Load it back with lowbit.load_quantized(model, OUT_DIR).
    lowbit bench    [--json] [--device cpu|cuda] [--quick]
        Kernel timings against torch's dense matmul on this device (ratios from the same run).

Usage errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time

FORMATS = ("nf4", "fp4", "optimal", "int2", "int3", "int4", "sz")

# The demo's formats at their usual settings: (row label, family, quant_type, replace_linear options).
# SZ's abs bound 0.008 lands at ~4.0 bits/param on all-MiniLM-L6-v2 (1.4x NF4's weight RMSE as a bound).
SZ_DEMO_BOUND = 0.008
DEMO_FORMATS = [
    ("nf4", "4-bit table", "nf4", {"blocksize": 64, "double_quant": True}),
    ("fp4", "4-bit table", "fp4", {"blocksize": 64, "double_quant": True}),
    ("optimal", "4-bit table", "optimal", {"blocksize": 64, "double_quant": True}),
    ("int4 (rows)", "int (RTN)", "int4", {}),
    ("int3 (g128)", "int (RTN)", "int3", {"group_size": 128}),
    ("int2 (g64)", "int (RTN)", "int2", {"group_size": 64}),
    (f"sz (abs {SZ_DEMO_BOUND:g})", "sz", "sz", {"error_bound": SZ_DEMO_BOUND}),
]


class UsageError(Exception):
    """A bad command line or input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line
        raise UsageError(message)


@contextlib.contextmanager
def _threads(n: int | None):
    """torch.set_num_threads(n) for the block (None: leave torch's setting)."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(it, total: int, desc: str):
    """tqdm over `it` on stderr when tqdm imports; the bare iterable otherwise."""
    try:
        from tqdm.auto import tqdm
    except Exception:
        return it
    return tqdm(it, total=total, desc=desc, unit="layer", leave=False, file=sys.stderr)


# --------------------------------------------------------------------------------------- demo


def linear_targets(model, skip=()):
    """(name, nn.Linear) pairs that replace_linear would swap (same selection rule)."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and not any(n == s or n.split(".")[-1] == s for s in skip)]


def quantize_layers(model, quant_type: str, opts: dict, skip=(), desc: str | None = None):
    """replace_linear(model, quant_type, skip, **opts) with a tqdm bar; returns the model."""
    from lowbit.nn import _layer_factory

    make = _layer_factory(quant_type, dict(opts))
    targets = linear_targets(model, skip)
    for name, lin in _progress(targets, len(targets), desc or quant_type):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(lin))
    return model


def state_dict_bytes(model) -> int:
    """Bytes of every tensor in the state dict (each storage counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def weight_stats(model, dense: dict) -> dict:
    """Compare every lowbit layer of `model` with dense[name] (the fp32 weight it replaced).

    Returns params, bytes (quantized weight storage incl. scales/tables), bits_per_param, rmse,
    max_err, layers. Layers still nn.Linear are skipped (not quantized)."""
    import torch

    params = nbytes = 0
    se, mx, layers = 0.0, 0.0, 0
    for name, mod in model.named_modules():
        if name not in dense or not hasattr(mod, "dequantized_weight"):
            continue
        w = dense[name]
        d = mod.dequantized_weight(torch.float32).double() - w.double()
        se += float(d.pow(2).sum())
        mx = max(mx, float(d.abs().max()))
        params += w.numel()
        nbytes += mod.bits_per_param * w.numel() / 8
        layers += 1
    if not params:
        raise ValueError("no quantized layer of the model matches a dense weight")
    return {"params": params, "bytes": nbytes, "bits_per_param": 8 * nbytes / params,
            "rmse": math.sqrt(se / params), "max_err": mx, "layers": layers}


def format_table(rows: list[dict]) -> str:
    """Markdown table of demo rows (keys: format, bits_per_param, linear_mb, model_mb, rmse, max_err,
    cosine, latency_ratio)."""
    lines = ["| format | bits/param | Linear weights (MB) | model size (MB) | weight RMSE | max error "
             "| cosine to fp32 | forward time vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bits_per_param']:.3f} | {r['linear_mb']:.2f} | {r['model_mb']:.2f} "
            f"| {r['rmse']:.3e} | {r['max_err']:.3e} | {r['cosine']:.4f} | {r['latency_ratio']:.2f} |")
    return "\n".join(lines)


def measure_format(model, quant_type: str, opts: dict, *, forward, reference, label: str | None = None,
                   family: str = "", skip=(), repeats: int = 3) -> dict:
    """Quantize a deep copy of `model` and measure it: weight stats, model size, cosine of
    forward(model_q) to `reference` (row-wise mean), forward latency (best of `repeats`).
    `forward(m)` must return a [batch, dim] tensor."""
    import copy

    import torch

    m = copy.deepcopy(model)
    dense = {n: lin.weight.detach().clone() for n, lin in linear_targets(m, skip)}
    t0 = time.perf_counter()
    quantize_layers(m, quant_type, opts, skip, desc=label or quant_type)
    t_quant = time.perf_counter() - t0
    st = weight_stats(m, dense)
    with torch.no_grad():
        out = forward(m)
        t = _best_of(lambda: forward(m), repeats)
    cos = float(torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1).mean())
    return {"format": label or quant_type, "family": family, "quant_type": quant_type, "options": dict(opts),
            **st, "linear_mb": st["bytes"] / 1e6, "model_mb": state_dict_bytes(m) / 1e6, "cosine": cos,
            "latency_s": t, "quantize_s": t_quant}


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["bits_per_param"])
        x = [r["bits_per_param"] for r in rs]
        for ax, key in ((axes[0], "rmse"), (axes[1], "cosine")):
            ax.plot(x, [r[key] for r in rs], marker=markers[i % len(markers)], label=fam,
                    linestyle="-" if len(set(x)) > 1 else "none")
            for r in rs:
                ax.annotate(r["format"], (r["bits_per_param"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    axes[0].set_xlabel("bits / param (incl. scales)")
    axes[0].set_ylabel("weight RMSE vs fp32")
    axes[0].set_yscale("log")
    axes[0].set_title("weight error")
    axes[1].set_xlabel("bits / param (incl. scales)")
    axes[1].set_ylabel("sentence-embedding cosine to fp32")
    axes[1].set_title("all-MiniLM-L6-v2 embeddings")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _demo(args) -> int:
    with _threads(args.threads):
        return _demo_run(args)


def _demo_run(args) -> int:
    import torch
    from torch import nn

    from lowbit.minilm import SENTENCES, embed, load_minilm

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_minilm()

    def forward(m):
        return embed(m, tok, SENTENCES)

    with torch.no_grad():
        ref = forward(model)
        t_fp32 = _best_of(lambda: forward(model), 3)
    n_params = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    rows = [{"format": "fp32", "family": "fp32", "bits_per_param": 32.0, "linear_mb": 4 * n_params / 1e6,
             "model_mb": state_dict_bytes(model) / 1e6, "rmse": 0.0, "max_err": 0.0, "cosine": 1.0,
             "latency_ratio": 1.0}]
    for label, fam, qt, opts in DEMO_FORMATS:
        r = measure_format(model, qt, opts, forward=forward, reference=ref, label=label, family=fam)
        r["latency_ratio"] = r["latency_s"] / t_fp32
        print(f"{label}: quantized in {r['quantize_s']:.1f} s, {r['bits_per_param']:.3f} bits/param, "
              f"cosine {r['cosine']:.4f}", file=sys.stderr)
        rows.append(r)
    elapsed = time.perf_counter() - t_start
    table = format_table(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("# lowbit demo: all-MiniLM-L6-v2, every Linear layer quantized\n\n")
        f.write(f"{n_params / 1e6:.2f}M Linear weights in {sum(1 for _ in linear_targets(model))} layers; "
                f"{len(SENTENCES)} real sentences (lowbit.minilm.SENTENCES); cosine of mean-pooled, normalised "
                "embeddings to the fp32 model. bits/param counts codes plus scales/tables/zero points "
                "(SZ: the whole compressed stream). Model size is the whole state dict (embeddings, "
                "LayerNorms and biases stay fp32). Forward time: best of 3 on this CPU "
                f"(torch threads: {torch.get_num_threads()}) through the reference (dequantize + matmul) path, "
                f"relative to fp32 ({t_fp32 * 1e3:.1f} ms).\n\n"
                "Settings: nf4/fp4/optimal blocksize 64 with double-quantized scales; int4 one scale per "
                f"row; int3 groups of 128; int2 groups of 64; sz absolute error bound {SZ_DEMO_BOUND:g} "
                "(every weight within it).\n\n")
        f.write(table + "\n")
        f.write(f"\nDemo wall time: {elapsed:.1f} s.\n")
    print(f"\nwrote {os.path.join(args.out, 'report.md')}")
    if not args.no_plot:
        png = os.path.join(args.out, "rate_distortion.png")
        if _plot([r for r in rows if r["family"] != "fp32"], png):
            print(f"wrote {png}")
        else:
            print("matplotlib not importable: no plot (pip install matplotlib)")
    print(f"demo took {elapsed:.1f} s")
    return 0


# ----------------------------------------------------------------------------------- quantize

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "added_tokens.json")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def quantize_options(a) -> dict:
    """The replace_linear options for the parsed `lowbit quantize` arguments (UsageError when an
    option does not apply to the format or has a bad value)."""
    fmt = a.format
    given = {"--group-size": a.group_size is not None, "--blocksize": a.blocksize is not None,
             "--no-double-quant": a.no_double_quant, "--error-bound": a.error_bound is not None,
             "--mode": a.mode is not None}
    if fmt in ("nf4", "fp4", "optimal"):
        allowed = {"--blocksize", "--no-double-quant"}
    elif fmt.startswith("int"):
        allowed = {"--group-size"}
    else:
        allowed = {"--error-bound", "--mode"}
    bad = [k for k, v in given.items() if v and k not in allowed]
    if bad:
        raise UsageError(f"{', '.join(bad)} does not apply to --format {fmt} (it takes: {', '.join(sorted(allowed))})")
    if fmt in ("nf4", "fp4", "optimal"):
        bs = 64 if a.blocksize is None else a.blocksize
        if bs & (bs - 1) or not 32 <= bs <= 4096:
            raise UsageError(f"--blocksize must be a power of two in [32, 4096], got {bs}")
        return {"blocksize": bs, "double_quant": not a.no_double_quant}
    if fmt.startswith("int"):
        if a.group_size is not None and a.group_size % 32:
            raise UsageError(f"--group-size must be a positive multiple of 32, got {a.group_size}")
        return {"group_size": a.group_size}
    if a.error_bound is None:
        raise UsageError("--format sz needs --error-bound X (absolute, or relative to each weight's range "
                         "with --mode rel)")
    return {"error_bound": a.error_bound, "mode": a.mode or "abs"}


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Loading weights' bar or warnings from transformers (so that an error stays one line)."""
    try:
        from transformers.utils import logging as tlog
    except Exception:
        yield
        return
    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def _quantize(a) -> int:
    src, out = os.fspath(a.model_dir), os.fspath(a.out_dir)
    if not os.path.exists(src):
        raise UsageError(f"MODEL_DIR {src!r} does not exist")
    if not os.path.isdir(src):
        raise UsageError(f"MODEL_DIR {src!r} is not a directory")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise UsageError(f"MODEL_DIR {src!r} is not a Hugging Face model folder (no config.json)")
    opts = quantize_options(a)
    explicit = a.skip is not None
    requested = tuple(s.strip() for s in (a.skip if explicit else "lm_head").split(",") if s.strip())
    skip = requested
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"OUT_DIR {out!r} exists and is not a directory")
        if not a.force:
            raise UsageError(f"OUT_DIR {out!r} exists; pass --force to overwrite it")
    if os.path.realpath(out) == os.path.realpath(src):
        raise UsageError("OUT_DIR must not be MODEL_DIR (it would overwrite the source model)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch import nn

    import lowbit
    from lowbit.checkpoint import WEIGHTS, write_manifest

    try:
        from transformers import AutoModel
    except ImportError:
        raise UsageError("lowbit quantize needs transformers (pip install transformers)") from None
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
            model = AutoModel.from_pretrained(src, local_files_only=True).eval()
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load a model from {src!r}: {msg}") from None
    # Resolve --skip to the full names of the Linear layers to leave dense: a name matches itself,
    # its last component (replace_linear's rule) and every module under it ("pooler" -> "pooler.dense").
    dense_names = [n for n, m in model.named_modules() if type(m) is nn.Linear
                   and any(n == s or n.split(".")[-1] == s or n.startswith(s + ".") for s in skip)]
    names = [n for n, _ in model.named_modules()]
    for s_ in requested if explicit else ():
        if not any(n == s_ or n.split(".")[-1] == s_ or n.startswith(s_ + ".") for n in names):
            print(f"lowbit: warning: --skip {s_!r} matches no module of the model", file=sys.stderr)
    skip = tuple(dense_names)
    targets = linear_targets(model, skip)
    if not targets:
        raise UsageError(f"the model in {src!r} has no nn.Linear layer to quantize (after --skip)")
    n_params = sum(lin.weight.numel() for _, lin in targets)
    try:
        with torch.no_grad():
            lowbit.replace_linear(model, a.format, skip=skip, **opts)
    except (ValueError, TypeError) as e:
        raise UsageError(f"cannot quantize with --format {a.format}: {e}") from None
    bits = sum(m.bits_per_param * m.in_features * m.out_features for m in model.modules()
               if type(m) is not nn.Linear and hasattr(m, "bits_per_param") and hasattr(m, "in_features"))
    os.makedirs(out, exist_ok=True)
    lowbit.save_state_dict(model, os.path.join(out, WEIGHTS), overwrite=True)
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(out, "config.json"))
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    write_manifest(out, a.format, opts, skip, skip_requested=list(requested), source=os.path.abspath(src),
                   model_class=type(model).__name__, quantized_layers=len(targets), quantized_params=n_params,
                   bits_per_param=bits / n_params)
    size = os.path.getsize(os.path.join(out, WEIGHTS))
    print(f"quantized {len(targets)} Linear layers ({n_params / 1e6:.2f}M params) to {a.format} "
          f"at {bits / n_params:.3f} bits/param in {time.perf_counter() - t0:.1f} s; "
          f"wrote {out}/{WEIGHTS} ({size / 1e6:.2f} MB), lowbit.json, config.json")
    return 0


# -------------------------------------------------------------------------------------- bench


def _cpu_time(fn, budget_s: float = 0.25, max_reps: int = 50) -> float:
    """Median seconds of fn() after one warmup call, repeated until budget_s or max_reps."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    min_reps = 3 if first < budget_s / 3 else 1  # slow kernels: one timed call after the warmup
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


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
    from lowbit.sz import SZLinear, sz_decompress

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
            return _cpu_time(fn, 0.05 if quick else 0.15, 10 if quick else 40)
        bw = None

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
        sz_lin = SZLinear.from_linear(lin, 0.13 * float(w32.std()))  # ~4 bits/param on a Gaussian weight
        sz_c = sz_lin.to_sz()
        sz_lin = sz_lin.to(dev)
        wbytes = {"dense": w.numel() * w.element_size(), "lowbit_nf4": q4.nbytes, "lowbit_int4_rows": qi.nbytes,
                  "lowbit_int3_g128": q3.nbytes, "bnb_nf4": q4.nbytes, "sz_linear": sz_c.nbytes}
        # decoders alone (weight -> dense), timed once per shape
        dec = {"lowbit_dequant_nf4": (lambda: lowbit.dequantize_4bit(q4, dt), q4.nbytes),
               "sz_decompress": ((lambda: sz_lin.dequantized_weight(dt)) if cuda else
                                 (lambda: sz_decompress(sz_c, dtype=dt)), sz_c.nbytes)}
        sz3 = None if cuda else _pysz_decoder(w32, sz_c.bound)
        if sz3 is not None:
            dec["sz3_decompress (pysz, same bound)"] = (sz3, 0)
        x0 = torch.randn(1, k, generator=gen).to(dev, dt)
        t_dense1 = timer(lambda: x0 @ w.t())
        for name, (fn, nb) in dec.items():
            t = timer(fn)
            r = {"kernel": name, "M": 0, "K": k, "N": n, "ms": t * 1e3, "vs_dense": t / t_dense1,
                 "note": "decode the whole weight; vs_dense relative to the M=1 dense matmul"}
            if cuda:
                r["gbs"] = (nb + w.numel() * w.element_size()) / t / 1e9
                r["frac_copy_bw"] = r["gbs"] / bw
            res["results"].append(r)
            log(f"{name:20s} K={k:5d} N={n:5d}        {t * 1e3:9.3f} ms  x{t / t_dense1:6.2f} vs dense M=1")
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
                if cuda:
                    r["gbs"] = (wbytes[name] + (m * k + m * n) * x.element_size()) / t / 1e9
                    r["frac_copy_bw"] = r["gbs"] / bw
                res["results"].append(r)
                extra = f"  {r['gbs']:7.0f} GB/s ({r['frac_copy_bw']:.0%} of copy)" if cuda else ""
                log(f"{name:20s} K={k:5d} N={n:5d} M={m:4d} {t * 1e3:9.3f} ms  x{t / t_dense:6.2f} vs dense{extra}")
    res["bitsandbytes"] = any(r["kernel"] == "bnb_nf4" for r in res["results"])
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
        print(f"(vs dense: time / torch dense matmul time in this run; {res['wall_s']:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="low-bit quantization kernels for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 with each format and report the cost")
    d.add_argument("--out", default="lowbit-demo", help="folder for report.md and rate_distortion.png")
    d.add_argument("--no-plot", action="store_true", help="do not write rate_distortion.png")
    d.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the small reference-path ops gain little from more, and "
                        "multi-threaded timings are unstable on a shared machine)")
    q = sub.add_parser("quantize", help="quantize every nn.Linear of a Hugging Face model folder")
    q.add_argument("model_dir", metavar="MODEL_DIR")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    q.add_argument("--skip", default=None, help="comma-separated module names to leave dense "
                   "(full name or last component; default lm_head; '' for none)")
    q.add_argument("--group-size", type=_positive_int, help="int2/3/4: weights per scale (multiple of 32; "
                   "default one scale per row)")
    q.add_argument("--blocksize", type=_positive_int, help="nf4/fp4/optimal: weights per scale (default 64)")
    q.add_argument("--no-double-quant", action="store_true", help="nf4/fp4/optimal: keep fp32 scales")
    q.add_argument("--error-bound", type=_positive_float, help="sz: error bound (required)")
    q.add_argument("--mode", choices=("abs", "rel"), help="sz: bound absolute (default) or relative to the range")
    q.add_argument("--force", action="store_true", help="write into OUT_DIR even if it exists")
    b = sub.add_parser("bench", help="kernel timings vs torch dense matmul on this device")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--quick", action="store_true", help="tiny shapes (also LOWBIT_BENCH_QUICK=1)")
    b.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's; 1 on a busy machine)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if a.cmd == "quantize" and a.format not in FORMATS:
            raise UsageError(f"unsupported format {a.format!r}; choose one of {', '.join(FORMATS)}")
        return {"demo": _demo, "quantize": _quantize, "bench": _bench}[a.cmd](a)
    except UsageError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
