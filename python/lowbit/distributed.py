"""FSDP2 (torch.distributed.fsdp.fully_shard) for models holding lowbit layers.

fully_shard shards a module's parameters and leaves its buffers whole on every rank; lowbit keeps
quantized storage in buffers, so a plain fully_shard saves no memory on it. prepare_for_fsdp
re-registers each layer's large storage as frozen nn.Parameters under the same names, so

  * fully_shard shards it along dim 0 (output rows: Linear4bit and IntLinear store their codes by
    row, so a rank's shard is whole rows; uneven row counts are padded by FSDP) and all-gathers it
    around the layer's forward, like any parameter;
  * state-dict keys, shapes and dtypes do not change (a sharded checkpoint's full state dict loads
    into an unsharded model, and the other way);
  * a MixedPrecisionPolicy never casts it: FSDP2 casts floating-point parameters only
    (`FSDPParam.init_dtype_attrs`), and the storage sharded by default is integer (codes, uint8
    double-quantized scales, zero points). The small tables (weight_code, weight_nested_code,
    weight_nested_absmax, weight_offset: a scalar, which fully_shard refuses) stay buffers, which
    FSDP neither shards nor casts.

Storage that is floating point (Linear4bit's fp32 weight_absmax when double_quant=False) is
sharded only with shard_float_storage=True, and must then not meet a MixedPrecisionPolicy with
a param_dtype (that would cast the scales). `shard()` decides it from the policy it is given.
Trainable tensors (LoRA A/B, biases, IntLinear.scale) are ordinary parameters: FSDP shards them
and, under a policy, computes with a cast copy while the sharded fp32 copy is what the optimizer
updates. SZLinear is not sharded (its stream sizes depend on the data): it stays replicated.

Shard after the layers hold their data (from_linear / load_state_dict / load_quantized): a
prepared layer's storage is a Parameter, and load_quantized cannot assign a plain tensor to it.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .nn import LoRALinear, QuantLinear

__all__ = ["prepare_for_fsdp", "shard"]

def _storage_names(layer: QuantLinear) -> tuple[str, ...]:
    # Each family names the storage that prepare_for_fsdp turns into frozen parameters (by row).
    return layer.SHARDED_STORAGE


def prepare_for_fsdp(model: nn.Module, *, shard_float_storage: bool = False) -> list[str]:
    """Turn the quantized storage of every lowbit layer in `model` (the model itself may be one)
    into frozen nn.Parameters of the same name, shape and dtype, so that fully_shard shards it.

    Integer storage is always converted; floating-point storage (fp32 block scales without double
    quantization) only with shard_float_storage=True, and it is then added to the layer's
    KEEP_DTYPE so that .half() / .to(dtype) still leave it alone. Idempotent. Returns the
    qualified names of the tensors converted by this call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for prefix, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        kept = list(layer.KEEP_DTYPE)
        for name in _storage_names(layer):
            t = layer._buffers.get(name)
            if t is None or t.dim() == 0:
                continue
            if t.is_floating_point():
                if not shard_float_storage:
                    continue
                kept.append(name)
            del layer._buffers[name]
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
            done.append(f"{prefix}.{name}" if prefix else name)
        if len(kept) != len(layer.KEEP_DTYPE):
            layer.KEEP_DTYPE = tuple(kept)  # instance attribute: the dtype policy of QuantLinear._apply
    return done


def _default_units(model: nn.Module) -> list[nn.Module]:
    """The outermost lowbit layers: each LoRALinear, each QuantLinear not inside one."""
    units, inside = [], set()
    for _, mod in model.named_modules():
        if id(mod) in inside or mod is model:
            continue
        if isinstance(mod, (LoRALinear, QuantLinear)):
            units.append(mod)
            inside.update(id(m) for m in mod.modules())
    return units


def shard(model: nn.Module, mesh=None, *, units: Optional[Iterable[type] | Iterable[nn.Module]] = None,
          mp_policy=None, **fully_shard_kw) -> nn.Module:
    """prepare_for_fsdp(model), then fully_shard every unit (innermost first) and the model.

    mesh: a 1-D DeviceMesh (on CPU: torch.distributed.device_mesh.init_device_mesh("cpu", (world,)));
          None takes fully_shard's default (the current CUDA device's world).
    units: module classes (e.g. the model's decoder-layer class) or modules that each become one
          FSDP group (one all-gather each); default: every outermost lowbit layer (LoRALinear, or a
          QuantLinear outside one).
    mp_policy: a torch.distributed.fsdp.MixedPrecisionPolicy, given to every fully_shard call.
          Floating-point storage is sharded only when the policy casts no parameter.
    Other keywords (reshard_after_forward, offload_policy, ...) go to fully_shard. Returns the model.
    """
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    prepare_for_fsdp(model, shard_float_storage=mp_policy.param_dtype is None)
    if units is None:
        chosen = _default_units(model)
    else:
        units = list(units)
        bad = [u for u in units if not isinstance(u, (type, nn.Module))]
        if bad:
            raise TypeError(f"units must be module classes or modules, got {bad!r}")
        classes = tuple(u for u in units if isinstance(u, type))
        chosen = [u for u in units if isinstance(u, nn.Module)]
        if classes:
            chosen += [m for m in model.modules() if isinstance(m, classes) and m is not model]
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules()}
    for mod in sorted(chosen, key=lambda m: -depth.get(id(m), 0)):  # innermost first
        fully_shard(mod, mesh=mesh, mp_policy=mp_policy, **fully_shard_kw)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, **fully_shard_kw)
    return model
