"""SmolLM2-135M-Instruct perplexity of mxfp4 / nvfp4 with the standard scale rules and with `scale_search=True`
(each block's scale byte chosen by least squared error among the standard one and its neighbours;
lowbit.formats.blockfp.SCALE_SEARCH_OFFSETS), on `lowbit eval`'s windows and scoring (lm_head kept dense).

    python benchmarks/blockfp_scale_search.py [--windows 16]

docs/blockfp.md quotes its output.
"""

from __future__ import annotations

import argparse
import math

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from lowbit import _eval, smollm2

    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = smollm2.model_dir()
    model = _eval._load_fp_model(path)
    text, _ = _eval.read_text(None)
    ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = _eval.make_windows(ids, 512, a.windows)
    n = windows.shape[0] * (windows.shape[1] - 1)
    print("| format | scale bytes | perplexity |\n|---|---|---|")
    _, total, _ = _eval.score(model, windows, "fp32")
    print(f"| fp32 | - | {math.exp(total / n):.2f} |", flush=True)
    for quant_type in ("mxfp4", "nvfp4"):
        for search in (False, True):
            m, _ = _eval.quantize_copy(model, quant_type, {"scale_search": search})
            _, total, _ = _eval.score(m, windows, f"{quant_type} scale_search={search}")
            rule = "least-error neighbour" if search else "standard rule"
            print(f"| {quant_type} | {rule} | {math.exp(total / n):.2f} |", flush=True)


if __name__ == "__main__":
    main()
