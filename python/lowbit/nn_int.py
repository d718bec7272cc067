"""IntLinear: a linear layer with frozen 2/3/4-bit integer codes and trainable scales (PEQA)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .quantint import METHODS, QuantInt, _check_bits, _check_group_size, _check_in_features, matmul_int, quantize_int
from ._validate import check_choice


class IntLinear(nn.Module):
    """nn.Linear whose weight is s * (Q - z) with frozen integer codes Q, zero points z.

    State (see lowbit.quantint for the byte layout):
      codes  buffer    int32 [out, in/32, bits]   bit planes of Q
      zeros  buffer    uint8 [out] or [out, in/group_size]
      scale  Parameter fp32  [out] or [out, in/group_size]   the only trainable tensor
      bias   Parameter (requires_grad=False by default; set it True to train it too)
    `.to(dtype)` / `.half()` convert scale and bias like any float parameter; the codes and zero
    points keep their integer dtypes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 3,
        group_size: Optional[int] = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        method: str = "rtn",
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_in_features(in_features)
        _check_bits(bits)
        _check_group_size(group_size, in_features)
        # A usable layer from the start: nn.Linear's init, quantized.
        ref = nn.Linear(in_features, out_features, bias=bias, device="cpu")
        self._init_from(ref.weight.detach().to(device or "cpu"),
                        None if ref.bias is None else ref.bias.detach().to(device or "cpu"), bits, group_size, method)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 3, group_size: Optional[int] = None,
                    method: str = "rtn") -> "IntLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _check_in_features(linear.in_features)
        _check_bits(bits)
        _check_group_size(group_size, linear.in_features)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        b = None if linear.bias is None else linear.bias.detach().clone()
        self._init_from(linear.weight.detach(), b, bits, group_size, method)
        return self

    def _init_from(self, w: torch.Tensor, b: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                   method: str) -> None:
        check_choice("method", method, METHODS)
        q = quantize_int(w, bits, group_size, method)
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size = bits, group_size
        self.weight_dtype = w.dtype
        self.register_buffer("codes", q.codes)
        self.register_buffer("zeros", q.zeros)
        self.scale = nn.Parameter(q.scale.clone())
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    @property
    def quantized_weight(self) -> QuantInt:
        """The layer's weight with its current (possibly fine-tuned) scales, detached."""
        return QuantInt(self.codes, self.scale.detach(), self.zeros, torch.Size((self.out_features, self.in_features)),
                        self.weight_dtype, self.bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .quantint import dequantize_int

        return dequantize_int(self.quantized_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_int(x, self.quantized_weight, self.scale, self.bias)

    @property
    def bits_per_param(self) -> float:
        nbytes = sum(t.numel() * t.element_size() for t in (self.codes, self.zeros, self.scale))
        return 8.0 * nbytes / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, bits_per_param={self.bits_per_param:.3f}"
        )


__all__ = ["IntLinear"]
