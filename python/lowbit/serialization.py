"""Checkpoints: plain-tensor state dicts, safetensors files, and bitsandbytes' 4-bit key layout.

bitsandbytes saves a `Linear4bit` as
  weight (uint8 [numel/2, 1]), weight.absmax, weight.quant_map, and with double quantization
  weight.nested_absmax, weight.nested_quant_map, plus weight.quant_state.bitsandbytes__<type>:
  a uint8 tensor holding UTF-8 JSON {quant_type, blocksize, dtype, shape, nested_blocksize,
  nested_dtype, nested_offset}.
Our bytes are bnb's bytes, so conversion only renames keys and reshapes views.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bnb_to_lowbit_entries(sd: dict, prefix: str, module) -> dict:
    """The lowbit entries (prefix + weight, weight_absmax, ...) for one bnb Linear4bit's keys."""
    qs_keys = [k for k in sd if k.startswith(prefix + "weight.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"bitsandbytes checkpoint at '{prefix}weight' must have one quant_state entry, found {qs_keys}")
    meta = json.loads(bytes(sd[qs_keys[0]].tolist()).decode("utf-8"))
    qt = meta["quant_type"]
    if qt != module.quant_type and not (module.quant_type == "optimal"):
        raise ValueError(
            f"checkpoint at '{prefix}weight' is {qt}, but the layer was built with quant_type={module.quant_type!r}"
        )
    if int(meta["blocksize"]) != module.blocksize:
        raise ValueError(
            f"checkpoint at '{prefix}weight' has blocksize {meta['blocksize']}, the layer has {module.blocksize}"
        )
    shape = tuple(meta["shape"])
    if shape != (module.out_features, module.in_features):
        raise ValueError(f"checkpoint at '{prefix}weight' has shape {shape}, the layer is "
                         f"{(module.out_features, module.in_features)}")
    module.weight_dtype = _DTYPES.get(meta.get("dtype", "float32"), torch.float32)
    rows = module.in_features % module.blocksize == 0
    out, inn = shape
    codes = sd[prefix + "weight"].reshape(-1)
    absmax = sd[prefix + "weight.absmax"].reshape(-1)
    res = {
        prefix + "weight": codes.view(out, inn // 2) if rows else codes,
        prefix + "weight_absmax": absmax.view(out, inn // module.blocksize) if rows else absmax,
        prefix + "weight_code": sd[prefix + "weight.quant_map"].float(),
    }
    if prefix + "weight.nested_absmax" in sd:
        res[prefix + "weight_nested_absmax"] = sd[prefix + "weight.nested_absmax"]
        res[prefix + "weight_nested_code"] = sd[prefix + "weight.nested_quant_map"]
        res[prefix + "weight_offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    return res


def to_bnb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every Linear4bit (nf4/fp4) written in bitsandbytes' keys."""
    from .nn import Linear4bit

    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear4bit):
            continue
        if mod.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"layer '{name}' is {mod.quant_type!r}; bitsandbytes reads only nf4/fp4")
        p = f"{name}." if name else ""
        q = mod.quantized_weight
        for k in [k for k in sd if k.startswith(p + "weight") and k[len(p):].split(".")[0] in (
                "weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code", "weight_offset")]:
            del sd[k]
        sd[p + "weight"] = q.codes.reshape(-1, 1)
        sd[p + "weight.absmax"] = q.absmax
        sd[p + "weight.quant_map"] = q.code
        meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
                "shape": list(q.shape)}
        if q.double_quant:
            sd[p + "weight.nested_absmax"] = q.nested_absmax
            sd[p + "weight.nested_quant_map"] = q.nested_code.clone()
            meta.update({"nested_blocksize": q.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": float(q.offset)})
        sd[p + f"weight.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


def save_state_dict(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write model.state_dict() to a safetensors file (no pickle). Refuses to overwrite unless asked."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path {os.fspath(path)!r} exists; pass overwrite=True to replace it")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share storage (e.g. tied weights): give each its own copy.
    seen: set = set()
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            sd[k] = v.clone()
        seen.add(key)
    save_file(sd, os.fspath(path))


def load_state_dict(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a safetensors file written by save_state_dict (or a bnb 4-bit checkpoint) into model."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r} is not a file")
    return model.load_state_dict(load_file(os.fspath(path)), strict=strict)
