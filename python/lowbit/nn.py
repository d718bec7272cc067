"""Drop-in layers: Linear4bit, LoRALinear, and replace_linear for whole models."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
from torch import nn

from ._validate import FLOAT_DTYPES, check_choice, check_power_of_two
from .autograd import matmul_4bit
from .quant4bit import QUANT_TYPES, Quant4bit, quantize_4bit

_QUANT_BUFFERS = ("weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code", "weight_offset")


class Linear4bit(nn.Module):
    """nn.Linear with a frozen 4-bit weight (NF4/FP4/optimal, bitsandbytes-compatible bytes).

    Buffers, laid out by output row so that a row-sharding (FSDP2-style) split needs no repack:
      weight               uint8 [out, in/2]        (flat [ceil(out*in/2)] when in % blocksize != 0)
      weight_absmax        fp32 or uint8 [out, in/blocksize]   (flat when in % blocksize != 0)
      weight_code          fp32 [16]
      weight_nested_absmax, weight_nested_code, weight_offset   (double quantization only)
    The bias is an ordinary trainable parameter in the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_choice("quant_type", quant_type, QUANT_TYPES)
        check_power_of_two("blocksize", blocksize, 32, 4096)
        if compute_dtype is not None:
            check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = torch.float32
        # A usable layer from the start: nn.Linear's init, quantized.
        ref = nn.Linear(in_features, out_features, bias=bias, device="cpu")
        self._set_quantized(quantize_4bit(ref.weight.detach().to(device or "cpu"), blocksize, quant_type, double_quant))
        self.bias = nn.Parameter(ref.bias.detach().to(device or "cpu")) if bias else None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        check_choice("quant_type", quant_type, QUANT_TYPES)
        check_power_of_two("blocksize", blocksize, 32, 4096)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        w = linear.weight.detach()
        self.weight_dtype = w.dtype
        self._set_quantized(quantize_4bit(w, blocksize, quant_type, double_quant))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return self

    def _row_layout(self) -> bool:
        return self.in_features % self.blocksize == 0

    def _set_quantized(self, q: Quant4bit) -> None:
        out, inn = self.out_features, self.in_features
        rows = self._row_layout()
        self.weight_dtype = q.dtype
        self.register_buffer("weight", q.codes.view(out, inn // 2) if rows else q.codes)
        self.register_buffer("weight_absmax", q.absmax.view(out, inn // self.blocksize) if rows else q.absmax)
        self.register_buffer("weight_code", q.code)
        for name, t in (("weight_nested_absmax", q.nested_absmax), ("weight_nested_code", q.nested_code),
                        ("weight_offset", q.offset)):
            if t is not None:
                self.register_buffer(name, t)
            elif name in self._buffers:
                del self._buffers[name]

    # -- the quantized weight -----------------------------------------------------------------
    @property
    def quantized_weight(self) -> Quant4bit:
        dq = "weight_nested_absmax" in self._buffers
        return Quant4bit(
            codes=self.weight.reshape(-1),
            absmax=self.weight_absmax.reshape(-1),
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=self.weight_code,
            nested_absmax=self._buffers.get("weight_nested_absmax") if dq else None,
            nested_code=self._buffers.get("weight_nested_code") if dq else None,
            offset=self._buffers.get("weight_offset") if dq else None,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .quant4bit import dequantize_4bit

        return dequantize_4bit(self.quantized_weight, dtype)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        y = matmul_4bit(x, self.quantized_weight, self.bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    # -- dtype/device moves: codes and scales keep their dtypes ---------------------------------
    def _apply(self, fn, recurse=True):
        keep = {name: self._buffers[name] for name in _QUANT_BUFFERS if name in self._buffers}
        for name in keep:
            del self._buffers[name]
        super()._apply(fn, recurse)
        for name, t in keep.items():
            # fn may change device, dtype or both: take the device, never the dtype.
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        probe = fn(torch.zeros(1))
        if probe.dtype != torch.float32 and probe.dtype in FLOAT_DTYPES:
            self.compute_dtype = probe.dtype  # .half()/.bfloat16(): compute dtype only; codes stay
        return self

    @property
    def bits_per_param(self) -> float:
        return self.quantized_weight.bits_per_param

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={'weight_nested_absmax' in self._buffers}, "
            f"bits_per_param={self.bits_per_param:.3f}"
        )

    # -- bitsandbytes checkpoints -------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "weight.absmax" in state_dict:
            from .serialization import bnb_to_lowbit_entries

            converted = bnb_to_lowbit_entries(state_dict, prefix, self)
            for k in [k for k in state_dict if k.startswith(prefix + "weight.")]:
                del state_dict[k]
            state_dict.update(converted)
        # Buffers present in the checkpoint but not here (or the reverse) change the format:
        # adopt the checkpoint's double-quant choice rather than failing on a missing key.
        ckpt_dq = prefix + "weight_nested_absmax" in state_dict
        if ckpt_dq != ("weight_nested_absmax" in self._buffers) and prefix + "weight_absmax" in state_dict:
            dev = self.weight.device
            for name in ("weight_nested_absmax", "weight_nested_code", "weight_offset"):
                if ckpt_dq:
                    self.register_buffer(name, torch.empty_like(state_dict[prefix + name], device=dev))
                elif name in self._buffers:
                    del self._buffers[name]
            self.weight_absmax = torch.empty_like(state_dict[prefix + "weight_absmax"], device=dev)
            self.double_quant = ckpt_dq
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, with only A and B trainable (QLoRA).

    B starts at zero, so wrapping does not change the model's output.
    """

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"base must be a linear layer with in_features/out_features, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = next((t.device for t in base.buffers()), torch.device("cpu"))
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


INT_TYPES = ("int2", "int3", "int4")
SZ_TYPES = ("sz",)
ALL_TYPES = QUANT_TYPES + INT_TYPES + SZ_TYPES


def _check_opts(quant_type: str, opts: dict, allowed: set) -> None:
    bad = set(opts) - allowed
    if bad:
        raise ValueError(f"unknown options {sorted(bad)} for quant_type={quant_type!r}; allowed: {sorted(allowed)}")


def _layer_factory(quant_type: str, opts: dict):
    """quant_type -> a function nn.Linear -> lowbit layer (one place to add a format)."""
    if quant_type in QUANT_TYPES:
        _check_opts(quant_type, opts, {"blocksize", "double_quant", "compute_dtype"})
        return lambda lin: Linear4bit.from_linear(lin, quant_type=quant_type, **opts)
    if quant_type in INT_TYPES:
        from .nn_int import IntLinear

        _check_opts(quant_type, opts, {"group_size", "method"})
        bits = int(quant_type[3:])
        return lambda lin: IntLinear.from_linear(lin, bits=bits, **opts)
    if quant_type in SZ_TYPES:
        from .sz import SZLinear

        _check_opts(quant_type, opts, {"error_bound", "mode"})
        if "error_bound" not in opts:
            raise ValueError("quant_type='sz' needs error_bound=... (abs, or relative to the value range with mode='rel')")
        return lambda lin: SZLinear.from_linear(lin, **opts)
    raise ValueError(f"quant_type must be one of {ALL_TYPES}, got {quant_type!r}")


def replace_linear(
    model: nn.Module,
    quant_type: str = "nf4",
    skip: Iterable[str] = ("lm_head",),
    progress: bool | None = None,
    **opts,
) -> nn.Module:
    """Swap every nn.Linear in `model` (in place) for a lowbit layer; returns the model.

    skip: module names (or their last component) to leave dense. progress: print one line per
    layer to stderr (default: when the model has more than 50 Linear layers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    make = _layer_factory(quant_type, opts)
    targets = [
        (name, mod) for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not any(name == s or name.split(".")[-1] == s for s in skip)
    ]
    if progress is None:
        progress = len(targets) > 50
    for i, (name, lin) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(lin))
        if progress:
            print(f"\rlowbit: quantized {i + 1}/{len(targets)} Linear layers ({quant_type})", end="", file=sys.stderr)
    if progress and targets:
        print(file=sys.stderr)
    return model



def __getattr__(name: str):
    # lowbit.nn.IntLinear / lowbit.nn.SZLinear without importing every format at import time
    if name == "IntLinear":
        from .nn_int import IntLinear

        return IntLinear
    if name == "SZLinear":
        from .sz import SZLinear

        return SZLinear
    raise AttributeError(f"module 'lowbit.nn' has no attribute {name!r}")


__all__ = ["IntLinear", "Linear4bit", "LoRALinear", "SZLinear", "replace_linear"]
