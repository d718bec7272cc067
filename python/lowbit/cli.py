"""Command line: `lowbit demo` (what `make demo` runs).

The demo quantizes every Linear of the real all-MiniLM-L6-v2 with each 4-bit format and prints
bits/param, size, weight RMSE / max error and sentence-embedding cosine to fp32, then writes
lowbit-demo/report.md. (The full demo/quantize/bench CLI is issue 6.)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def _demo(args) -> int:
    import torch
    from torch import nn

    import lowbit
    from lowbit.minilm import SENTENCES, embed, load_minilm

    torch.manual_seed(0)
    model, tok = load_minilm()
    ref = embed(model, tok, SENTENCES)
    n_params = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    def best_of_3(mod):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            embed(mod, tok, SENTENCES)
            times.append(time.perf_counter() - t0)
        return min(times)

    t_fp32 = best_of_3(model)
    rows = []
    formats = [("nf4", {}), ("fp4", {}), ("optimal", {}), ("nf4", {"double_quant": False})]
    for qt, opts in formats:
        m = copy.deepcopy(model)
        dense = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if type(mod) is nn.Linear}
        lowbit.replace_linear(m, qt, skip=(), progress=False, **opts)
        se = mx = 0.0
        nbytes = 0
        for n, mod in m.named_modules():
            if isinstance(mod, lowbit.Linear4bit):
                d = mod.dequantized_weight(torch.float32).double() - dense[n].double()
                se += float(d.pow(2).sum())
                mx = max(mx, float(d.abs().max()))
                nbytes += mod.quantized_weight.nbytes
        e = embed(m, tok, SENTENCES)
        t = best_of_3(m)
        cos = float(torch.nn.functional.cosine_similarity(e, ref).mean())
        name = qt + ("" if opts.get("double_quant", True) else " (fp32 scales)")
        rows.append((name, 8 * nbytes / n_params, nbytes / 1e6, (se / n_params) ** 0.5, mx, cos, t / t_fp32))
    head = "| format | bits/param | Linear weights (MB) | weight RMSE | max error | cosine to fp32 | forward time vs fp32 |"
    lines = [head, "|---|---|---|---|---|---|---|",
             f"| fp32 | 32.000 | {4 * n_params / 1e6:.2f} | 0 | 0 | 1.0000 | 1.00 |"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.2f} | {r[3]:.3e} | {r[4]:.3e} | {r[5]:.4f} | {r[6]:.2f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("# lowbit demo: all-MiniLM-L6-v2, every Linear layer quantized\n\n")
        f.write(f"{len(SENTENCES)} real sentences; cosine of mean-pooled embeddings to the fp32 model; "
                "CPU forward latency uses the reference (dequantize + matmul) path.\n\n" + table + "\n")
    print(f"\nwrote {os.path.join(args.out, 'report.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit", description="low-bit quantization kernels for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 with each format and report the cost")
    d.add_argument("--out", default="lowbit-demo")
    a = p.parse_args(argv)
    if a.cmd == "demo":
        return _demo(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
