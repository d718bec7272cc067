"""`lowbit export MODEL_DIR OUT_DIR --to hf-bnb`: a Hugging Face model folder (full precision, or
saved by transformers with a lowbit quantization_config) written as a folder that transformers +
bitsandbytes load and vLLM serves: bitsandbytes' key names and a `quant_method: bitsandbytes`
quantization_config (lowbit.integrations.bitsandbytes.save_pretrained_bnb). A folder written by
`lowbit quantize` (lowbit.json, lowbit's own keys) is refused up front: transformers cannot load it."""

from __future__ import annotations

import contextlib
import os
import sys

from ._tools import UsageError, read_config

TARGETS = ("hf-bnb",)


def _export(a) -> int:
    src, out = os.fspath(a.model_dir), os.fspath(a.out_dir)
    config = read_config(src)
    if a.to not in TARGETS:
        raise UsageError(f"--to {a.to!r} is not supported; choose one of {', '.join(TARGETS)}")
    if a.format not in ("nf4", "fp4"):
        raise UsageError(f"--format {a.format!r}: bitsandbytes 4-bit folders hold nf4 or fp4")
    if os.path.exists(out) and not a.force:
        raise UsageError(f"OUT_DIR {out!r} exists; pass --force to overwrite it")
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(src):
        raise UsageError("OUT_DIR must not be MODEL_DIR (it would overwrite the source model)")
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    # Checked before loading: transformers would read lowbit's own keys (or bitsandbytes') as
    # unknown weights and fail deep inside from_pretrained with a long report.
    if os.path.isfile(os.path.join(src, "lowbit.json")):
        raise UsageError(f"MODEL_DIR {src!r} was written by `lowbit quantize` (it has lowbit.json), which "
                         "lowbit export cannot read; export the full-precision folder it was quantized from, "
                         "or a folder saved by transformers with a LowbitConfig")
    if qc.get("quant_method") == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        raise UsageError(f"MODEL_DIR {src!r} is already a bitsandbytes folder (quantization_config); lowbit export "
                         "reads a full-precision folder or one saved by transformers with a LowbitConfig")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from lowbit.integrations.bitsandbytes import save_pretrained_bnb
        from lowbit.integrations.transformers import LowbitConfig
    except ImportError as e:
        raise UsageError(f"lowbit export needs transformers >= 5 (pip install 'lowbit[transformers]'): {e}") from None
    from ._quantize import _quiet_transformers

    quantized = qc.get("quant_method") == "lowbit"
    kwargs = {} if quantized else {"quantization_config": LowbitConfig(a.format, blocksize=a.blocksize,
                                                                      double_quant=not a.no_double_quant)}
    causal = any(str(arch).endswith("ForCausalLM") for arch in config.get("architectures") or ())
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        # stdout to stderr and transformers quiet: its loading report would bury the one-line error
        with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
            model = auto.from_pretrained(src, local_files_only=True, **kwargs)
    except Exception as e:  # missing or mismatched weights, unknown model type, ...: the user's folder
        raise UsageError(f"cannot load a model from MODEL_DIR {src!r}: {_first_line(e)}") from None
    try:
        save_pretrained_bnb(model, out)
    except ValueError as e:  # a layer bitsandbytes cannot hold (named in the message)
        raise UsageError(_first_line(e)) from None
    print(f"wrote {out} (bitsandbytes 4-bit, {a.format}; load with transformers + bitsandbytes)")
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
