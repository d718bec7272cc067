"""Quantized checkpoints written by `lowbit quantize`: a folder with

    model.safetensors   the quantized model's state dict (lowbit.save_state_dict; no pickle)
    lowbit.json         {"format", "options", "skip", "lowbit_version", ...}: how to rebuild the layers
    config.json         the source model's config, copied (plus its tokenizer files when present)

    model = AutoModel.from_config(AutoConfig.from_pretrained(out_dir))   # any weights: they get replaced
    lowbit.load_quantized(model, out_dir)
"""

from __future__ import annotations

import json
import os

from torch import nn

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1


def write_manifest(out_dir: str | os.PathLike, quant_type: str, options: dict, skip, **extra) -> dict:
    """Write OUT_DIR/lowbit.json (overwrites); returns what was written."""
    from ._version import __version__

    meta = {
        "manifest_version": MANIFEST_VERSION,
        "format": quant_type,
        "options": dict(options),
        "skip": list(skip),
        "lowbit_version": __version__,
        **extra,
    }
    with open(os.path.join(os.fspath(out_dir), MANIFEST), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    return meta


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed lowbit.json of a folder written by `lowbit quantize` (FileNotFoundError/ValueError)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (expected a folder written by `lowbit quantize`)")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{mpath!r} not found: {path!r} is not a folder written by `lowbit quantize`")
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        raise ValueError(f"{mpath!r} has no 'format' entry")
    if not isinstance(meta.get("options", {}), dict) or not isinstance(meta.get("skip", []), list):
        raise ValueError(f"{mpath!r}: 'options' must be an object and 'skip' a list")
    return meta


def load_quantized(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Turn `model` (the architecture the checkpoint came from, any weights) into the quantized
    model saved in `path` by `lowbit quantize`: replace_linear with the saved format, options and
    skip list, then load OUT_DIR/model.safetensors. Modifies `model` in place and returns it."""
    from .nn import replace_linear
    from .serialization import load_state_dict

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = read_manifest(path)
    wpath = os.path.join(os.fspath(path), WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{wpath!r} not found: the checkpoint folder {os.fspath(path)!r} is incomplete")
    replace_linear(model, meta["format"], skip=tuple(meta.get("skip", ())), progress=False, **meta.get("options", {}))
    load_state_dict(model, wpath, strict=strict)
    return model


__all__ = ["load_quantized", "read_manifest", "write_manifest"]
