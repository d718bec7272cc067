"""Importance-scaled columns for the SZ family: one error bound per input column, from calibration statistics.

A layer y = x @ W^T whose input channel k has second moment h[k] = mean x_k^2 turns a weight error E into an
output error of squared size sum_{n,k} E[n, k]^2 h[k] (the diagonal of X^T X; lowbit.calibration). One
absolute bound for the whole tensor spends bits equally on columns that matter unequally. Here the columns are
scaled by powers of two before compression,

    e[k] = clamp(round(alpha * log2(h[k] / ref)), -MAX_SHIFT, MAX_SHIFT)      (int8, one per input column)
    W'   = W * 2**e     (exact: a power of two only moves the exponent)
    c    = sz_compress(W', error_bound)                                       (the stream, unchanged)
    W^   = decode(c) * 2**-e                                                   (exact again)

so every element keeps a hard bound of its own, stated per column:  |W^[n, k] - W[n, k]| <= bound * 2**-e[k],
and the layer computes y = (x * 2**-e) @ decode(c)^T, which is x @ W^^T (the fused decode-GEMV and the stream
format are unchanged; scaling x costs M*K multiplies, scaling W would cost N*K per forward).

Why powers of two: W * 2**e, decode * 2**-e and x * 2**-e are exact in fp32 (and in fp16/bf16 away from
their subnormal and overflow ranges), so the stream's guarantee transfers to W^ column by column without a
rounding term, and one int8 per column is all that is stored (8 / out_features bits per weight). The price
is a scale grid of one octave: about 8 % more output-weighted squared error than ideal scales (the mean of
4**u over u uniform in [-1/2, 1/2]), which `benchmarks/sz_importance_smollm2.py` measures as the perplexity
of the whole model (docs/sz.md). The bound is checked element by element in float64 when a layer is built
(`check_columns`), in every output dtype the stream claims.

ref: "layer" divides h by its geometric mean over the channels with h > 0 (the bound applies as given to a
column of typical importance); "none" uses h as it is, so that one error bound over a whole model also
allocates between layers (a column's bound times the RMS of its input is about the same everywhere).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# alpha: 0.5 is the high-rate optimum for the h-weighted squared error; 0.35 measured best on SmolLM2 at 3.0
# bits/param (held-out calibration text: 0.35 -> 41.1, 0.5 -> 44.9, 0.75 -> 48.9; docs/sz.md)
DEFAULT_ALPHA = 0.35
MAX_SHIFT = 12  # |e| <= 12: 2**+-12 is exact in fp16 (its range is 2**-24 .. 65504), and 4096x is plenty
REFS = ("layer", "none")


def check_input_moments(h, in_features: int, name: str = "input_moments") -> Tensor:
    """h as a float64 CPU tensor [in_features]; ValueError (naming `name`) unless it is a 1-D real tensor of
    that length with finite, non-negative values and at least one positive; TypeError if not a tensor."""
    if not isinstance(h, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of per-input-channel second moments, got {type(h).__name__}")
    if h.is_complex() or not (h.is_floating_point() or h.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real float tensor, got dtype {h.dtype}")
    if h.dim() != 1 or h.numel() != in_features:
        raise ValueError(f"{name} must have shape [{in_features}] (one value per input channel), got {list(h.shape)}")
    h = h.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} holds NaN or Inf (non-finite calibration statistics)")
    if bool((h < 0).any()):
        raise ValueError(f"{name} must be non-negative (second moments), got a minimum of {float(h.min())!r}")
    if not bool((h > 0).any()):
        raise ValueError(f"{name} is all zero: no input channel carries any signal to weigh the columns by")
    return h


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"importance_alpha must be a float, got {type(alpha).__name__}")
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 <= a <= 2.0):
        raise ValueError(f"importance_alpha must be in [0, 2], got {alpha!r}")
    return a


def column_exponents(h: Tensor, alpha: float = DEFAULT_ALPHA, ref: str = "layer") -> Tensor:
    """int8 [K]: e[k] = clamp(round(alpha * log2(h[k] / r)), -MAX_SHIFT, MAX_SHIFT), r the geometric mean of the
    positive h (ref="layer") or 1 (ref="none"). A channel with h = 0 gets -MAX_SHIFT (its weights never reach
    the output on calibration text: the coarsest bound). h must be checked (check_input_moments)."""
    alpha = check_alpha(alpha)
    if ref not in REFS:
        raise ValueError(f"importance_ref must be one of {REFS}, got {ref!r}")
    pos = h > 0
    lg = torch.full_like(h, -math.inf)
    lg[pos] = torch.log2(h[pos])
    if ref == "layer":
        lg = lg - lg[pos].mean()
    e = torch.where(pos, torch.round(alpha * lg), torch.full_like(h, -MAX_SHIFT))
    return e.clamp(-MAX_SHIFT, MAX_SHIFT).to(torch.int8)


def check_exponents(e: Tensor, in_features: int, name: str = "col_exp") -> Tensor:
    if not isinstance(e, Tensor) or e.dtype != torch.int8 or e.dim() != 1 or e.numel() != in_features:
        got = f"{e.dtype} {list(e.shape)}" if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"{name} must be an int8 tensor [{in_features}] of column exponents, got {got}")
    if e.device.type != "meta" and e.numel() and int(e.abs().max()) > MAX_SHIFT:
        raise ValueError(f"{name} holds an exponent of magnitude {int(e.abs().max())}, over {MAX_SHIFT}")
    return e


def pow2(e: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """2**e as `dtype` (exact for |e| <= MAX_SHIFT in fp32, fp16 and bf16)."""
    return torch.ldexp(torch.ones(e.shape, dtype=dtype, device=e.device), e.to(torch.int32))


def scale_columns(w: Tensor, e: Tensor) -> Tensor:
    """W * 2**e (columns), exact: in w's dtype when that holds every product exactly, else in fp32. ValueError
    when even fp32 cannot (a product overflows or underflows)."""
    s = pow2(e.to(w.device), torch.float32)
    w32 = w.detach().float()
    out = w32 * s
    if not bool(torch.isfinite(out).all()) or not torch.equal(out / s, w32):
        raise ValueError("the column scales 2**e overflow or underflow fp32 for this weight; use a smaller "
                         "importance_alpha")
    if w.dtype != torch.float32:
        narrow = out.to(w.dtype)
        if bool(torch.isfinite(narrow).all()) and torch.equal(narrow.float(), out):
            return narrow
    return out


def column_bounds(bound: float, e: Optional[Tensor], in_features: int) -> Tensor:
    """float64 [K]: the bound every element of column k keeps, bound * 2**-e[k] (bound everywhere without e)."""
    if e is None:
        return torch.full((in_features,), float(bound), dtype=torch.float64)
    return float(bound) * torch.ldexp(torch.ones(in_features, dtype=torch.float64), -e.cpu().to(torch.int32))


def check_columns(w: Tensor, out: Tensor, bounds: Tensor) -> tuple[bool, bool]:
    """Element by element in float64, for a decoded weight `out` in some dtype d (out.dtype):
    (|out - w| <= bounds[k] everywhere, |out - w| <= max(bounds[k], |d(w) - w|) everywhere)."""
    w64 = w.detach().double()
    err = (out.double() - w64).abs()
    b = bounds.to(err.device).expand_as(err)
    strict = bool((err <= b).all())
    if strict:
        return True, True
    floor = (w.detach().to(out.dtype).double() - w64).abs()
    return False, bool((err <= torch.maximum(b, floor)).all())


__all__ = ["DEFAULT_ALPHA", "MAX_SHIFT", "REFS", "check_alpha", "check_columns", "check_exponents",
           "check_input_moments", "column_bounds", "column_exponents", "pow2", "scale_columns"]
