"""Command line (`lowbit ...`, or `python -m lowbit.cli ...`).

    lowbit demo     [--out DIR] [--no-plot] [--windows N] [--ctx N] [--minilm] [--no-bnb] [--threads N]
        Quantize the projections of the real SmolLM2-135M-Instruct with each format (nf4, fp4, optimal
        b64 dq; int4/int3 g128, int2 g64, mse; sz abs 0.03; bitsandbytes nf4 when it imports) and report
        bits/param, perplexity with the paired NLL delta vs fp32 +- se, CPU prefill / decode tokens/s,
        quantize time and a greedy answer each; writes DIR/report.md, report.json and, when matplotlib
        imports, DIR/rate_distortion.png. --minilm adds the all-MiniLM-L6-v2 table (weight RMSE, embedding
        cosine, latency) in DIR/minilm, which runs alone when the SmolLM2 fixture is not installed.
    lowbit quantize MODEL_DIR OUT_DIR --format F [--skip a,b] [--group-size N] [--blocksize N]
                    [--no-double-quant] [--error-bound X] [--mode abs|rel] [--force]
                    [--calibration TEXTFILE [--calibration-windows N] [--calibration-ctx N]]
        Quantize a Hugging Face model folder; writes OUT_DIR/model.safetensors, lowbit.json,
        config.json. Load it back with lowbit.load_quantized(model, OUT_DIR). --calibration (optimal,
        sz): fit each layer to its output error on the text's activations (one forward pass).
    lowbit bench    [--json] [--device cpu|cuda] [--quick]
        Kernel timings against torch's dense matmul on this device (ratios from the same run).
    lowbit export   MODEL_DIR OUT_DIR --to hf-bnb [--format nf4|fp4] [--blocksize N] [--no-double-quant] [--force]
        Write a folder transformers + bitsandbytes load (and vLLM serves): bnb key names and a
        bitsandbytes quantization_config. MODEL_DIR: full precision, or saved with a LowbitConfig.
    lowbit tune     --out FILE [--shapes NxK,...] [--quick] [--force]
        On a CUDA card: time every candidate config for those shapes and write the card's table
        (kernels/_configs/<card>.json), used at run time instead of timing on first call.
    lowbit finetune MODEL_DIR [TEXT] [--steps N] [--seq-len N] [--batch N] [--r N] [--out DIR] [--force]
                    [--compare] [--eval-text FILE]
        QLoRA on a causal-LM folder: nf4 + LoRA, gradient checkpointing, the offloaded AdamW; loss
        before/after, the adapter in DIR (default ./lowbit-finetune; load it with
        lowbit._finetune.load_adapter(DIR)), memory vs dense LoRA with --compare (docs/training.md).
    lowbit tune-scales QUANTIZED_DIR --text FILE --out DIR [--teacher MODEL_DIR] [--eval-text FILE] [--steps N]
                    [--lr X] [--ctx N] [--batch N] [--eval-windows N] [--eval-every N] [--force]
        PEQA: train only the int scales of an int2/3/4 folder to the unquantized model's next-token
        distributions (KL); writes a new folder (same bytes per parameter) that lowbit eval reads (docs/int.md).
    lowbit eval     MODEL_DIR|smollm2 [--format F ...] [--text FILE] [--ctx N] [--windows N] [--json]
                    [--generate PROMPT] [--max-new-tokens N] [--threads N] [--no-bnb] [--group-size N] [--error-bound X]
                    [--calibration TEXTFILE [--calibration-windows N] [--calibration-ctx N]]
        Perplexity on non-overlapping windows of a text: fp32, each format (fresh copy, lm_head dense) and
        bitsandbytes' nf4; paired per-token NLL deltas vs fp32 with their standard error, bits/param,
        quantize time, tokens/s. A `lowbit quantize` folder is evaluated as saved.

Usage errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ._bench import _bench
from ._demo import _demo
from ._eval import _eval, add_arguments as _eval_arguments
from ._export import _export
from ._finetune import _finetune
from ._tune_scales import _tune_scales, add_arguments as _tune_scales_arguments
from ._quantize import FORMATS, _positive_float, _positive_int, _quantize, add_format_arguments
from ._quantize import add_calibration_arguments as _calibration_arguments
from ._tools import UsageError
from ._tune import _tune


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line
        raise UsageError(message)


# --------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="low-bit quantization kernels for PyTorch")
    # Not required=True: argparse would then say only "required: cmd"; main() names the commands instead.
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    d = sub.add_parser("demo", help="quantize SmolLM2-135M-Instruct with each format: perplexity, size, speed, answers")
    d.add_argument("--out", default="lowbit-demo", help="folder for report.md, report.json and rate_distortion.png")
    d.add_argument("--windows", type=_positive_int, default=8,
                   help="SmolLM2: perplexity windows scored (default 8)")
    d.add_argument("--ctx", type=_positive_int, default=512, help="SmolLM2: tokens per window (default 512)")
    d.add_argument("--minilm", action="store_true", help="also the all-MiniLM-L6-v2 table (weight error, embedding "
                   "cosine, latency) in OUT/minilm")
    d.add_argument("--no-bnb", action="store_true", help="no bitsandbytes nf4 row even when bitsandbytes imports")
    d.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)  # tests: a causal-LM folder for SmolLM2's
    d.add_argument("--text", default=None, help=argparse.SUPPRESS)  # tests: a text file for the evaluation text
    d.add_argument("--no-plot", action="store_true", help="do not write rate_distortion.png")
    d.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the small reference-path ops gain little from more, and "
                        "multi-threaded timings are unstable on a shared machine)")
    q = sub.add_parser("quantize", help="quantize every nn.Linear of a Hugging Face model folder")
    q.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder: full precision, or "
                   "bitsandbytes 4-bit (nf4/fp4; --format nf4/fp4 keeps its bytes, other formats re-quantize)")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    q.add_argument("--skip", default=None, help="comma-separated modules to leave dense, by full name or dotted "
                   "suffix; a module keeps every Linear inside it dense (replace_linear's rule, "
                   "lowbit.nn.skip_matches); default lm_head; '' for none")
    add_format_arguments(q)  # every family's options (lowbit.nn.family)
    q.add_argument("--force", action="store_true", help="write into OUT_DIR even if it exists")
    _calibration_arguments(q)
    b = sub.add_parser("bench", help="kernel timings vs torch dense matmul on this device")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--quick", action="store_true", help="tiny shapes (also LOWBIT_BENCH_QUICK=1)")
    b.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's; 1 on a busy machine)")
    e = sub.add_parser("export", help="write a model folder in another library's format")
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--to", required=True, help="hf-bnb: transformers + bitsandbytes 4-bit")
    e.add_argument("--format", default="nf4", help="nf4 (default) or fp4")
    e.add_argument("--blocksize", type=_positive_int, default=64)
    e.add_argument("--no-double-quant", action="store_true")
    e.add_argument("--force", action="store_true", help="write into OUT_DIR even if it exists")
    t = sub.add_parser("tune", help="time the kernel configs on this CUDA card and write its config table")
    t.add_argument("--out", required=True, help="the table to write, e.g. kernels/_configs/<card>.json")
    t.add_argument("--shapes", default=None, help="N x K list, e.g. 4096x4096,8192x28672")
    t.add_argument("--quick", action="store_true", help="M in 1, 4, 16 only")
    t.add_argument("--force", action="store_true", help="overwrite --out")
    f = sub.add_parser("finetune", help="QLoRA fine-tune of a causal-LM folder on a text file")
    f.add_argument("model_dir", metavar="MODEL_DIR")
    f.add_argument("text", metavar="TEXT", nargs="?", default=None, help="a UTF-8 text file (default: a sample)")
    f.add_argument("--steps", type=_positive_int, default=40)
    f.add_argument("--seq-len", type=_positive_int, default=64)
    f.add_argument("--batch", type=_positive_int, default=4)
    f.add_argument("--r", type=_positive_int, default=16, help="LoRA rank")
    f.add_argument("--out", default=None, help="folder for adapter.safetensors and adapter.json (default: "
                   "./lowbit-finetune; an existing non-empty folder needs --force)")
    f.add_argument("--force", action="store_true", help="write the adapter into --out even if it holds files")
    f.add_argument("--compare", action="store_true", help="also run dense LoRA and compare memory")
    f.add_argument("--eval-text", default=None, help="held-out UTF-8 text: perplexity before/after on its first 8 "
                   "windows (default: 8 random windows of TEXT)")
    _tune_scales_arguments(sub.add_parser("tune-scales", help="PEQA: tune only the int scales of a quantized folder "
                                          "against the unquantized model"))
    _eval_arguments(sub.add_parser("eval", help="perplexity of a causal LM: fp32 vs each format and bitsandbytes nf4"))
    return p


def commands(parser: argparse.ArgumentParser) -> list[str]:
    """The sub-command names, in the order they were registered."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        if a.cmd is None:
            raise UsageError(f"choose a command: {', '.join(commands(parser))} (lowbit COMMAND --help)")
        if a.cmd == "quantize" and a.format not in FORMATS:
            raise UsageError(f"unsupported format {a.format!r}; choose one of {', '.join(FORMATS)}")
        return {"demo": _demo, "quantize": _quantize, "bench": _bench, "finetune": _finetune, "export": _export, "tune": _tune, "eval": _eval,
                "tune-scales": _tune_scales}[a.cmd](a)
    except UsageError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
