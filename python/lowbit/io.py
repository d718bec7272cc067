"""Checkpoints: safetensors files with format metadata and per-tensor checksums, folders written
by `lowbit quantize`, and bitsandbytes' 4-bit key layout.

A file written by `save_state_dict` is a plain safetensors file (no pickle) whose header
metadata holds
    lowbit.format_version   "2"
    lowbit.checksums        JSON {key: CRC32 of the tensor's bytes, 8 hex digits}
    lowbit.layers           JSON {layer prefix: that layer's format metadata}
The layers' metadata is also in the tensors themselves (`<prefix>_extra_state`, see lowbit.nn),
so a state dict moved without the file keeps it. `load_state_dict` checks every checksum before
anything reaches the model: a flipped bit raises CheckpointError naming the tensor and the file.
Files without lowbit metadata (lowbit format 1, or another library's) load without that check.

A folder written by `lowbit quantize`:
    model.safetensors   the quantized model's state dict (save_state_dict)
    lowbit.json         {"format", "options", "skip", "lowbit_version", ...}: how to rebuild the layers
    config.json         the source model's config, copied (plus its tokenizer files when present)

    model = AutoModel.from_config(AutoConfig.from_pretrained(out_dir))   # any weights: they get replaced
    lowbit.load_quantized(model, out_dir)
"""

from __future__ import annotations

import json
import os
import zlib

import torch
from torch import nn

from ._version import __version__
from .formats.nf4 import to_bnb_entries
from .nn import EXTRA_STATE, FORMAT_VERSION, Linear4bit, QuantLinear, decode_meta, replace_linear

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1
_LOWBIT_BUFFERS = ("weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                   "weight_offset", EXTRA_STATE)


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, truncated, not a safetensors file, or fails its checksums."""


def _crc(t: torch.Tensor) -> str:
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))  # dense, whatever t's strides
    return f"{zlib.crc32(flat.view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF:08x}"


def to_bnb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every Linear4bit (nf4/fp4) written in bitsandbytes' keys."""
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear4bit):
            continue
        p = f"{name}." if name else ""
        if mod.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"layer '{name}' is {mod.quant_type!r}; bitsandbytes reads only nf4/fp4")
        for k in _LOWBIT_BUFFERS:
            sd.pop(p + k, None)
        sd.update(to_bnb_entries(mod.quantized_weight, p))
    return sd


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share storage (e.g. tied weights): give each its own copy.
    seen: set = set()
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            sd[k] = v.clone()
        seen.add(key)
    return sd


def save_state_dict(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write model.state_dict() to a safetensors file with lowbit's metadata and checksums.
    Refuses to overwrite an existing file unless overwrite=True."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path {path!r} exists; pass overwrite=True to replace it")
    sd = _plain_state_dict(model)
    layers = {name: mod.format_metadata() for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
    meta = {
        "format": "pt",
        "lowbit.format_version": str(FORMAT_VERSION),
        "lowbit.version": __version__,
        "lowbit.checksums": json.dumps({k: _crc(v) for k, v in sd.items()}, sort_keys=True),
        "lowbit.layers": json.dumps(layers, sort_keys=True),
    }
    save_file(sd, path, metadata=meta)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each checked against lowbit's checksum when the file has
    them. Raises FileNotFoundError, or CheckpointError naming the path (and the tensor)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: lowbit's own error, naming the file
        raise CheckpointError(f"{path!r} is not a readable safetensors file (damaged, truncated or foreign): "
                              f"{type(e).__name__}: {e}") from None
    version = header.get("lowbit.format_version")
    if version is not None:
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise CheckpointError(f"{path!r} has lowbit format version {version!r}; this lowbit "
                                  f"({__version__}) reads versions <= {FORMAT_VERSION}: upgrade lowbit")
        try:
            sums = json.loads(header["lowbit.checksums"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path!r}: lowbit checksums are missing or unreadable ({e})") from None
        if set(sums) != set(sd):
            missing = sorted(set(sums) ^ set(sd))[:5]
            raise CheckpointError(f"{path!r}: tensors and checksums differ (e.g. {missing})")
        for k, t in sd.items():
            got = _crc(t)
            if got != sums[k]:
                raise CheckpointError(f"{path!r}: tensor {k!r} fails its checksum (stored {sums[k]}, computed {got}): "
                                      "the file is damaged")
    return sd


def load_state_dict(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a safetensors file written by save_state_dict (or a bnb 4-bit checkpoint) into model,
    after checking its checksums; returns torch's (missing_keys, unexpected_keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model.load_state_dict(read_state_dict(path), strict=strict)


def layer_formats(path: str | os.PathLike) -> dict[str, dict]:
    """{layer prefix: format metadata} of a file written by save_state_dict ({} for other files)."""
    sd = read_state_dict(path)
    return {k[: -len(EXTRA_STATE) - 1]: decode_meta(v, k) for k, v in sd.items() if k.endswith(EXTRA_STATE)}


def write_manifest(out_dir: str | os.PathLike, quant_type: str, options: dict, skip, **extra) -> dict:
    """Write OUT_DIR/lowbit.json (overwrites); returns what was written."""
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = read_manifest(path)
    wpath = os.path.join(os.fspath(path), WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{wpath!r} not found: the checkpoint folder {os.fspath(path)!r} is incomplete")
    sd = read_state_dict(wpath)  # checked before the model changes
    model = replace_linear(model, meta["format"], skip=tuple(meta.get("skip", ())), progress=False,
                           **meta.get("options", {}))
    model.load_state_dict(sd, strict=strict)
    return model


__all__ = ["CheckpointError", "layer_formats", "load_quantized", "load_state_dict", "read_manifest",
           "read_state_dict", "save_state_dict", "to_bnb_state_dict", "write_manifest"]
