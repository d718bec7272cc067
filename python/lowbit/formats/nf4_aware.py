"""The activation-aware fit of the 4-bit `optimal` table: what `Linear4bit.from_linear(..., input_moments=h)`
and `replace_linear(..., calibration=...)` store. Same bytes, layout and kernels as lowbit.formats.nf4 (the
spec); only how the table and the block scales are chosen differs.

What matters about a quantized weight W + E of a layer y = x W^T is the output error X E^T on real
inputs X [T, K]. Keeping only the diagonal of X^T X (lowbit.calibration.input_second_moments) its
square is
    err = sum_{n,k} h[k] * E[n, k]^2,      h[k] = mean_t x[t, k]^2,
so an element in an input channel that carries large activations counts h[k] times as much. The fit
minimises err over the two things this format lets us choose without changing its bytes or kernels:
  * the table (16 levels, one per tensor): weighted k-means of the normalised values u = w / s_b with
    element weight h[k] * s_b^2 (w - s_b * level = s_b * (u - level): the error in w's own units);
  * the block scales s_b, which need not be the block's absmax: the decoder multiplies code[q] by
    whatever absmax[b] holds. A smaller scale clips the block's largest values to the table's end and
    resolves the others more finely; per block the best of SCALE_FACTORS * absmax is kept, then the
    closed-form scale for the chosen codes, sum h w c / sum h c^2, when that is better still.
Table and scales alternate AWARE_ROUNDS times from the weighted DP table at absmax scales; every step
can only lower err (up to the search's rounding through a fine grid). The result is kept when its err
is below NF4's at absmax scales, else NF4's table at absmax scales is stored (the plain fit's rule).
With double quantization the codes are chosen against the decoded 8-bit scales, so that the error the
search saw is the error the decoder makes. The bytes are ordinary `optimal` bytes: the scales in
`absmax` are simply not all block maxima.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validate import check_finite, check_float_tensor, check_has_values, check_power_of_two
from . import codebooks, nf4

SCALE_FACTORS = (1.0, 0.9, 0.8, 0.7)
AWARE_ROUNDS = 1
_HIST_BINS = 2048  # Lloyd steps run on a weighted histogram of u over [-1, 1] (clipped values in the end bins)
_DP_BINS = 512  # the initial exact k-means runs on that histogram pooled to this many bins
_GRID = 8192  # the scale search rounds u through an 8193-point grid of [-2, 2] (the bytes round exactly)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[nblocks, blocksize] fp32 view of a flat tensor, the short last block padded with zeros."""
    n = flat.numel()
    return torch.nn.functional.pad(flat.float(), (0, -(-n // blocksize) * blocksize - n)).view(-1, blocksize)


def _rounder(table: torch.Tensor):
    """(x [nblocks, bs], scales [nblocks]) -> the table value nearest to clamp(x / scale, -1, 1), through a
    grid of [-2, 2] (the search's rule: within half a grid step of a midpoint it may pick the farther value,
    which costs nothing measurable; the bytes round exactly). Every scale tried is >= absmax / 2, so
    |x / scale| <= 2 stays on the grid without a clamp pass."""
    srt = torch.sort(table.float())[0]
    grid = torch.linspace(-2.0, 2.0, _GRID + 1, device=table.device).clamp_(-1.0, 1.0)
    lut = srt[torch.bucketize(grid, (srt[:-1] + srt[1:]) / 2)]
    origin = torch.tensor(_GRID / 2 + 0.5, device=table.device)

    def nearest(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        step = ((_GRID / 4) / scale).clamp_(max=1e30)  # finite for an all-zero block's 1e-38 (0 * inf = NaN)
        idx = torch.addcmul(origin, x, step[:, None]).int()  # truncation of >= 0: rounding
        return torch.index_select(lut, 0, idx.view(-1)).view_as(x)

    return nearest


def _block_error(x: torch.Tensor, e: torch.Tensor, scale: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per block sum of e * (x - scale * v)^2 (fp32, [nblocks])."""
    d = torch.addcmul(x, v, scale[:, None], value=-1.0)
    return torch.linalg.vecdot(d.mul_(d), e)


def _search_scales(x: torch.Tensor, e: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                   factors=SCALE_FACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block the scale among factors * absmax (then the closed-form refinement, kept within
    [absmax / 2, 2 absmax]) with the least weighted error for `table`; returns (scales, their errors)."""
    nearest = _rounder(table)
    floor = absmax.clamp(min=1e-38)
    best_err, best = None, None
    for f in factors:
        s = torch.maximum(absmax * f, floor * 0.5)
        err = _block_error(x, e, s, nearest(x, s))
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    v = nearest(x, best)  # the closed-form scale for these codes: d err / d s = 0
    num, den = torch.linalg.vecdot(e * x, v), torch.linalg.vecdot(e * v, v)
    ok = (den > 0) & (num > 0)
    s = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), best)
    s = torch.minimum(torch.maximum(s, floor * 0.5), floor * 2.0)
    err = _block_error(x, e, s, nearest(x, s))
    better = err < best_err
    return torch.where(better, s, best), torch.where(better, err, best_err)


def _histogram(x: torch.Tensor, e: torch.Tensor, scales: torch.Tensor, moments: int = 2) -> list[np.ndarray]:
    """Sums of weight, weight * u (and weight * u^2) per bin of u = x / scale over [-1, 1] (weight
    e * scale^2; u beyond [-1, 1] falls in the end bins with its true value)."""
    u = x * (1.0 / scales)[:, None]
    wt = (e * (scales * scales)[:, None]).reshape(-1).double()
    b = ((u.clamp(-1.0, 1.0) + 1.0) * (_HIST_BINS / 2)).long().clamp_(max=_HIST_BINS - 1).reshape(-1)
    u = u.reshape(-1).double()
    out = [torch.bincount(b, weights=wt, minlength=_HIST_BINS)]
    wu = wt * u
    out.append(torch.bincount(b, weights=wu, minlength=_HIST_BINS))
    if moments > 2:
        out.append(torch.bincount(b, weights=wu * u, minlength=_HIST_BINS))
    return [t.cpu().numpy() for t in out]


def _lloyd(s0: np.ndarray, s1: np.ndarray, c: np.ndarray, steps: int = 8) -> np.ndarray:
    """Lloyd steps of 16 levels on a weighted histogram (each bin at its weighted mean)."""
    mean = np.where(s0 > 0, s1 / np.maximum(s0, 1e-300), np.linspace(-1, 1, s0.size))
    for _ in range(steps):
        lab = np.searchsorted((c[:-1] + c[1:]) / 2, mean, side="left")
        w = np.bincount(lab, weights=s0, minlength=16)
        c = np.sort(np.where(w > 0, np.bincount(lab, weights=s1, minlength=16) / np.maximum(w, 1e-300), c))
    return c


def fit_aware(flat: torch.Tensor, importance: torch.Tensor, blocksize: int, *, rounds: int = AWARE_ROUNDS,
              factors=SCALE_FACTORS) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The activation-aware table and block scales of a flat weight (the module docstring).

    importance: h per input channel ([K], K dividing numel) or per element. Returns (table fp32 [16],
    scales fp32 [nblocks], its weighted error, NF4's weighted error at absmax scales): the caller stores
    NF4 when the second is not larger."""
    x = _blocks(flat, blocksize)
    e = nf4.element_weights(importance, flat.numel())
    mean = float(e.mean()) if e.numel() else 0.0
    e = e / mean if mean > 0 else torch.ones_like(e)  # err's minimiser is scale-free; keep fp32 sums near 1
    e = _blocks(e, blocksize)
    absmax = x.abs().amax(1)
    safe = absmax.clamp(min=1e-38)
    nf4_table = codebooks.code_table("nf4").to(flat.device)
    nf4_err = float(_block_error(x, e, safe, _rounder(nf4_table)(x, safe)).double().sum())
    s0, s1, s2 = _histogram(x, e, safe, moments=3)
    pool = _HIST_BINS // _DP_BINS
    pooled = (s.reshape(_DP_BINS, pool).sum(1) for s in (s0, s1, s2))
    table = nf4._dp_levels(*pooled, np.linspace(-1, 1, _DP_BINS + 1))
    table = _lloyd(s0, s1, table)
    scales = safe
    err = None
    for _ in range(rounds):
        t = torch.tensor(table, dtype=torch.float32, device=flat.device)
        scales, err = _search_scales(x, e, absmax, t, factors)
        table = _lloyd(*_histogram(x, e, scales), table)
    # err is the search's error before the last Lloyd steps, which can only have lowered it: an upper bound
    if err is None:  # rounds=0: the weighted table alone, at absmax scales
        err = _block_error(x, e, scales, _rounder(torch.tensor(table, dtype=torch.float32, device=x.device))(x, scales))
    total = float(err.double().sum())
    return torch.tensor(table, dtype=torch.float32, device=flat.device), scales, total * mean, nf4_err * mean


def check_importance(h, in_features: int) -> torch.Tensor:
    """h as float64 [in_features] (ValueError / TypeError naming what is wrong: not a tensor, wrong length,
    not finite - NaN activations in calibration -, negative)."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"input_moments must be a torch.Tensor of {in_features} values, got {type(h).__name__}")
    if h.dim() != 1 or h.numel() != in_features:
        raise ValueError(f"input_moments must have shape ({in_features},) (one value per input channel), "
                         f"got {tuple(h.shape)}")
    if not h.dtype.is_floating_point:
        raise TypeError(f"input_moments must be a float tensor, got {h.dtype}")
    h = h.detach().double()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("input_moments contains NaN or Inf (were the calibration activations finite?)")
    if bool((h < 0).any()):
        raise ValueError(f"input_moments must be >= 0 (mean squares of the inputs), got a minimum of {float(h.min())}")
    return h


def quantize_aware(w: torch.Tensor, importance: torch.Tensor, blocksize: int = 64,
                   double_quant: bool = True) -> nf4.Quant4bit:
    """`optimal` bytes of w (finite fp32/fp16/bf16) fitted to the calibration importance h of its input
    channels ([K] = w.shape[-1], `check_importance`): `fit_aware`'s table and scales, or NF4 at absmax
    scales when that has the smaller weighted error. Decodes with the ordinary kernels."""
    check_float_tensor("w", w)
    check_has_values("w", w)
    check_power_of_two("blocksize", blocksize, 32, 4096)
    check_finite("w", w)
    h = check_importance(importance, w.shape[-1]).to(w.device)
    flat = w.detach().contiguous().reshape(-1)
    table, scales, err, nf4_err = fit_aware(flat, h, blocksize)
    if not err < nf4_err:
        table, scales = codebooks.code_table("nf4").to(flat.device), nf4.blockwise_absmax(flat, blocksize)
    nested = {}
    used = scales
    if double_quant:
        offset = scales.mean()
        ncode = codebooks.dynamic_map().to(flat.device)
        qabs, nabs = nf4.quantize_blockwise_8bit(scales - offset, ncode, nf4.NESTED_BLOCKSIZE)
        used = nf4.decode_scales(qabs, nabs, ncode, offset, nf4.NESTED_BLOCKSIZE)  # codes against what decodes
        nested = {"nested_absmax": nabs, "nested_code": ncode, "offset": offset}
    bounds, order = codebooks.quantize_bounds(table)
    packed, stored = nf4.quantize_flat(flat, blocksize, bounds, order, scales=used)
    return nf4.Quant4bit(packed, qabs if double_quant else stored, w.shape, w.dtype, blocksize, "optimal",
                     table.float(), **nested)
