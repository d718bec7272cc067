"""Per-matrix RMSE of nf4 / fp4 / optimal (blocksize 64, double quant) on real MiniLM weights.

    python benchmarks/minilm_4bit_rmse.py
"""

import torch

import lowbit
from lowbit.minilm import load_minilm


def main() -> None:
    model, _ = load_minilm()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
             "encoder.layer.3.output.dense", "encoder.layer.5.attention.output.dense"]
    print("| matrix | shape | nf4 RMSE | fp4 RMSE | optimal RMSE | optimal / nf4 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        w = model.get_submodule(name).weight.detach()
        r = {}
        for qt in ("nf4", "fp4", "optimal"):
            q = lowbit.quantize_4bit(w, 64, qt, True)
            r[qt] = float((lowbit.dequantize_4bit(q, torch.float32).double() - w.double()).pow(2).mean().sqrt())
        print(f"| {name} | {tuple(w.shape)} | {r['nf4']:.4e} | {r['fp4']:.4e} | {r['optimal']:.4e} | "
              f"{r['optimal'] / r['nf4']:.3f} |")


if __name__ == "__main__":
    main()
