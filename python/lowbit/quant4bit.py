"""4-bit blockwise formats (QLoRA): NF4, FP4 and a per-tensor optimal 16-level table.

Byte layout (identical to bitsandbytes' `quantize_4bit`, so checkpoints move both ways):

* `codes`   uint8 [ceil(numel / 2)]: the tensor flattened in row-major order, element 2i in the
  high nibble of byte i and element 2i+1 in the low nibble; an odd tail is padded with the code
  of 0. For a weight [out, in] with `in % blocksize == 0` this is also `codes.view(out, in // 2)`:
  one row of bytes per output row, which is what the matmul kernels and row sharding rely on.
* `absmax`  the scale of each block of `blocksize` consecutive elements (the last may be short):
  fp32 [ceil(numel / blocksize)] without double quantization; with it, uint8 codes into the
  signed 8-bit dynamic map, decoded as `nested_code[absmax] * nested_absmax[i // 256] + offset`.
* `nested_absmax` fp32 [ceil(nblocks / 256)], `nested_code` fp32 [256], `offset` fp32 scalar
  (the mean of the fp32 absmax values, subtracted before the 8-bit quantization).
* `code`    fp32 [16]: the value of each 4-bit code (bnb's tables for nf4/fp4, the fitted table
  for "optimal").

A value w in block b is stored as the code whose table value is nearest to w / absmax[b]
(computed as w * (1 / absmax[b]) in fp32; a value on a midpoint takes the lower code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import codes as _codes
from . import reference
from ._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float_tensor,
    check_power_of_two,
)

QUANT_TYPES = ("nf4", "fp4", "optimal")
NESTED_BLOCKSIZE = 256


@dataclass
class Quant4bit:
    """A tensor quantized to 4 bits per element with blockwise scales (see the module docstring)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Exact storage: codes, scales (and nested scales, map and offset), code table."""
        tensors = [self.codes, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block (decoded if double-quantized)."""
        return reference.block_scales(*self.scale_tensors(), self.nested_blocksize)

    def scale_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ops take them."""
        return self.absmax, self.nested_absmax, self.nested_code, self.offset

    def to(self, device: torch.device | str) -> "Quant4bit":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            codes=self.codes.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
            offset=mv(self.offset),
        )

    def validate(self) -> None:
        """Check that the stored tensors fit the declared shape (raises ValueError)."""
        n = self.numel
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_power_of_two("blocksize", self.blocksize, 32, 4096)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != (n + 1) // 2:
            raise ValueError(
                f"codes must be uint8 with ceil(numel/2) = {(n + 1) // 2} elements for shape {tuple(self.shape)}, "
                f"got {self.codes.dtype} with {self.codes.numel()}"
            )
        want_absmax = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want_absmax or self.absmax.numel() != self.nblocks:
            raise ValueError(
                f"absmax must be {want_absmax} with {self.nblocks} elements (one per block of {self.blocksize}), "
                f"got {self.absmax.dtype} with {self.absmax.numel()}"
            )
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"code must be a float32 table of 16 values, got {self.code.dtype} with {self.code.numel()}")
        if self.double_quant:
            nn = -(-self.nblocks // self.nested_blocksize)
            if self.nested_absmax is None or self.nested_absmax.numel() != nn:
                raise ValueError(f"nested_absmax must have {nn} elements")
            if self.nested_code is None or self.nested_code.numel() != 256:
                raise ValueError("nested_code must have 256 elements")
            if self.offset is None or self.offset.numel() != 1:
                raise ValueError("offset must be a single fp32 value")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")


def _quantize_with_table(
    flat: torch.Tensor, blocksize: int, code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import ops

    bounds, order = _codes.quantize_bounds(code)
    return ops.quantize_4bit_codes(flat, blocksize, bounds.to(flat.device), order.to(flat.device))


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    offset = absmax.mean()
    nested_code = _codes.dynamic_map().to(absmax.device)
    qabs, nested_absmax = reference.quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return qabs, nested_absmax, nested_code, offset


def _fit_optimal_table(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, bins: int = 1024) -> torch.Tensor:
    """16 levels minimising sum over elements of absmax_b^2 * (w / absmax_b - level)^2.

    Exact k-means by dynamic programming over a fine histogram of the normalised values (weights
    absmax^2, so the error is measured on w itself, not on w / absmax), refined by a few Lloyd
    steps on the raw values. The caller keeps NF4 when that is no worse.
    """
    n = flat.numel()
    block = torch.arange(n, device=flat.device) // blocksize
    a = absmax[block]
    u = (flat.float() / a.clamp(min=1e-38)).clamp(-1, 1).double().cpu().numpy()
    wt = (a.double() ** 2).cpu().numpy()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, bins - 1)
    s0 = np.bincount(b, weights=wt, minlength=bins)
    s1 = np.bincount(b, weights=wt * u, minlength=bins)
    s2 = np.bincount(b, weights=wt * u * u, minlength=bins)
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(s)]) for s in (s0, s1, s2))
    i = np.arange(bins + 1)[:, None]
    j = np.arange(bins + 1)[None, :]
    w_ij = p0[j] - p0[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (p2[j] - p2[i]) - np.where(w_ij > 0, (p1[j] - p1[i]) ** 2 / w_ij, 0.0)
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)
    levels = 16
    dp = cost[0].copy()  # dp[j]: best cost of bins [0, j) in 1 cluster
    back = np.zeros((levels, bins + 1), dtype=np.int64)
    for k in range(1, levels):
        total = dp[:, None] + cost  # split at i
        back[k] = np.argmin(total, axis=0)
        dp = total[back[k], np.arange(bins + 1)]
    cuts = [bins]
    for k in range(levels - 1, 0, -1):
        cuts.append(back[k][cuts[-1]])
    cuts = cuts[::-1]
    starts = [0] + cuts[:-1]
    centers = []
    for s, e in zip(starts, cuts):
        w_sum = p0[e] - p0[s]
        centers.append((p1[e] - p1[s]) / w_sum if w_sum > 0 else (edges[s] + edges[min(e, bins)]) / 2)
    c = np.sort(np.asarray(centers))
    for _ in range(4):  # Lloyd on the exact values with the same nearest rule as the quantizer
        mids = (c[:-1] + c[1:]) / 2
        lab = np.searchsorted(mids, u, side="left")
        wsum = np.bincount(lab, weights=wt, minlength=16)
        usum = np.bincount(lab, weights=wt * u, minlength=16)
        c = np.where(wsum > 0, usum / np.maximum(wsum, 1e-300), c)
        c = np.sort(c)
    return torch.tensor(c, dtype=torch.float32)


def _reconstruction_sse(flat: torch.Tensor, q: Quant4bit) -> float:
    deq = dequantize_4bit(q, dtype=torch.float32).reshape(-1)
    return float(((deq.double() - flat.double()) ** 2).sum())


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> Quant4bit:
    """Quantize `w` (any shape; fp32/fp16/bf16, finite) to 4 bits with blockwise absmax scales.

    quant_type: "nf4" or "fp4" (bitsandbytes' tables, byte-identical to
    `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type, compress_statistics=double_quant)`),
    or "optimal" (a 16-level table fitted to this tensor and stored with it; never worse than NF4).
    """
    check_float_tensor("w", w)
    check_power_of_two("blocksize", blocksize, 32, 4096)
    check_choice("quant_type", quant_type, QUANT_TYPES)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    check_finite("w", w)
    flat = w.detach().contiguous().reshape(-1)

    def build(code: torch.Tensor, qt: str) -> Quant4bit:
        packed, absmax = _quantize_with_table(flat, blocksize, code.to(flat.device))
        q = Quant4bit(packed, absmax, w.shape, w.dtype, blocksize, qt, code.to(flat.device))
        if double_quant:
            qabs, nabs, ncode, off = _double_quantize(absmax)
            q = replace(q, absmax=qabs, nested_absmax=nabs, nested_code=ncode, offset=off)
        return q

    if quant_type != "optimal":
        return build(_codes.code_table(quant_type), quant_type)
    nf4 = build(_codes.code_table("nf4"), "optimal")
    fitted = build(_fit_optimal_table(flat, reference.blockwise_absmax(flat, blocksize), blocksize), "optimal")
    return fitted if _reconstruction_sse(flat, fitted) <= _reconstruction_sse(flat, nf4) else nf4


def dequantize_4bit(q: Quant4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense tensor of `q.shape` in `dtype` (default: the dtype that was quantized)."""
    from . import ops

    if not isinstance(q, Quant4bit):
        raise TypeError(f"q must be a lowbit.Quant4bit, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    q.validate()
    absmax, nabs, ncode, off = q.scale_tensors()
    flat = ops.dequantize_4bit_flat(
        q.codes, absmax, q.code, q.blocksize, q.numel, dtype, nabs, ncode, off, q.nested_blocksize
    )
    return flat.view(q.shape)


__all__ = ["QUANT_TYPES", "Quant4bit", "dequantize_4bit", "quantize_4bit"]
