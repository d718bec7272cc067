"""`lowbit export MODEL_DIR OUT_DIR --to hf-bnb`: a Hugging Face model folder (full precision, or
saved by transformers with a lowbit quantization_config) written as a folder that transformers +
bitsandbytes load and vLLM serves: bitsandbytes' key names and a `quant_method: bitsandbytes`
quantization_config (lowbit.integrations.transformers.save_pretrained_bnb)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from ._tools import UsageError

TARGETS = ("hf-bnb",)


def _export(a) -> int:
    src, out = os.fspath(a.model_dir), os.fspath(a.out_dir)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise UsageError(f"MODEL_DIR {src!r} is not a Hugging Face model folder (no config.json)")
    if a.to not in TARGETS:
        raise UsageError(f"--to {a.to!r} is not supported; choose one of {', '.join(TARGETS)}")
    if a.format not in ("nf4", "fp4"):
        raise UsageError(f"--format {a.format!r}: bitsandbytes 4-bit folders hold nf4 or fp4")
    if os.path.exists(out) and not a.force:
        raise UsageError(f"OUT_DIR {out!r} exists; pass --force to overwrite it")
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(src):
        raise UsageError("OUT_DIR must not be MODEL_DIR (it would overwrite the source model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from lowbit.integrations.transformers import LowbitConfig, save_pretrained_bnb
    except ImportError as e:
        raise UsageError(f"lowbit export needs transformers >= 5 (pip install 'lowbit[transformers]'): {e}") from None
    config = json.load(open(os.path.join(src, "config.json")))
    quantized = (config.get("quantization_config") or {}).get("quant_method") == "lowbit"
    kwargs = {} if quantized else {"quantization_config": LowbitConfig(a.format, blocksize=a.blocksize,
                                                                      double_quant=not a.no_double_quant)}
    causal = any(str(arch).endswith("ForCausalLM") for arch in config.get("architectures") or ())
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = auto.from_pretrained(src, local_files_only=True, **kwargs)
        save_pretrained_bnb(model, out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out} (bitsandbytes 4-bit, {a.format}; load with transformers + bitsandbytes)")
    return 0
