"""PEFT LoRA on lowbit layers: get_peft_model, PEFT's own adapter files, merge_and_unload.

    from peft import LoraConfig, PeftModel, get_peft_model
    from lowbit.integrations.peft import register
    config = register(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model, config)              # every targeted lowbit layer gets a LowbitLoraLinear
    model.save_pretrained(out)                          # PEFT's adapter_model.safetensors + adapter_config.json
    model = PeftModel.from_pretrained(base, out, config=register(LoraConfig.from_pretrained(out)))

PEFT picks the LoRA layer class for a module through its dispatchers; out-of-tree layers are added per
LoraConfig with `LoraConfig._register_custom_module` (PEFT >= 0.12, marked experimental by PEFT). The
mapping is not saved in adapter_config.json, so `register` must be called on the config given to
get_peft_model AND on the config given to PeftModel.from_pretrained (`load_adapter` does both steps).

The adapter weights are PEFT's own (`lora_A` / `lora_B` nn.Linear, keys
`base_model.model.<module>.lora_A.weight`), so PEFT, vLLM's LoRA serving and other PEFT tools read them;
only the base layers are lowbit's.

Merging (`merge_and_unload`, `merge_adapter`): the base weight is dequantized to fp32, the adapter's update
added, and the sum quantized again in the layer's own format. Re-quantizing rounds the update: every merge
warns (`LowbitMergeWarning`) with the measured error (max and RMS of the re-quantized weight minus the
exact merged weight, next to the RMS of the update itself) and leaves the numbers on the base layer as
`lowbit_merge_error`. SZ layers refuse to merge: an SZLinear guarantees that every decoded weight lies within
its error bound of the weight it was compressed from; re-compressing W_decoded + update would keep that
bound only against the already-rounded sum (up to twice the bound from the exact merged weight) while the
layer still reported the original bound.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import nn

import peft
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..nn import QuantLinear

_MIN_PEFT = (0, 12)
if tuple(int(p) for p in peft.__version__.split(".")[:2] if p.isdigit()) < _MIN_PEFT:
    raise ImportError(f"lowbit.integrations.peft needs peft >= 0.12 (LoraConfig._register_custom_module); this is "
                      f"peft {peft.__version__}")


class LowbitMergeWarning(UserWarning):
    """A LoRA update was merged into a quantized weight: the message states the re-quantization error."""




class _DeviceRef:
    """`.device` / `.dtype` of a module's storage buffers, read when asked (never a stale copy)."""

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    @property
    def device(self) -> torch.device:
        return next(self._module().buffers()).device

    @property
    def dtype(self) -> torch.dtype:
        m = self._module()
        return getattr(m, "compute_dtype", None) or m.weight_dtype


class LowbitLoraLinear(nn.Module, LoraLayer):
    """PEFT's LoRA on a lowbit QuantLinear: y = base(x) + lora_B(lora_A(dropout(x))) * scaling.

    lora_A / lora_B are PEFT's nn.Linear adapters (fp32 unless the base has a compute dtype); the base
    layer stays frozen. Follows PEFT's LoRA layer conventions (bnb's Linear4bit LoRA layer is the model).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if next(base_layer.parameters(), None) is None and not hasattr(base_layer, "qweight"):
            # PEFT's _replace_module reads the device of the base's `qweight`, `weight` or first parameter; an
            # SZLinear without bias has none of them (only buffers): give it a live device reference.
            object.__setattr__(base_layer, "qweight", _DeviceRef(base_layer))
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- PEFT hooks --------------------------------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        t = next((b for b in base_layer.buffers(recurse=False) if b is not None), None)
        device = None if t is None else t.device
        return device, getattr(base_layer, "compute_dtype", None)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise ValueError(f"lowbit layers take plain LoRA only (no DoRA or other LoRA variants): {e}") from None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for active in self.active_adapters:
            if active not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active], self.lora_B[active]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + (lora_B(lora_A(self.lora_dropout[active](xa))) * self.scaling[active]).to(out_dtype)
        return result

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for active in adapter_names:
            if active not in self.lora_A.keys():
                continue
            delta = self.get_delta_weight(active)
            w = base.dequantized_weight(torch.float32)
            target = w + delta.to(w.device)
            if safe_merge and not torch.isfinite(target).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {active} seems to be broken")
            self._requantize(base, target, delta, f"merged LoRA adapter {active!r} into")
            if self.lora_bias[active]:
                base.bias.data = base.bias.data + self.lora_B[active].bias.detach().to(base.bias.dtype)
            self.merged_adapters.append(active)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            active = self.merged_adapters.pop()
            if active not in self.lora_A.keys():
                continue
            delta = self.get_delta_weight(active)
            w = base.dequantized_weight(torch.float32)
            self._requantize(base, w - delta.to(w.device), delta, f"unmerged LoRA adapter {active!r} from")
            if self.lora_bias[active]:
                base.bias.data = base.bias.data - self.lora_B[active].bias.detach().to(base.bias.dtype)

    @staticmethod
    def _requantize(base: QuantLinear, target: torch.Tensor, delta: torch.Tensor, what: str) -> None:
        """Quantize `target` (fp32) into `base` in its own format, then warn with the measured error."""
        fmt = base.requantize_(target)  # the family's own (SZ refuses, keeping its error bound honest)
        err = base.dequantized_weight(torch.float32) - target
        report = {"max_abs_error": err.abs().max().item(), "rms_error": err.pow(2).mean().sqrt().item(),
                  "rms_update": delta.float().pow(2).mean().sqrt().item()}
        base.lowbit_merge_error = report
        warnings.warn(
            f"lowbit: {what} a {fmt} layer [{base.out_features}x{base.in_features}] and re-quantized it: measured "
            f"re-quantization error max {report['max_abs_error']:.3g}, RMS {report['rms_error']:.3g} (the adapter's "
            f"update has RMS {report['rms_update']:.3g}); the merged model's outputs differ from the unmerged one "
            "by this rounding. For an exact merge, dequantize the base first.",
            LowbitMergeWarning, stacklevel=3)


def _all_linear_targets(model: nn.Module) -> list[str]:
    """PEFT's "all-linear" for a model with lowbit layers: every QuantLinear and nn.Linear except the
    output embedding (PEFT's own rule, which only knows nn.Linear)."""
    skip = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    names = []
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            skip.add(name)
        elif isinstance(mod, (QuantLinear, nn.Linear)) and name:
            names.append(name)
    names = [n for n in names if n not in skip]
    if not names:
        raise ValueError("lowbit: target_modules='all-linear' found no lowbit or nn.Linear layer in the model")
    return names


def register(config: LoraConfig, model: Optional[nn.Module] = None) -> LoraConfig:
    """Register LowbitLoraLinear for every lowbit layer on `config` (in place; returns it).

    Call it on the config passed to get_peft_model and on the one passed to PeftModel.from_pretrained
    (PEFT does not save the registration). With `model` given, target_modules="all-linear" is expanded
    to the model's lowbit and nn.Linear layers (PEFT's own expansion only sees nn.Linear)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: LowbitLoraLinear})
    tm = config.target_modules
    if model is not None and isinstance(tm, str) and tm.lower() == "all-linear":
        config.target_modules = set(_all_linear_targets(model))
    return config


def load_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs: Any) -> PeftModel:
    """PeftModel.from_pretrained(model, path, ...) with the adapter's config registered for lowbit layers."""
    config = PeftConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"lowbit: {path!r} holds a {type(config).__name__} adapter; lowbit layers take LoRA")
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=register(config), **kwargs)


def save_lora_linear_as_peft(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> LoraConfig:
    """Write the adapters of a model wrapped with lowbit's own `LoRALinear` as a PEFT LoRA adapter folder
    (adapter_model.safetensors + adapter_config.json), for PeftModel.from_pretrained / `load_adapter` on
    the same model without the LoRALinear wrappers (or for any PEFT reader). Returns the LoraConfig written.

    LoRALinear(base, r, alpha, dropout) at module path N becomes PEFT's target N with
    lora_A.weight = LoRALinear.lora_A [r, in], lora_B.weight = LoRALinear.lora_B [out, r] and the same
    scaling alpha / r; ranks or alphas that differ between layers go to rank_pattern / alpha_pattern."""
    from lowbit.io import save_safetensors

    from ..nn import LoRALinear

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not found:
        raise ValueError("lowbit: the model has no lowbit.LoRALinear layer to convert")
    dropouts = {float(getattr(m.dropout, "p", 0.0)) for _, m in found}
    if len(dropouts) > 1:
        raise ValueError(f"lowbit: the LoRALinear layers use different dropouts {sorted(dropouts)}; PEFT's "
                         "LoraConfig has one lora_dropout")
    ranks = [m.r for _, m in found]
    alphas = [m.alpha for _, m in found]
    r, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropouts.pop(), target_modules=sorted(n for n, _ in found),
                        rank_pattern={n: m.r for n, m in found if m.r != r},
                        alpha_pattern={n: m.alpha for n, m in found if m.alpha != alpha},
                        base_model_name_or_path=base_model_name_or_path)
    tensors = {}
    for name, m in found:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    return config


__all__ = ["LowbitLoraLinear", "LowbitMergeWarning", "load_adapter", "register", "save_lora_linear_as_peft"]
