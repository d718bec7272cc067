"""Calibration statistics: what each nn.Linear of a model sees on real text.

Activation-aware quantization weighs a weight's error by what it does to the layer's output. For a layer
y = x @ W^T and an error E on W, the output error over calibration inputs X [T, K] is
    ||X E^T||^2 = sum_n E_n (X^T X) E_n^T,
and keeping only the diagonal of X^T X (the second moment of each input channel) gives the weight
    err = sum_{n,k} E[n, k]^2 * h[k],   h[k] = mean_t x[t, k]^2,
per input channel k. `input_second_moments` collects h for every nn.Linear in one forward pass over the
calibration tokens (forward hooks; nothing is stored per token). A format then fits with h as element weights
(the activation-aware `optimal` codebook, importance-scaled SZ bounds).

Checks: a calibration token id outside the model's vocabulary (another tokenizer's ids) raises ValueError
before any forward; a layer whose statistics are not finite (NaN / Inf activations) raises ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from .nn import skip_matches


def calibration_windows(ids: Tensor, ctx: int, windows: int) -> Tensor:
    """[windows, ctx] consecutive non-overlapping windows from the start of a 1-D token tensor. ValueError when
    the text holds fewer than ctx * windows tokens (names both counts)."""
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("ids must be a 1-D integer tensor of token ids")
    if ctx < 1 or windows < 1:
        raise ValueError(f"ctx and windows must be >= 1, got ctx={ctx}, windows={windows}")
    need = ctx * windows
    if ids.numel() < need:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {windows} windows of {ctx} need {need} "
                         "(give a longer text, or fewer/shorter windows)")
    return ids[:need].view(windows, ctx).long()


@torch.no_grad()
def input_second_moments(model: nn.Module, windows: Tensor, skip: Optional[Iterable[str]] = ("lm_head",),
                         batch: int = 4) -> dict[str, Tensor]:
    """{module name: h [in_features] fp64} with h[k] = mean over calibration tokens of x[t, k]^2, for every
    nn.Linear of `model` not named in `skip` (nn.skip_matches' rule), from one forward pass of `windows`
    ([n, ctx] token ids) in batches of `batch`. The model is run as it is (eval mode is set for the pass and
    restored). A shared Linear is reported under each of its names, with the statistics of all its calls."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise TypeError("windows must be a [n, ctx] integer tensor of token ids (calibration_windows)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and windows.numel() and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise ValueError(f"calibration token ids span [{int(windows.min())}, {int(windows.max())}] but the model's "
                         f"vocabulary has {vocab} ids: was the text tokenized with another model's tokenizer?")
    skip = () if skip is None else ((skip,) if isinstance(skip, str) else tuple(skip))
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod) is nn.Linear and not skip_matches(name, skip):
            names.setdefault(id(mod), []).append(name)
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}

    def hook(mod, inputs, _out):
        x = inputs[0].detach().reshape(-1, mod.in_features).double()
        key = id(mod)
        sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in names]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for i in range(0, windows.shape[0], batch):
            model(input_ids=windows[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for key, ns in names.items():
        if key not in sums:
            continue  # a Linear the forward never calls
        h = (sums[key] / counts[key]).cpu()
        if not torch.isfinite(h).all():
            raise ValueError(f"calibration activations of layer {ns[0]!r} are not finite (NaN or Inf in its inputs)")
        for n in ns:
            out[n] = h
    return out


__all__ = ["calibration_windows", "input_second_moments"]
