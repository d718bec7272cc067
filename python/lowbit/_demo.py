"""`lowbit demo`: every format on the real all-MiniLM-L6-v2, a table, report.md and a plot."""

from __future__ import annotations

import math
import os
import sys
import time

from ._tools import _threads, linear_targets, quantize_layers

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
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keeps a label that sticks out of the axes
    plt.close(fig)
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
    to_pts = 72.0 / fig.dpi
    widths = [label_width(r["format"]) for r in rows]
    for ax, key in panels:
        box = ax.get_window_extent()
        xy = [(r["bits_per_param"], r[key]) for r in rows]
        for _ in range(3):  # widening the axis brings points closer, which can regroup their labels
            pts = [(px * to_pts, py * to_pts) for px, py in ax.transData.transform(xy)]
            offsets = label_offsets(pts, widths, bounds=(box.y0 * to_pts, box.y1 * to_pts))
            x0, x1 = ax.get_xlim()
            x1_new = right_limit([p[0] - box.x0 * to_pts for p in pts], offsets, widths, x0, x1, box.width * to_pts)
            if x1_new <= x1 * (1 + 1e-9):
                break
            ax.set_xlim(x0, x1_new)
        for r, p, (dx, dy) in zip(rows, xy, offsets):
            moved = dx > LABEL_PAD  # a stacked label: a leader line to its point
            ax.annotate(r["format"], p, fontsize=LABEL_FONTSIZE, xytext=(dx, dy), textcoords="offset points",
                        ha="left", va="bottom", annotation_clip=False,
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=2) if moved else None)
    return fig


def _backend_name() -> str:
    import os

    return os.environ.get("LOWBIT_CPU_BACKEND", "fast") + (
        "" if os.environ.get("LOWBIT_CPU_BACKEND", "fast") != "fast" else ": fused C kernels, lowbit._cpu")


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

