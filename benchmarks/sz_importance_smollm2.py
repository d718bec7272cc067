"""SZ with importance-scaled columns on SmolLM2-135M: perplexity at ~3.0 bits/param, against one bound per tensor
and plain int3 g128 (docs/sz.md, "SZ at 3 bits").

    nice .venv/bin/python benchmarks/sz_importance_smollm2.py [--windows 8] [--calib-windows 8] [--bits 3.0]
        [--rows plain,layer0.5,none0.5,...] [--threads N]

Setup (the `lowbit eval` method, its functions reused): SmolLM2-135M-Instruct fp32 (lowbit.smollm2.model_dir()),
the 210 projections quantized, embeddings / lm_head fp32; calibration h[k] = mean x_k^2 per input channel of
every projection (lowbit.calibration.input_second_moments) on --calib-windows x 512 tokens of
smollm2.calibration_text() (articles 0-149); perplexity on the first --windows x 512 tokens of
smollm2.evaluation_text() (articles 150-299), each window one forward, NLL in float64 (_eval.score).

SZ rows hit --bits (bits/param over the projections, everything stored counted: stream, headers, lane index,
column exponents) with ONE error bound for the whole model, found by bisection on the codes' zeroth-order entropy
and corrected once by the measured size of the real streams. Row names: "plain" (one bound per tensor, no
scaling), "layer<alpha>" (columns scaled by 2**round(alpha log2(h / geomean h)): the bound is per column, relative
to the layer's typical column; the default alpha is 0.35), "none<alpha>" (2**round(alpha log2 h): one bound across the model allocates
between layers too), "int3" (plain int3, group 128, method mse, lowbit eval's choice), "fp32".
Every SZ row prints the per-element bound it guarantees: the smallest and largest column bound over the model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import time

import torch

import lowbit
from lowbit import SZLinear, _eval, smollm2
from lowbit.calibration import calibration_windows, input_second_moments
from lowbit.formats import sz

CTX = 512


def targets(model):
    return _eval._targets(model)


def scaled_weights(model, h, kind: str, alpha: float):
    """{name: W * 2**e} for every projection (W itself for "plain")."""
    out = {}
    for name, lin in targets(model):
        w = lin.weight.detach().float()
        if kind != "plain":
            e = sz.column_exponents(sz.check_input_moments(h[name], lin.in_features), alpha, kind)
            w = sz.scale_columns(w, e).float()
        out[name] = w
    return out


def entropy_bits(ws, eb: float) -> float:
    """Zeroth-order entropy of round(w / 2eb) over all the weights, bits per weight."""
    total, n = 0.0, 0
    for w in ws.values():
        q = torch.round(w.reshape(-1)[::7] / (2 * eb)).to(torch.int64)  # a 1/7 sample: an estimate, corrected
        q -= q.min()
        p = torch.bincount(q).double()
        p = p[p > 0] / q.numel()
        total += float(-(p * torch.log2(p)).sum()) * q.numel()
        n += q.numel()
    return total / n


def bound_for(ws, target: float) -> float:
    """The bound whose entropy estimate is `target`: secant steps on log2(bound) (bits fall ~1 per doubling)."""
    x0, f0 = math.log2(0.05), entropy_bits(ws, 0.05) - target
    x1 = x0 + f0
    for _ in range(6):
        f1 = entropy_bits(ws, 2.0**x1) - target
        if abs(f1) < 2e-3 or f1 == f0:
            break
        x0, f0, x1 = x1, f1, x1 - f1 * (x1 - x0) / (f1 - f0)
    return 2.0**x1


def quantize(model, h, kind: str, alpha: float, eb: float):
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    for name, lin in targets(m):
        opts = {} if kind == "plain" else dict(input_moments=h[name], importance_alpha=alpha, importance_ref=kind)
        layer = SZLinear.from_linear(lin, error_bound=eb, **opts)
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, layer)
    return m.eval(), time.perf_counter() - t0


def sz_row(model, h, kind: str, alpha: float, target: float):
    ws = scaled_weights(model, h, kind, alpha)
    offset = 0.08  # the real stream costs a little more (Huffman, headers, index, exponents): corrected once
    for attempt in range(2):
        t0 = time.perf_counter()
        eb = bound_for(ws, target - offset)
        t1 = time.perf_counter()
        m, qs = quantize(model, h, kind, alpha, eb)
        bits, _ = _eval.quantized_bits(m)
        print(f"  {kind} {alpha}: bound {eb:.5g} ({t1 - t0:.0f} s), {bits:.4f} bits/param, quantized in {qs:.0f} s",
              file=sys.stderr, flush=True)
        if abs(bits - target) <= 0.015 or attempt == 1:
            break
        offset = bits - entropy_bits(ws, eb)
        del m
    lo = min(float(l.column_bounds().min()) for l in m.modules() if isinstance(l, SZLinear))
    hi = max(float(l.column_bounds().max()) for l in m.modules() if isinstance(l, SZLinear))
    return m, qs, eb, bits, (lo, hi)


def parse_row(r: str):
    if r in ("fp32", "int3", "plain"):
        return r, None
    for kind in ("layer", "none"):
        if r.startswith(kind):
            return kind, float(r[len(kind):])
    raise SystemExit(f"unknown row {r!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--rows", default="fp32,int3,plain,layer0.5,none0.5")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--select", action="store_true", help="score on calibration_text() windows after the calibration "
                   "ones instead of evaluation_text(): for choosing alpha without looking at the evaluation text")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    path = smollm2.model_dir()
    with _eval._quiet():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = lambda text: torch.tensor(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if a.select:
        ev = _eval.make_windows(enc(smollm2.calibration_text())[a.calib_windows * CTX:], CTX, a.windows)
    else:
        ev = _eval.make_windows(enc(smollm2.evaluation_text()), CTX, a.windows)
    rows = [parse_row(r) for r in a.rows.split(",")]
    h = None
    if any(k in ("layer", "none") for k, _ in rows):
        t0 = time.perf_counter()
        h = input_second_moments(model, calibration_windows(enc(smollm2.calibration_text()), CTX, a.calib_windows))
        print(f"calibration: {a.calib_windows} x {CTX} tokens, {len(h)} layers, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    print(f"# {datetime.date.today()}  {_eval.machine_line(_eval.machine_info())}")
    where = "selection: calibration text after the calibration windows" if a.select else "evaluation text"
    print(f"# {' '.join(sys.argv)}  ({where}, {ev.shape[0]} x {CTX} tokens, calibration {a.calib_windows} x {CTX})")
    print("| row | bits/param | perplexity | error bound (model-wide) | per-element bound, min .. max over columns |"
          " quantize s |")
    print("|---|---|---|---|---|---|")
    for kind, alpha in rows:
        t0 = time.perf_counter()
        if kind == "fp32":
            m, bits, cells = model, 32.0, ("-", "-", "0")
        elif kind == "int3":
            m = copy.deepcopy(model)
            with torch.no_grad():
                lowbit.replace_linear(m, "int3", skip=_eval.SKIP, progress=False, group_size=128, method="mse")
            bits, _ = _eval.quantized_bits(m)
            cells = ("-", "none (int3 g128 mse)", f"{time.perf_counter() - t0:.0f}")
        else:
            m, qs, eb, bits, (lo, hi) = sz_row(model, h, kind, alpha, a.bits)
            cells = (f"{eb:.4g}", f"{lo:.3g} .. {hi:.3g}", f"{qs:.0f}")
        means, total, _ = _eval.score(m, ev, kind)
        ppl = math.exp(total / (ev.shape[0] * (CTX - 1)))
        label = kind if alpha is None else f"sz {kind} alpha={alpha:g}"
        label = {"plain": "sz, one bound per tensor"}.get(label, label)
        print(f"| {label} | {bits:.3f} | {ppl:.2f} | {cells[0]} | {cells[1]} | {cells[2]} |", flush=True)
        if m is not model:
            del m
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
