"""Checkpoints: safetensors files with format metadata and per-tensor checksums, folders written
by `lowbit quantize`, and bitsandbytes' 4-bit key layout.

A file written by `save_state_dict` is a plain safetensors file (no pickle) whose header
metadata holds
    lowbit.format_version   "3" (lowbit.nn.FORMAT_VERSION)
    lowbit.checksums        JSON {key: CRC32 of the tensor's bytes, 8 hex digits}
    lowbit.layers           JSON {layer prefix: that layer's format metadata}
The layers' metadata is also in the tensors themselves (`<prefix>_extra_state`, see lowbit.nn),
so a state dict moved without the file keeps it. `load_state_dict` checks every checksum before
anything reaches the model: a flipped bit raises CheckpointError naming the tensor and the file.
Files without lowbit metadata (lowbit format 1, or another library's) load without that check; a file
with any of lowbit's header keys (or a damaged one) is always checked.

A folder written by `lowbit quantize`:
    model.safetensors   the quantized model's state dict (save_state_dict)
    lowbit.json         {"format", "options", "skip", "lowbit_version", ...}: how to rebuild the layers
    config.json         the source model's config, copied (plus its tokenizer files when present)

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out_dir))  # the class config.json names
    lowbit.load_quantized(model, out_dir)   # (AutoModel for an encoder) builds the layers from lowbit.json and
                                            # the file: no quantizer runs
"""

from __future__ import annotations

import json
import os
import threading
import warnings
import zlib

import torch
from torch import nn

from ._version import __version__
from .formats.nf4 import to_bnb_entries
from .nn import (EXTRA_STATE, FORMAT_VERSION, Linear4bit, QuantLinear, decode_meta, empty_layer, layer_factory,
                 skip_matches)

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1
_LOWBIT_BUFFERS = ("weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                   "weight_offset", EXTRA_STATE)


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, truncated, not a safetensors file, or fails its checksums."""


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere it can only be read by
    setting it, so it is set and put back at once, under a lock (another thread creating a file in
    that instant would get mode 0o022 applied)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, with the file mode that open() would have given: safetensors writes a
    new file with mode 0o600 whatever the umask (and replaces an existing file by one of mode 0o600), so a
    checkpoint meant for others to read was readable by its owner only. A new file gets 0o666 & ~umask; a
    file overwritten keeps its permission bits."""
    import stat

    from safetensors.torch import save_file

    path = os.fspath(path)
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except OSError:
        mode = None
    save_file(tensors, path, metadata=metadata)
    try:
        os.chmod(path, (0o666 & ~_umask()) if mode is None else mode)
    except OSError as e:  # a file system without modes (or not ours to chmod): the file itself is written
        warnings.warn(f"saved {path!r} but could not set its mode: {e}", stacklevel=2)


def _crc(t: torch.Tensor) -> str:
    # Dense, whatever t's strides; a dense CPU tensor is read in place (no copy: checking the checksums is
    # most of what loading a quantized folder costs).
    flat = t.detach().cpu().reshape(-1)
    if flat.stride(0) != 1:  # a one-element view of stride 0 (an expanded scalar): viewing it as bytes needs 1
        flat = torch.empty(flat.numel(), dtype=flat.dtype).copy_(flat)
    return f"{zlib.crc32(flat.view(torch.uint8).numpy()) & 0xFFFFFFFF:08x}"


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
    """model.state_dict() on the CPU, each tensor once: a name whose tensor is exactly another's (tied weights,
    e.g. a causal LM's lm_head and input embeddings) is left out and recorded by _tied_names, as transformers'
    save_pretrained does (SmolLM2's quantized folder held its 113 MB embedding twice). Tensors that only
    overlap get their own copy (safetensors refuses shared storage)."""
    sd: dict[str, torch.Tensor] = {}
    seen: set = set()
    for k, v in model.state_dict().items():
        v = v.detach()
        if v.numel() and _alias_key(v) in seen:
            continue  # an alias of an earlier name: _tied_names records it
        seen.add(_alias_key(v))
        sd[k] = v.contiguous().cpu()
    owners: set = set()
    for k, v in sd.items():  # overlapping, not identical: copies
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in owners:
            sd[k] = v.clone()
        owners.add(key)
    return sd


def _alias_key(v: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when one is the other (same memory, shape, strides and dtype)."""
    return v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype


def _tied_names(model: nn.Module, sd: dict) -> dict[str, str]:
    """{name left out of sd: the name in sd holding the same tensor} (see _plain_state_dict)."""
    full = model.state_dict()
    where = {}
    for k in sd:
        if k in full:
            where.setdefault(_alias_key(full[k]), k)
    tied = {}
    for k, v in full.items():
        if k not in sd and v.numel():
            src = where.get(_alias_key(v))
            if src is not None:
                tied[k] = src
    return tied


def save_state_dict(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write model.state_dict() to a safetensors file with lowbit's metadata and checksums.
    Refuses to overwrite an existing file unless overwrite=True."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path {path!r} exists; pass overwrite=True to replace it")
    _write_state_dict(model, _plain_state_dict(model), path)


def _write_state_dict(model: nn.Module, sd: dict, path: str) -> None:
    """sd (model's plain state dict, maybe with more entries) with lowbit's metadata and checksums."""
    layers = {name: mod.format_metadata() for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
    meta = {
        "format": "pt",
        "lowbit.format_version": str(FORMAT_VERSION),
        "lowbit.version": __version__,
        "lowbit.checksums": json.dumps({k: _crc(v) for k, v in sd.items()}, sort_keys=True),
        "lowbit.layers": json.dumps(layers, sort_keys=True),
    }
    tied = _tied_names(model, sd)
    if tied:  # read_state_dict puts these names back
        meta["lowbit.tied"] = json.dumps(tied, sort_keys=True)
    save_safetensors(sd, path, metadata=meta)


_HEADER_KEYS = ("lowbit.format_version", "lowbit.checksums", "lowbit.layers")


def _written_by_lowbit(header: dict) -> bool:
    """Whether a safetensors header is lowbit's: one of its keys, or a key one character away from one
    (a damaged key name must not pass for a foreign file, which loads without checksums)."""
    for key in header:
        for ours in _HEADER_KEYS:
            if key == ours or (len(key) == len(ours) and sum(a != b for a, b in zip(key, ours)) == 1):
                return True
    return False


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
    if _written_by_lowbit(header):
        # checked whenever ANY of lowbit's header keys is there (not only the version's): one flipped
        # bit in a key name used to turn every checksum check off, and a second flip in the data loaded
        version = FORMAT_VERSION if version is None else version
        if not str(version).isdigit() or int(version) > FORMAT_VERSION:
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
        try:
            tied = json.loads(header.get("lowbit.tied", "{}"))
        except ValueError as e:
            raise CheckpointError(f"{path!r}: lowbit.tied is unreadable ({e})") from None
        for alias, src in tied.items():  # tied weights stored once (_plain_state_dict): the same tensor again
            if src not in sd or alias in sd:
                raise CheckpointError(f"{path!r}: lowbit.tied names {alias!r} -> {src!r}, which the file does not "
                                      "hold that way")
            sd[alias] = sd[src]
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
    model saved in `path` by `lowbit quantize`, without quantizing anything: every nn.Linear that
    replace_linear would swap under the saved skip list becomes an empty layer of the saved format
    and options (lowbit.nn.empty_layer, the layers' allocating constructor), then
    OUT_DIR/model.safetensors is loaded into the model; each layer takes the data-dependent parts
    of its format (double quantization, dtype, SZ stream sizes) from its metadata and tensors there.
    The dense weights of those Linear layers are never read (they may hold anything, or sit on the
    meta device: such a layer is built on the CPU). The checksums and every layer's format metadata
    are checked before the model changes; if loading fails after that, the Linear layers are put
    back. With strict=False a layer the checkpoint holds nothing of is quantized from the model's own
    weight (as replace_linear would). Modifies `model` in place and returns it (for a bare nn.Linear,
    the new layer)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = read_manifest(path)
    wpath = os.path.join(os.fspath(path), WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{wpath!r} not found: the checkpoint folder {os.fspath(path)!r} is incomplete")
    sd = read_state_dict(wpath)  # checked before the model changes
    # the empty uint8 "<layer>.weight" markers of int/SZ layers (written for transformers, which then stops
    # on a lowbit folder without lowbit's integration instead of initialising those weights at random)
    sd = {k: v for k, v in sd.items() if not (k.rpartition(".")[2] == "weight" and v.dtype == torch.uint8
                                              and v.numel() == 0)}
    backbone = _backbone_of_old_folder(model, sd, path)
    if backbone is not None:
        load_quantized(backbone, path, strict)
        return model
    sd = _for_the_backbone(model, sd)
    fmt, opts, skip = meta["format"], dict(meta.get("options", {})), tuple(meta.get("skip", ()))
    if type(model) is nn.Linear:  # replace_linear's rule: a bare Linear is replaced, skip or not
        targets = [("", model)]
    else:
        # replace_linear's selection, so that the model gets the modules the checkpoint was saved from
        names = [n for n, _ in model.named_modules(remove_duplicate=False)]
        for s in skip:
            if not any(skip_matches(n, (s,)) for n in names):
                warnings.warn(f"load_quantized: skip name {s!r} of {os.path.join(os.fspath(path), MANIFEST)!r} "
                              "matches no module of the model", stacklevel=2)
        linears = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
        skipped = {id(m) for n, m in linears if skip_matches(n, skip)}
        targets = [(n, m) for n, m in linears if id(m) not in skipped]
    stored = {k.rpartition(".")[0] for k in sd}  # the modules the checkpoint holds tensors of
    built: dict[int, nn.Module] = {}  # a Linear shared under several names gets one layer, as in replace_linear
    for name, lin in targets:
        if id(lin) not in built:
            built[id(lin)] = _layer_to_load(name, lin, fmt, opts, sd, stored, strict)
    if type(model) is nn.Linear:
        layer = built[id(model)]
        layer.load_state_dict(sd, strict=strict)
        return layer
    for name, lin in targets:
        _set_module(model, name, built[id(lin)])
    try:
        model.load_state_dict(sd, strict=strict)
    except BaseException:
        for name, lin in targets:
            _set_module(model, name, lin)
        raise
    return model


def _backbone_of_old_folder(model: nn.Module, sd: dict, path) -> nn.Module | None:
    """lowbit quantize before 2026-12-07 loaded every folder with AutoModel: a causal LM's folder holds its
    backbone's keys (no `model.` prefix) and no LM head. Given the whole causal LM, return the backbone to
    load into when its head is tied to the input embeddings (nothing is lost); refuse an untied head."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model or set(sd) & set(model.state_dict()):
        return None
    if not set(sd) & set(base.state_dict()):
        return None
    head, emb = getattr(model, "get_output_embeddings", lambda: None)(), getattr(model, "get_input_embeddings", lambda: None)()
    if head is not None and not (emb is not None and head.weight is emb.weight):
        raise ValueError(f"{os.fspath(path)!r} was written by an older `lowbit quantize` from the model's backbone "
                         f"({type(base).__name__}): it holds no weights for {type(model).__name__}'s untied LM head. "
                         "Run `lowbit quantize` again on the source folder (it now keeps the head), or load the "
                         f"folder into the backbone (model.{prefix})")
    return base


def _for_the_backbone(model: nn.Module, sd: dict) -> dict:
    """A causal LM's folder loaded into its backbone (AutoModel.from_config of the same config): the keys
    without the `<base_model_prefix>.` prefix, the head's dropped. Any other state dict is returned as it is."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or set(sd) & set(model.state_dict()):
        return sd
    inner = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return inner if set(inner) & set(model.state_dict()) else sd


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _layer_to_load(name: str, lin: nn.Linear, fmt: str, opts: dict, sd: dict, stored: set, strict: bool) -> nn.Module:
    """The layer load_quantized swaps in for `lin`: allocated by its constructor and checked against the
    checkpoint's metadata for it (ValueError naming the key), or, when the checkpoint holds nothing of
    it and strict is False, quantized from `lin` (the one case that reads the dense weight)."""
    where = repr(name) if name else "the model (a bare nn.Linear)"
    if not strict and name not in stored:
        return layer_factory(fmt, opts)(lin)
    # A skeleton's Linear (meta weight) holds no memory to copy into: its layer is built on the CPU,
    # where the checkpoint's tensors are.
    device = lin.weight.device if lin.weight.device.type != "meta" else torch.device("cpu")
    try:
        layer = empty_layer(fmt, lin.in_features, lin.out_features, lin.bias is not None, device=device, **opts)
    except (ValueError, TypeError) as e:
        raise type(e)(f"load_quantized: layer {where} (nn.Linear in_features={lin.in_features}, out_features="
                      f"{lin.out_features}) cannot be built as {fmt!r} with options {opts}: {e}") from None
    if lin.bias is not None:
        # The bias keeps the dense layer's dtype, as from_linear's copy of it does (the constructor's is fp32).
        layer.bias = nn.Parameter(torch.zeros_like(lin.bias, device=device), requires_grad=layer.bias.requires_grad)
    key = f"{name}.{EXTRA_STATE}" if name else EXTRA_STATE
    if key in sd:
        layer._check_meta(decode_meta(sd[key], key), key)
    return layer


__all__ = ["CheckpointError", "layer_formats", "load_quantized", "load_state_dict", "read_manifest",
           "read_state_dict", "save_state_dict", "to_bnb_state_dict", "write_manifest"]
