"""LoRALinear: a trainable low-rank adapter over any (frozen) lowbit layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


# ==============================================================================================
# LoRA and whole-model replacement
# ==============================================================================================


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
        dev = next((t.device for t in (*base.buffers(), *base.parameters())), torch.device("cpu"))
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"
