"""lowbit as a vLLM quantization method: `vllm serve DIR` / `vllm.LLM(DIR)` on a lowbit folder.

A folder written by `lowbit quantize` or by transformers' `save_pretrained` with a `LowbitConfig` has
`"quant_method": "lowbit"` in config.json's `quantization_config`. vLLM picks the method registered under
that name; `pip install lowbit` declares the `vllm.general_plugins` entry point `lowbit =
lowbit.integrations.vllm:register`, which vLLM calls in every process it starts (the engine and its
workers), so no flag is needed. Importing this module registers it too (a script that does not rely on
the entry point). docs/integrations.md has the recipe and what was tested.

How a layer is served:
- `LowbitConfig.get_quant_method` gives every vLLM linear layer (`LinearBase`) that the checkpoint holds
  quantized a `LowbitLinearMethod`, and the others (modules_to_not_convert, or absent from the
  checkpoint's `lowbit.layers` header) vLLM's own `UnquantizedLinearMethod`.
- `create_weights` registers one empty placeholder per lowbit buffer name (`weight`, `weight_absmax`,
  `codes`, `scale`, `payload`, `_extra_state`, ...) with a weight loader that keeps each loaded tensor as
  it is, per shard. vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and tags each
  checkpoint tensor with its shard id ("q"/"k"/"v", 0/1): each shard's tensors are kept whole, so no
  byte is split or re-quantized.
- `process_weights_after_loading` builds, per shard, the lowbit layer the checkpoint describes
  (`lowbit.nn.empty_layer` + `load_state_dict`): the same metadata checks as every other lowbit loader
  (family, shape, quant_type, blocksize, bits, group size, error bound, format version), raised as a
  ValueError naming the vLLM layer and the checkpoint layer. Shards whose storage concatenates by output
  row exactly (int layers; 4-bit layers without double quantization) become one layer (`_merge_rows`);
  the others stay one lowbit layer per shard (double-quantized nf4: its second-level scale blocks of 256
  run across rows and its offset is per tensor; SZ: one stream per tensor). The placeholders are then
  dropped: the layer holds only the packed storage; there is no fp copy of any weight.
- `apply` runs the layer(s) (lowbit's ops: the C kernels on CPU, the Triton kernels on CUDA) and
  concatenates the shards' outputs along the last dimension, in vLLM's shard order.

Tensor parallelism: each rank loads the whole checkpoint layer and keeps its part, cut out of the packed
storage by `QuantLinear.narrow` (never re-quantized): its output rows of a column-parallel layer (kv heads
replicated across ranks as vLLM's loader does it), its input columns of a row-parallel one. nf4/fp4/optimal
cut at whole blocks (double-quantized scales decoded to fp32 first: their 256-scale blocks span rows), int
rows at whole groups (int3: 128-column quads), SZ not at all.

Refused at load, with the layer named: a split that would cut a block, group or SZ stream (tensor
parallelism), a fused vLLM layer whose shards are partly dense and partly quantized, a
checkpoint layer without lowbit metadata (or holding a dense weight where the config says quantized), a
format version newer than this lowbit reads, and an SZ layer asked for a dtype that cannot hold its
error bound.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import struct
from typing import Any, Optional

import torch
from torch import nn

from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from .._version import __version__
from ..nn import (EXTRA_STATE, FAMILIES, FORMAT_VERSION, REQUIRED, QuantLinear, decode_meta, empty_layer, family_named,
                  family_of, quant_types, skip_matches)

QUANT_METHOD = "lowbit"

# The quantization_config options of a family that describe the stored format are its Options
# (lowbit.nn.family) less these, which only steer quantization or computing:
_IGNORED_OPTIONS = ("quant_method", "quant_type", "format_version", "lowbit_version", "modules_to_not_convert",
                    "compute_dtype", "method")
_QKV = {"q": 0, "k": 1, "v": 2}


def _family(quant_type: Any) -> type:
    """The layer class of quant_type's family (ValueError naming the known quant types)."""
    try:
        return family_of(quant_type).layer
    except (TypeError, ValueError):
        raise ValueError(f"lowbit: quantization_config.quant_type must be one of {list(quant_types())}, got "
                         f"{quant_type!r}") from None


def _format_options(quant_type: str) -> tuple[str, ...]:
    return tuple(o for o in family_of(quant_type).option_names(quant_type) if o not in _IGNORED_OPTIONS)


@functools.lru_cache(maxsize=None)
def _checkpoint_tensors(family: str) -> dict[str, torch.dtype]:
    """The checkpoint tensors of one layer of `family` and their dtypes (the placeholders vLLM loads into),
    read from an empty layer of each of its quant types on the meta device (they may differ: nvfp4 has a
    global scale, mxfp4 none), plus save_pretrained's "weight" marker."""
    out = {"weight": torch.uint8}
    for quant_type in family_named(family).quant_types:
        m = empty_layer(quant_type, 256, 1, bias=False, device="meta")
        out.update({k: t.dtype for k, t in m.state_dict(keep_vars=True).items() if k != EXTRA_STATE and t is not None})
    return out


def _header(path: str) -> dict:
    """The JSON header of a safetensors file (its tensor table and __metadata__), read without the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_layers(model_dir: str) -> Optional[dict[str, dict]]:
    """{checkpoint layer name: lowbit format metadata} from the `lowbit.layers` entry lowbit writes into
    each safetensors header of a folder, or None when the folder has none (e.g. transformers'
    save_pretrained). ValueError for a file of a newer lowbit format version than this lowbit reads."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    layers: dict[str, dict] = {}
    found = False
    for path in files:
        meta = _header(path).get("__metadata__") or {}
        version = meta.get("lowbit.format_version")
        if version is not None and (not str(version).isdigit() or int(version) > FORMAT_VERSION):
            raise ValueError(f"lowbit: {path!r} has lowbit format version {version!r}; lowbit {__version__} reads "
                             f"versions <= {FORMAT_VERSION}: upgrade lowbit to serve it")
        if "lowbit.layers" in meta:
            found = True
            layers.update(json.loads(meta["lowbit.layers"]))
    return layers if found else None


class LowbitConfig(QuantizationConfig):
    """vLLM's view of a lowbit folder's `quantization_config` (quant_method "lowbit")."""

    def __init__(self, quant_type: str, options: dict, modules_to_not_convert: Optional[list] = None,
                 format_version: int = FORMAT_VERSION) -> None:
        super().__init__()
        self.layer_class = _family(quant_type)
        self.quant_type = quant_type
        self.options = dict(options)
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.format_version = format_version
        self._layers: Optional[dict] = None
        self._layers_read = False

    def __repr__(self) -> str:
        return f"LowbitConfig(quant_type={self.quant_type!r}, options={self.options})"

    # -- QuantizationConfig ----------------------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # lowbit's Triton kernels (CUDA); the CPU path has no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is enough

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LowbitConfig":
        if config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"lowbit: quantization_config.quant_method is {config.get('quant_method')!r}, "
                             f"not {QUANT_METHOD!r}")
        if "quant_type" not in config:
            raise ValueError("lowbit: quantization_config has no quant_type: this folder lacks lowbit's metadata "
                             "(write it with `lowbit quantize` or save_pretrained with LowbitConfig)")
        version = config.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"lowbit: quantization_config.format_version: this checkpoint has lowbit format "
                             f"version {version!r}; lowbit {__version__} reads versions <= {FORMAT_VERSION}: "
                             "upgrade lowbit to serve it")
        layer_class = _family(config["quant_type"])
        allowed = _format_options(config["quant_type"])
        unknown = [k for k in config if k not in allowed and k not in _IGNORED_OPTIONS]
        if unknown:
            raise ValueError(f"lowbit: quantization_config has option(s) {unknown} that quant_type "
                             f"{config['quant_type']!r} does not take (it takes {list(allowed)})")
        options = {k: config[k] for k in allowed if k in config}
        for o in family_of(config["quant_type"]).options:
            if o.default is REQUIRED and options.get(o.name) is None:
                options.pop(o.name, None)  # e.g. sz's error_bound: adopted from each layer's stream
        return cls(config["quant_type"], options, config.get("modules_to_not_convert"), version)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head: lowbit quantizes nn.Linear layers only
        names = self.checkpoint_names(prefix)
        quantized = [self._is_quantized(n) for n in names]
        if all(quantized):
            return LowbitLinearMethod(self, prefix, names)
        if not any(quantized):
            return UnquantizedLinearMethod()
        dense = [n for n, q in zip(names, quantized) if not q]
        raise ValueError(f"lowbit: vLLM fuses {names} into one layer {prefix!r}, but the checkpoint keeps {dense} "
                         "dense and quantizes the others; a fused layer must be all quantized or all dense "
                         "(re-quantize with the same --skip for all of them)")

    # -- helpers ---------------------------------------------------------------------------------
    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint layers behind vLLM's layer `prefix`, in vLLM's shard order (q, k, v for
        qkv_proj): vLLM sets packed_modules_mapping from the model class."""
        parent, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def _is_quantized(self, name: str) -> bool:
        layers = self._checkpoint_layers()
        if layers is not None:
            return name in layers
        if self.modules_to_not_convert:
            return not skip_matches(name, self.modules_to_not_convert)
        return True

    def _checkpoint_layers(self) -> Optional[dict]:
        if not self._layers_read:
            self._layers_read = True
            try:
                from vllm.config import get_current_vllm_config_or_none
                cfg = get_current_vllm_config_or_none()
                model = cfg.model_config.model if cfg is not None and cfg.model_config is not None else None
            except ImportError:
                model = None
            if isinstance(model, str) and os.path.isdir(model):
                self._layers = checkpoint_layers(model)
        return self._layers


def _shard_index(layer: nn.Module, shard: Any) -> Optional[int]:
    if shard is None:
        return None
    if isinstance(shard, str) and shard in _QKV:
        return _QKV[shard]
    if isinstance(shard, int) and not isinstance(shard, bool):
        return shard
    raise ValueError(f"lowbit: layer {layer.lowbit_prefix!r}: vLLM loads a checkpoint tensor into shard "
                     f"{shard!r}, which lowbit cannot serve (one checkpoint layer per vLLM shard)")


class LowbitLinearMethod(LinearMethodBase):
    """One vLLM linear layer (possibly fused: qkv_proj, gate_up_proj) served from lowbit storage."""

    def __init__(self, config: LowbitConfig, prefix: str, names: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.names = names

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        # Tensor parallelism: every rank loads the whole checkpoint layer and keeps its part, cut from the
        # stored codes and scales by QuantLinear.narrow (nothing re-quantized): its output rows for a
        # column-parallel layer (qkv, gate_up: output_partition_sizes are this rank's), its input columns for a
        # row-parallel one (o_proj, down_proj: vLLM all-reduces the partial sums and adds the bias once).
        tp = getattr(layer, "tp_size", 1)
        split_in = input_size_per_partition != input_size
        split_out = sum(output_partition_sizes) != output_size
        if split_in and split_out:
            raise ValueError(f"lowbit: layer {self.prefix!r}: vLLM splits both its input and its output across "
                             f"ranks (tp_size={tp}), which lowbit does not serve")
        layer.lowbit_split = 1 if split_in else 0 if split_out else None
        layer.lowbit_rank = getattr(layer, "tp_rank", 0)
        layer.lowbit_tp = tp
        layer.lowbit_in_full = input_size
        if len(output_partition_sizes) != len(self.names) and len(self.names) > 1:
            raise ValueError(f"lowbit: layer {self.prefix!r} has {len(output_partition_sizes)} shards but the "
                             f"checkpoint layers {self.names}")
        layer.lowbit_prefix = self.prefix
        layer.lowbit_sizes = list(output_partition_sizes)
        layer.lowbit_in = input_size_per_partition
        layer.lowbit_dtype = params_dtype
        layer.lowbit_loaded = {}
        # every family's tensor names, not only the configured one's: a checkpoint of another family then
        # reaches lowbit's metadata check (a clear refusal) instead of vLLM's "no parameter named ..."
        buffers = {n: d for name in FAMILIES for n, d in _checkpoint_tensors(name).items()}
        buffers.update(_checkpoint_tensors(self.config.layer_class.FAMILY))
        buffers[EXTRA_STATE] = torch.uint8
        layer.lowbit_buffer_names = tuple(buffers)
        for name, dtype in buffers.items():
            p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": functools.partial(self._load, layer, name)})
            layer.register_parameter(name, p)

    def _load(self, layer: nn.Module, name: str, param: nn.Parameter, loaded: torch.Tensor,
              loaded_shard_id: Any = None) -> None:
        """A weight loader: keep the checkpoint tensor as it is, under its shard (vLLM tags a tensor of a
        fused layer with `.shard_id`; older loaders pass it as an argument)."""
        shard = loaded_shard_id if loaded_shard_id is not None else getattr(loaded, "shard_id", None)
        idx = _shard_index(layer, shard)
        pieces = layer.lowbit_loaded.setdefault(idx, {})
        if name in pieces:
            raise ValueError(f"lowbit: layer {layer.lowbit_prefix!r}: tensor {name!r} of shard {shard!r} was loaded "
                             "twice")
        pieces[name] = loaded.detach().to("cpu" if loaded.device.type == "meta" else loaded.device).clone()

    def _shard_name(self, idx: Optional[int]) -> str:
        if idx is None:
            return self.names[0] if len(self.names) == 1 else self.prefix
        return self.names[idx] if idx < len(self.names) else f"{self.prefix} (shard {idx})"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "lowbit_loaded"):
            return  # already processed
        pieces: dict = layer.lowbit_loaded
        sizes = layer.lowbit_sizes
        if None in pieces and len(pieces) > 1:
            raise ValueError(f"lowbit: layer {self.prefix!r}: the checkpoint holds it both fused and as shards")
        if None in pieces:
            if layer.lowbit_split is not None and len(sizes) > 1:
                raise ValueError(f"lowbit: layer {self.prefix!r}: the checkpoint holds it fused, whose shards' rows "
                                 f"are not contiguous per rank; serve it with tensor_parallel_size=1")
            plan = [(None, sum(sizes))]
        else:
            missing = [self._shard_name(i) for i in range(len(sizes)) if i not in pieces]
            extra = sorted(set(pieces) - set(range(len(sizes))))
            if missing or extra or not pieces:
                raise ValueError(f"lowbit: layer {self.prefix!r}: the checkpoint has no lowbit tensors for "
                                 f"{missing or [self.prefix]}" + (f" and unexpected shards {extra}" if extra else ""))
            plan = [(i, sizes[i]) for i in range(len(sizes))]
        device = next((t.device for p in pieces.values() for t in p.values()), torch.device("cpu"))
        built = [self._build(layer, idx, out, pieces[idx], device) for idx, out in plan]
        for name in layer.lowbit_buffer_names:
            del layer._parameters[name]
        del layer.lowbit_loaded
        layer.lowbit_layers = nn.ModuleList(_merge_rows(built, layer.lowbit_in))

    def _build(self, layer: nn.Module, idx: Optional[int], out: int, sd: dict, device) -> QuantLinear:
        where = self._shard_name(idx)
        head = f"lowbit: layer {where!r} (vLLM layer {self.prefix!r})"
        sd = dict(sd)
        if EXTRA_STATE not in sd:
            w = sd.get("weight")
            if w is not None and w.is_floating_point():
                raise ValueError(f"{head}: the checkpoint holds a dense {str(w.dtype).replace('torch.', '')} weight "
                                 f"{tuple(w.shape)} there, but quantization_config says it is quantized; add it to "
                                 "modules_to_not_convert or re-quantize the folder")
            raise ValueError(f"{head}: no lowbit format metadata ({where}.{EXTRA_STATE}) in the checkpoint: "
                             f"not a lowbit {self.config.quant_type} layer (write the folder with `lowbit quantize`)")
        cfg = self.config
        try:
            meta = decode_meta(sd[EXTRA_STATE], f"{where}.{EXTRA_STATE}")
        except ValueError as e:
            raise ValueError(f"{head}: {e}") from None
        if meta.get("family") != cfg.layer_class.FAMILY:
            raise ValueError(f"{head}: the checkpoint holds a lowbit {meta.get('family')!r} layer but "
                             f"quantization_config says quant_type={cfg.quant_type!r} (family "
                             f"{cfg.layer_class.FAMILY!r}); the folder's config.json does not match its weights")
        if not cfg.layer_class.STORES_WEIGHT:
            marker = sd.pop("weight", None)  # save_pretrained's empty uint8 marker of int/SZ layers
            if marker is not None and marker.numel():
                raise ValueError(f"{head}: an int/SZ layer with a non-empty 'weight' tensor {tuple(marker.shape)}")
        # the checkpoint layer whole (with tensor parallelism this rank keeps its part of it: _rank_part)
        full_in, full_out = layer.lowbit_in, out
        if layer.lowbit_split is not None:
            full_in, full_out = layer.lowbit_in_full, meta.get("out_features")
            if isinstance(full_out, bool) or not isinstance(full_out, int) or full_out < out:
                raise ValueError(f"{head}: its metadata has out_features={full_out!r}, not a layer of at least "
                                 f"{out} rows")
        try:
            m = empty_layer(cfg.quant_type, full_in, full_out, bias=False, device=device, **cfg.options)
            missing, unexpected = m.load_state_dict(sd, strict=False)
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"{head} cannot be served: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{head}: the checkpoint lacks {sorted(missing)}" +
                             (f" and has unexpected {sorted(unexpected)}" if unexpected else ""))
        dtype = layer.lowbit_dtype
        try:
            m.check_compute_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"{head}: vLLM computes in {dtype}, which this layer cannot serve: {e}; "
                             "serve it with dtype='float32'") from None
        m.requires_grad_(False)
        return self._rank_part(layer, m, idx, out, head)

    @staticmethod
    def _rank_part(layer: nn.Module, m: QuantLinear, idx: Optional[int], out: int, head: str) -> QuantLinear:
        """This rank's part of the checkpoint layer `m` (all of it without tensor parallelism)."""
        split, rank, tp = layer.lowbit_split, layer.lowbit_rank, layer.lowbit_tp
        if split is None:
            return m
        try:
            if split == 1:
                k = layer.lowbit_in
                return m.narrow(1, rank * k, k)
            # output rows: `out` of the checkpoint layer's out_features per rank. A layer smaller than tp parts
            # (k/v projections with fewer kv heads than ranks) is replicated: rank r holds part r * parts // tp,
            # as vLLM's own loader does (tp_rank // num_kv_head_replicas).
            parts, rem = divmod(m.out_features, out)
            if rem or not parts:
                raise ValueError(f"its {m.out_features} output rows do not split into parts of {out}")
            return m.narrow(0, (rank * parts // tp) * out, out)
        except ValueError as e:
            raise ValueError(f"{head}: cannot be split for tensor parallelism (rank {rank} of {tp}): {e}") from None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        shards = layer.lowbit_layers
        if len(shards) == 1:
            y = shards[0](x)
        else:
            y = torch.cat([m(x) for m in shards], dim=-1)
        return y if bias is None else y + bias


def _merge_rows(built: list, in_features: int) -> list:
    """The shards of a fused layer as one lowbit layer when the family can join their storage by output row
    exactly (QuantLinear.cat_rows: one matmul instead of one per shard); otherwise the shards stay separate."""
    if len(built) == 1:
        return built
    joined = type(built[0]).cat_rows(built)
    return built if joined is None else [joined]


_registered = False


def register() -> None:
    """Register quant_method "lowbit" with vLLM (idempotent). The `vllm.general_plugins` entry point:
    vLLM calls it in every process it starts."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
        _registered = True


register()

__all__ = ["LowbitConfig", "LowbitLinearMethod", "checkpoint_layers", "register"]
