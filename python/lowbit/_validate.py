"""Argument checks shared by every public entry point.

Each helper raises ValueError/TypeError whose message names the argument and what is allowed,
so that bad input never reaches a kernel (where it would surface as an index or compile error).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_tensor(name: str, t: Any, *, allow_empty: bool = False) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty (shape {tuple(t.shape)})")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    # One pass (min and max, no bool tensor the size of t: that cost 100 ms of a 140 ms quantize of
    # 4096x4096 on the CPU) and one host sync: NaN and +-Inf both reach the min or the max.
    lo, hi = torch.aminmax(t.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(
            f"{name} contains NaN or Inf; lowbit refuses to quantize non-finite weights "
            "(their block scale would poison every value in the block). Clean the tensor first."
        )


def check_power_of_two(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_matmul_args(x: torch.Tensor, out_features: int, in_features: int,
                      bias: torch.Tensor | None) -> torch.Tensor | None:
    """Checks of y = x @ W^T + bias for W [out_features, in_features]; returns bias in x's dtype."""
    check_float_tensor("x", x, allow_empty=True)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal in_features={in_features}, got shape {tuple(x.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
    return bias


def check_dtype(name: str, dtype: Any, allowed: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.dtype:
    allowed = tuple(allowed)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {str(dtype).replace('torch.', '')}")
    return dtype


def check_device(name: str, device: Any) -> torch.device | None:
    """A usable torch.device (or None): a CUDA device asked for on a machine without one is a
    ValueError here, not a RuntimeError from deep inside torch."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda', 'cuda:0' or 'meta', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return dev


def check_has_values(name: str, t: torch.Tensor) -> None:
    """Quantizing needs the values: a meta tensor (shape only) cannot be quantized."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device and has no values to quantize; build the layer with its constructor "
            "(which allocates only) and load a quantized state dict, or materialize the weight first"
        )
