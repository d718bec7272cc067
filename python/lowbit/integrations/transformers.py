"""lowbit as a transformers quantization method: `from_pretrained(..., quantization_config=LowbitConfig(...))`.

    import lowbit.integrations.transformers            # registers quant_method "lowbit"
    from lowbit.integrations.transformers import LowbitConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig("nf4"))
    model.save_pretrained(out)                         # pre-quantized; config.json holds the LowbitConfig
    model = AutoModelForCausalLM.from_pretrained(out)  # after the import above

Importing this module registers `LowbitConfig` and `LowbitHfQuantizer` under the name "lowbit" with
transformers (`register_quantization_config` / `register_quantizer`, the 5.x HfQuantizer API). Nothing
in lowbit imports it implicitly: transformers reads "quant_method": "lowbit" from config.json only
once this module has been imported.

How loading works:
- Before any weight is read, every nn.Linear that is not skipped becomes a lowbit layer on the meta
  device (the layers' constructors allocate only).
- From a full-precision checkpoint, each Linear weight is quantized as it is read (transformers reads
  one tensor at a time, synchronously, when quantizing on load), with `lowbit.nn.layer_factory`, the
  function `replace_linear` uses: the result is the layer replace_linear would build from the same
  weight. The full-precision model is never held in memory.
- From a lowbit checkpoint (written by save_pretrained), the quantizer first reads each layer's format
  metadata (`<prefix>._extra_state`, a few bytes per layer) and the tensor shapes from the safetensors
  headers, checks them against the model (family, shape, quant_type, blocksize, bits, group size, error
  bound, format version) and sizes the data-dependent SZ buffers; only then are the tensors read. A
  mismatch raises ValueError naming the key before anything is loaded.

Without this module imported, transformers stops on a lowbit folder with a ValueError quoting LOAD_HINT
(written into config.json as `transformers_weights`, see below), before it builds the model.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

import transformers
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import __version__
# bitsandbytes folder import/export: lowbit.integrations.bitsandbytes, re-exported for callers importing them here
from .bitsandbytes import from_pretrained_bnb, save_pretrained_bnb
from ..nn import (EXTRA_STATE, FORMAT_VERSION, FAMILIES, REQUIRED, QuantLinear, check_options, decode_meta,
                  empty_layer, encode_meta, family_of, layer_factory)

QUANT_METHOD = "lowbit"
_MIN_TRANSFORMERS = (5, 0)

if tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) < _MIN_TRANSFORMERS:
    raise ImportError(f"lowbit.integrations.transformers needs transformers >= 5.0 (the HfQuantizer API with "
                      f"ConversionOps); this is transformers {transformers.__version__}")

# The options LowbitConfig accepts are its family's (lowbit.nn.family: each Option's default; a required one,
# sz's error_bound, is None here until given and refused by post_init).
def _config_options(quant_type: str) -> dict[str, Any]:
    fam = family_of(quant_type)
    return {o.name: (None if o.name not in fam.defaults(quant_type) else o.default) for o in fam.options
            if o.name in fam.option_names(quant_type)}


def _all_options() -> set[str]:
    return {o.name for f in FAMILIES.values() for o in f.options}


def _dtype_name(v: Any) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, str) and isinstance(getattr(torch, v.removeprefix("torch."), None), torch.dtype):
        return v.removeprefix("torch.")
    raise ValueError(f"compute_dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {v!r}")


@register_quantization_config(QUANT_METHOD) if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING else (lambda c: c)
class LowbitConfig(QuantizationConfigMixin):
    """The quantization config of a lowbit model (quant_method "lowbit").

    quant_type: any of lowbit.nn.quant_types(); its options are its family's (lowbit.nn.family), e.g.
                "nf4" | "fp4" | "optimal" (blocksize=64, double_quant=True, compute_dtype=None),
                "int2" | "int3" | "int4" (group_size=None, method="rtn"),
                "sz" (error_bound, required; mode="abs"; chunk_size=4096; importance options).
    modules_to_not_convert: module names (or regexes / name suffixes, transformers' rules) kept dense.
                None: transformers' default (the output embedding, tied weights and the model's last
                module, e.g. lm_head); [] quantizes every nn.Linear.
    An option of another family, or an unknown option, raises ValueError naming it.
    """

    def __init__(self, quant_type: str = "nf4", modules_to_not_convert: Optional[list] = None, **options) -> None:
        options.pop("quant_method", None)
        options.pop("lowbit_version", None)
        version = options.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"quantization_config.format_version: this checkpoint has lowbit format version "
                             f"{version!r}; lowbit {__version__} reads versions <= {FORMAT_VERSION}: upgrade lowbit")
        if not isinstance(quant_type, str):
            raise TypeError(f"quant_type must be a str, got {type(quant_type).__name__}")
        allowed = _config_options(quant_type)
        for k in options:
            if k not in allowed:
                where = ("an option of another format family" if k in _all_options() else "not a lowbit option")
                raise ValueError(f"LowbitConfig: option {k!r} is {where}; quant_type={quant_type!r} takes "
                                 f"{sorted(allowed)}")
        if modules_to_not_convert is not None:
            if isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert):
                raise TypeError("modules_to_not_convert must be None or a list of module names")
            modules_to_not_convert = list(modules_to_not_convert)
        self.quant_method = QUANT_METHOD
        self.quant_type = quant_type
        for k, default in allowed.items():
            setattr(self, k, options.get(k, default))
        for o in family_of(quant_type).options:
            if o.dtype and o.name in allowed:  # stored by name in config.json
                setattr(self, o.name, _dtype_name(getattr(self, o.name)))
        self.modules_to_not_convert = modules_to_not_convert
        self.format_version = FORMAT_VERSION
        # the version of the folder being loaded (an older one may need its bytes converted after loading)
        self._loaded_format_version = version
        self.lowbit_version = __version__
        self.post_init()

    @property
    def layer_class(self) -> type:
        return family_of(self.quant_type).layer

    @property
    def options(self) -> dict:
        """The family's options, as replace_linear / layer_factory take them (a required option not given is
        left out, for layer_factory to name it)."""
        opts = {}
        for o in family_of(self.quant_type).options:
            if o.name not in _config_options(self.quant_type):
                continue
            v = getattr(self, o.name)
            if o.default is REQUIRED and v is None:
                continue
            opts[o.name] = getattr(torch, v) if o.dtype and v is not None else v
        return opts

    def post_init(self) -> None:
        """Check the option values by building a 1-row layer on the meta device (the layer's own checks)."""
        try:
            check_options(self.quant_type, self.options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"LowbitConfig(quant_type={self.quant_type!r}): {e}") from None

    def make_layer(self, in_features: int, out_features: int, bias: bool, device=None) -> QuantLinear:
        """An empty lowbit layer of this format (allocates only; device='meta' for a skeleton)."""
        return empty_layer(self.quant_type, in_features, out_features, bias, device=device, **self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "quant_type": self.quant_type,
                **{k: getattr(self, k) for k in _config_options(self.quant_type)},
                "modules_to_not_convert": self.modules_to_not_convert, "format_version": self.format_version,
                "lowbit_version": self.lowbit_version}


class LowbitQuantize(ConversionOps):
    """Quantize one full-precision Linear weight as it is read, into the lowbit layer at its prefix."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: Optional[nn.Module] = None, full_layer_name: Optional[str] = None,
                missing_keys: Optional[set] = None, **kwargs) -> dict:
        key, value = next(iter(input_dict.items()))
        weight = value[0] if isinstance(value, list) else value
        prefix = key.rpartition(".")[0]
        filled = self.hf_quantizer.quantize_layer(model, prefix, weight)
        if missing_keys is not None:  # the layer's buffers are set here, not by transformers
            for k in filled:
                missing_keys.discard(k)
        return {}


# A full-precision weight arrives under "<prefix>.weight"; IntLinear and SZLinear store no tensor of that
# name, so while quantizing on load they carry a meta placeholder for transformers to route it to.
# save_pretrained also writes an empty uint8 "<prefix>.weight" marker for them: a transformers that has
# not imported this module then stops with a size mismatch (as it does on Linear4bit's packed weight)
# instead of loading those layers as randomly initialised nn.Linear. The marker is read and dropped here.
_PLACEHOLDER = "weight"


def _marker(device=None) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8, device=device)


# A transformers that has not imported this module only warns "Unknown quantization type, got lowbit" and
# goes on. So that it stops with a message naming lowbit, before it builds the model or reads a tensor,
# every config.json of a lowbit model gets `"transformers_weights": LOAD_HINT`: transformers reads that field
# (the weights file to load) right after the quantization config and refuses a name that is not a
# `*.safetensors` file with "ValueError: The transformers file in the config seems to be incorrect: ...:
# <the name>". With this module imported, LowbitHfQuantizer removes the field from the config before
# transformers looks at it (update_attn_implementation, called when the quantizer is built), so the default
# `model.safetensors` / index is read. transformers drops `transformers_weights` from a config it saves;
# `_write_config_json` (wrapping PreTrainedConfig.to_json_file) writes it back for lowbit configs only.
LOAD_HINT = ("lowbit checkpoint: this folder holds lowbit layers (quantization_config.quant_method \"lowbit\"), "
             "which transformers reads only through lowbit's integration. Run "
             "`import lowbit.integrations.transformers` before from_pretrained (install it with "
             "`pip install 'lowbit[transformers]'`). "
             "[lowbit writes this transformers_weights field on purpose; leave it as it is]")
_HINT_PREFIX = "lowbit checkpoint:"
_HINT_FIELD = "transformers_weights"


def _is_load_hint(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_HINT_PREFIX)


def _is_lowbit_config(config) -> bool:
    qc = getattr(config, "__dict__", {}).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return method == QUANT_METHOD


def _install_config_writer() -> None:
    """Wrap PreTrainedConfig.to_json_file (once) so that the config.json of a lowbit model carries LOAD_HINT."""
    import json

    from transformers.configuration_utils import PreTrainedConfig

    original = PreTrainedConfig.to_json_file
    if getattr(original, "_lowbit_wrapped", False):
        return

    def to_json_file(self, json_file_path, use_diff: bool = True):
        if not _is_lowbit_config(self):
            return original(self, json_file_path, use_diff=use_diff)
        config_dict = json.loads(self.to_json_string(use_diff=use_diff))
        config_dict[_HINT_FIELD] = LOAD_HINT
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    to_json_file._lowbit_wrapped = True
    to_json_file.__wrapped__ = original
    to_json_file.__doc__ = original.__doc__
    PreTrainedConfig.to_json_file = to_json_file


_install_config_writer()


@register_quantizer(QUANT_METHOD) if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING else (lambda c: c)
class LowbitHfQuantizer(HfQuantizer):
    """The HfQuantizer of quant_method "lowbit" (see the module docstring)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs) -> None:
        if not isinstance(quantization_config, LowbitConfig):
            quantization_config = LowbitConfig.from_dict(dict(quantization_config))
        super().__init__(quantization_config, **kwargs)
        self._quantized: set[str] = set()  # prefixes quantized on load

    # -- properties transformers asks about ------------------------------------------------------
    def is_serializable(self, *args, **kwargs) -> bool:
        return True  # save_pretrained writes every layer's buffers and format metadata (safetensors)

    @property
    def is_trainable(self) -> bool:
        # Gradients flow to the input through every family, so adapters (lowbit.integrations.peft) train.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # The int family's per-row/group scales are trainable parameters (PEQA); the others hold frozen codes.
        return bool(self.quantization_config.layer_class.KEEP_DTYPE)

    @property
    def is_compileable(self) -> bool:
        # Every family's forward is a registered torch.library op; measured: torch.compile (inductor, CPU,
        # torch 2.13) of a quantized Llama gives the eager logits for nf4, int3 and sz, even with fullgraph=True.
        return True

    # -- before loading ----------------------------------------------------------------------------
    def update_attn_implementation(self, config):
        # The first hook that sees the model config, before transformers resolves the weights files: drop
        # the field that stops a transformers without this module (LOAD_HINT) so that the default files load.
        if _is_load_hint(getattr(config, _HINT_FIELD, None)):
            delattr(config, _HINT_FIELD)
        return super().update_attn_implementation(config)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None))
        # a weight tied to another (lm_head to the input embedding) must stay a dense parameter
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        self.modules_to_not_convert += sorted({k.removesuffix(".weight") for kv in tied.items() for k in kv}
                                              - set(self.modules_to_not_convert))
        targets = [(name, mod) for name, mod in model.named_modules()
                   if type(mod) is nn.Linear and should_convert_module(name, self.modules_to_not_convert)]
        for name, lin in targets:
            try:
                layer = cfg.make_layer(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
            except (TypeError, ValueError) as e:
                raise type(e)(f"lowbit: layer {name!r} (nn.Linear in_features={lin.in_features}, out_features="
                              f"{lin.out_features}) cannot be {cfg.quant_type!r}: {e}; add it to "
                              "modules_to_not_convert to keep it dense") from None
            if lin.bias is not None:  # the bias keeps the model's dtype, as replace_linear keeps it
                layer.bias = nn.Parameter(torch.empty_like(lin.bias, device="meta"),
                                          requires_grad=layer.bias.requires_grad)
            if not self.pre_quantized and _PLACEHOLDER not in layer._buffers:
                layer.register_buffer(_PLACEHOLDER, torch.empty(lin.out_features, lin.in_features, device="meta"))
            elif self.pre_quantized and _PLACEHOLDER not in layer._buffers:
                layer.register_buffer(_PLACEHOLDER, _marker("meta"))
            model.set_submodule(name, layer)
        if not targets:
            raise ValueError(f"lowbit: the model has no nn.Linear to quantize (modules_to_not_convert="
                             f"{self.modules_to_not_convert})")
        if self.pre_quantized and checkpoint_files:
            self._check_checkpoint(model, checkpoint_files)
        return model

    def _check_checkpoint(self, model, files: list) -> None:
        """Check every lowbit layer against the checkpoint's format metadata and tensor shapes (headers and
        the few-byte metadata tensors only), adopt the fields that describe the stored data, and size the
        SZ streams, before transformers reads any tensor."""
        from safetensors import safe_open

        layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
        bmp = getattr(model, "base_model_prefix", "") or ""

        def to_model(prefix: str) -> Optional[str]:
            # a checkpoint of the base model loads into a model with a head, and the other way round
            cands = (prefix, prefix.removeprefix(bmp + "."), f"{bmp}.{prefix}") if bmp else (prefix,)
            return next((c for c in cands if c in layers), None)

        by_prefix: dict[str, dict[str, tuple]] = {}  # prefix -> {name: (shape, safetensors dtype, file)}
        metas: dict[str, torch.Tensor] = {}  # "<prefix>._extra_state" -> its (few-byte) tensor
        for path in files:  # a sharded checkpoint may split one layer's tensors over files
            if not str(path).endswith(".safetensors"):
                raise ValueError(f"lowbit: {path!r} is not a safetensors file; lowbit checkpoints are written and "
                                 "read as safetensors (save_pretrained's default)")
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    prefix, _, leaf = k.rpartition(".")
                    sl = f.get_slice(k)
                    by_prefix.setdefault(prefix, {})[leaf] = (tuple(sl.get_shape()), sl.get_dtype(), path)
                    if leaf == EXTRA_STATE:
                        metas[k] = f.get_tensor(k)
        found: dict[str, tuple] = {}
        foreign: list[str] = []
        for k, t in metas.items():
            prefix = k.rpartition(".")[0]
            name = to_model(prefix)
            try:
                meta = decode_meta(t, k)
            except ValueError:
                if name is None:
                    continue  # another module's extra state
                raise
            if name is None:
                foreign.append(k)
                continue
            shapes = {leaf: v[:2] for leaf, v in by_prefix[prefix].items()}
            found[name] = (k, meta, shapes, by_prefix[prefix][EXTRA_STATE][2])
        if foreign:
            kinds = {k: type(model.get_submodule(k[: -len(EXTRA_STATE) - 1])).__name__
                     if _has_submodule(model, k[: -len(EXTRA_STATE) - 1]) else "no such module" for k in foreign[:3]}
            raise ValueError(f"lowbit: the checkpoint holds lowbit layers that this model does not quantize: "
                             f"{kinds} (a different architecture, or modules_to_not_convert differs from the one "
                             "the checkpoint was saved with)")
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"lowbit: the checkpoint has no lowbit format metadata for layer(s) "
                             f"{[m + '.' + EXTRA_STATE for m in missing[:3]]}{' ...' if len(missing) > 3 else ''}: "
                             "it was not saved by lowbit for this architecture, or with other modules_to_not_convert")
        for name, (key, meta, shapes, path) in found.items():
            layer = layers[name]
            layer._check_meta(meta, key)
            layer._adopt(meta, dict.fromkeys(shapes), "")
            persistent = layer.state_dict(keep_vars=True)
            absent = [b for b in persistent if b not in shapes and b != _PLACEHOLDER]
            if absent:
                raise ValueError(f"{key[: -len(EXTRA_STATE)]}{absent[0]}: missing from the checkpoint "
                                 f"{os.path.basename(path)!r} (the layer's format metadata is there; the file is "
                                 "incomplete)")
            for buf, t in list(layer._buffers.items()):
                if buf not in shapes or t is None or buf not in persistent:
                    continue
                shape, dt = shapes[buf]
                dtype = _SAFETENSORS_DTYPES.get(dt)
                if tuple(t.shape) == shape and t.dtype == dtype:
                    continue
                if layer.DATA_DEPENDENT_SHAPES:  # e.g. SZ: the compressed sizes depend on the data
                    layer._buffers[buf] = torch.empty(shape, dtype=dtype or t.dtype, device="meta")
                else:
                    raise ValueError(f"{key[: -len(EXTRA_STATE)]}{buf}: the checkpoint {os.path.basename(path)!r} "
                                     f"holds shape {list(shape)} {dt}, the model's {type(layer).__name__} expects "
                                     f"{list(t.shape)} {t.dtype}")

    # -- while loading -----------------------------------------------------------------------------
    def get_quantize_ops(self):
        return LowbitQuantize(self)

    def quantize_layer(self, model, prefix: str, weight: torch.Tensor) -> list[str]:
        """Replace the (meta) lowbit layer at `prefix` with the layer replace_linear builds from `weight`;
        returns the state-dict keys this filled (all of the layer's but a bias still to be read)."""
        cfg = self.quantization_config
        old = model.get_submodule(prefix)
        keys = [f"{prefix}.{k}" for k in old.state_dict(keep_vars=True) if k != "bias"]
        lin = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        bias_loaded = old.bias is not None and old.bias.device.type != "meta"
        if bias_loaded:
            lin.bias = old.bias
        try:
            new = layer_factory(cfg.quant_type, cfg.options)(lin)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lowbit: layer {prefix!r} cannot be quantized as {cfg.quant_type!r}: {e}") from None
        if old.bias is not None and not bias_loaded:  # the bias arrives after the weight: keep a slot for it
            new.bias = nn.Parameter(torch.empty_like(old.bias))
        for t in list(new.parameters()) + list(new.buffers()):
            t._is_hf_initialized = True
        model.set_submodule(prefix, new)
        self._quantized.add(prefix)
        return keys

    # -- after loading -----------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, layer in model.named_modules():
            if not isinstance(layer, QuantLinear):
                continue
            if not self.pre_quantized and name not in self._quantized:
                raise ValueError(f"lowbit: layer {name!r} was not loaded: the checkpoint has no {name + '.weight'!r}")
            if not layer.STORES_WEIGHT and _PLACEHOLDER in layer._buffers:
                placeholder = layer._buffers.pop(_PLACEHOLDER)
                if placeholder is not None and placeholder.numel():
                    raise ValueError(f"lowbit: layer {name!r} was not loaded: the checkpoint has no 'weight' for it")
            stale = [n for n, t in layer.state_dict(keep_vars=True).items()
                     if isinstance(t, torch.Tensor) and t.device.type == "meta"]
            if stale:
                raise ValueError(f"lowbit: layer {name!r} was not loaded: the checkpoint has no {stale[0]!r} for it")
            # transformers sets each tensor by attribute and fills non-persistent buffers with empty memory:
            # let the layer re-run its own loading on its own state (rebuilds the SZ decode table), as the
            # folder's format version (older int codes are converted there).
            version = getattr(self.quantization_config, "_loaded_format_version", FORMAT_VERSION)
            sd = layer.state_dict()
            if self.pre_quantized and version < FORMAT_VERSION:
                meta = decode_meta(sd[EXTRA_STATE], name)
                sd[EXTRA_STATE] = encode_meta({**meta, "format_version": version})
            layer.load_state_dict(sd, strict=True)
            if layer.FROZEN_BIAS and layer.bias is not None:
                layer.bias.requires_grad_(False)  # the family's convention (from_linear)
        return model

    def get_state_dict_and_metadata(self, model):
        sd = model.state_dict()
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLinear) and not layer.STORES_WEIGHT:
                sd[f"{name}.{_PLACEHOLDER}" if name else _PLACEHOLDER] = _marker()
        return sd, {"lowbit.format_version": str(FORMAT_VERSION), "lowbit.version": __version__}

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
            dt = dtype or layer.weight_dtype
            w = layer.dequantized_weight(dt)
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=True)
            if layer.bias is not None:
                lin.bias = nn.Parameter(layer.bias.detach().to(dt), requires_grad=True)
            model.set_submodule(name, lin)
        return model


_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "BOOL": torch.bool}


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


__all__ = ["LOAD_HINT", "LowbitConfig", "LowbitHfQuantizer", "LowbitQuantize", "QUANT_METHOD", "from_pretrained_bnb",
           "save_pretrained_bnb"]
