"""replace_linear and the registry look-ups it is built on (quant_types, layer_factory, empty_layer,
takes_calibration, skip_matches)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from ._base import QuantLinear
from .family import family_of, quant_types

def layer_factory(quant_type: str, opts: dict):
    """quant_type -> a function (nn.Linear, **extra) -> lowbit layer, from the family registry (extra: build
    arguments that differ per layer, i.e. input_moments). ValueError for an unknown quant_type, an option it
    does not take, or a required option missing (sz's error_bound)."""
    fam = family_of(quant_type)
    full = fam.check_options(quant_type, dict(opts))
    return lambda lin, **kw: fam.build(quant_type, lin, **full, **kw)


def takes_calibration(quant_type: str) -> bool:
    """Whether replace_linear(..., calibration=...) applies to quant_type (its family lists it in
    `calibrated`: optimal, sz). ValueError for an unknown quant_type."""
    return quant_type in family_of(quant_type).calibrated


def empty_layer(quant_type: str, in_features: int, out_features: int, bias: bool = True, *, device=None,
                **opts) -> QuantLinear:
    """The layer `layer_factory(quant_type, opts)` would build for an nn.Linear of this shape, made by the
    family's constructor: it only allocates (a zero weight) and never quantizes, for a state dict to be
    loaded into (lowbit.io.load_quantized). Takes replace_linear's options; an option that only steers
    quantization (int `method`) is checked and otherwise unused, and a required option may be omitted (sz's
    error_bound: the loaded checkpoint's is adopted). ValueError for an unknown quant_type or option."""
    fam = family_of(quant_type)
    bad = sorted(set(opts) - set(fam.option_names(quant_type)))
    if bad:
        fam.check_options(quant_type, opts)  # raises, naming them
    full = {**fam.defaults(quant_type), **opts}
    return fam.empty(quant_type, in_features, out_features, bias, device, **full)


def check_options(quant_type: str, opts: dict) -> None:
    """The checks replace_linear would make of quant_type and `opts` before any weight is read (an unknown
    or missing option: layer_factory; a bad value: the family's constructor, on a 1-row layer on the meta
    device, which allocates nothing). For configs and command lines checked up front (LowbitConfig,
    `lowbit quantize`). ValueError / TypeError from the family's own checks."""
    layer_factory(quant_type, opts)
    gs = opts.get("group_size")  # a layer wide enough for the group size asked for (32 groups)
    in_features = 32 * gs if isinstance(gs, int) and not isinstance(gs, bool) and gs > 0 else 64
    empty_layer(quant_type, in_features, 1, bias=False, device="meta", **opts)


_DEFAULT_SKIP = ("lm_head",)


def skip_matches(name: str, skip: Iterable[str]) -> bool:
    """The one `skip` rule of replace_linear, `lowbit quantize --skip` and the demo: a skip entry names a
    module by its full dotted name or by a dotted suffix of it ("lm_head", "pooler", "output.dense"), and a
    Linear stays dense when it or any module containing it is named ("pooler" keeps "bert.pooler.dense")."""
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and its ancestors
    return any(p == s or p.endswith("." + s) for p in paths for s in skip)


def replace_linear(model: nn.Module, quant_type: str = "nf4", skip: Optional[Iterable[str]] = None,
                   progress: Optional[bool] = None, calibration: Optional[dict] = None, **opts) -> nn.Module:
    """Swap every nn.Linear in `model` for a lowbit layer; returns the model (or, for a bare
    nn.Linear, the new layer).

    skip: modules to leave dense, by full name or dotted suffix; a module named keeps every Linear inside
    it dense (`skip_matches`; the rule of `lowbit quantize --skip`); default ("lm_head",). A name given
    explicitly that matches no module warns. All layers are quantized before any is swapped
    in: if one fails, the model is left exactly as it was and the error names the layer's path
    and shape. progress: one line per layer on stderr (default: more than 50 Linear layers).
    calibration: {Linear name: h [in_features]} (lowbit.calibration.input_second_moments of this model),
    passed to each layer's from_linear as input_moments (an activation-aware fit). Only for a quant_type
    that takes it (`takes_calibration`: optimal, sz), else ValueError "... does not take calibration".
    Every Linear to be quantized must have an entry (ValueError naming the first that has none: a
    partial dict is a mistake, not a request to fit some layers plainly); entries for other modules
    (skipped ones, lm_head) are ignored. A bare nn.Linear looks up the name "".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    explicit = skip is not None
    skip = _DEFAULT_SKIP if skip is None else ((skip,) if isinstance(skip, str) else tuple(skip))
    make = layer_factory(quant_type, opts)
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise TypeError(f"calibration must be a dict {{Linear name: input second moments}}, got "
                            f"{type(calibration).__name__}")
        if not takes_calibration(quant_type):
            raise ValueError(f"quant_type {quant_type!r} does not take calibration; formats that do: "
                             f"{', '.join(q for q in quant_types() if takes_calibration(q))}")
    if type(model) is nn.Linear:
        _check_calibrated(calibration, [("", model)])
        return _make_one(make, "", model, quant_type, calibration)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    if explicit:
        for s in skip:
            if not any(skip_matches(n, (s,)) for n in names):
                warnings.warn(f"replace_linear: skip name {s!r} matches no module of the model", stacklevel=2)
    # Every name of a shared nn.Linear gets the one quantized layer (named_modules would list it once).
    # A shared Linear stays dense when any of its names is skipped.
    linears = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False) if type(mod) is nn.Linear]
    skipped = {id(mod) for name, mod in linears if skip_matches(name, skip)}
    targets = [(name, mod) for name, mod in linears if id(mod) not in skipped]
    if progress is None:
        progress = len(targets) > 50
    _check_calibrated(calibration, targets)
    built, made = [], {}
    for i, (name, lin) in enumerate(targets):
        if id(lin) not in made:
            made[id(lin)] = _make_one(make, name, lin, quant_type, calibration)
        built.append((name, made[id(lin)]))
        if progress:
            print(f"\rlowbit: quantized {i + 1}/{len(targets)} Linear layers ({quant_type})", end="", file=sys.stderr)
    if progress and targets:
        print(file=sys.stderr)
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model


def _check_calibrated(calibration: Optional[dict], targets) -> None:
    """ValueError naming the first Linear to be quantized that `calibration` has no statistics for."""
    if calibration is None:
        return
    missing = [name for name, _ in targets if name not in calibration]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"replace_linear: calibration has no statistics for layer {missing[0]!r}{more}; give "
                         "input_second_moments of this model for every Linear that is quantized")


def _make_one(make, name: str, lin: nn.Linear, quant_type: str, calibration: Optional[dict] = None) -> QuantLinear:
    try:
        return make(lin) if calibration is None else make(lin, input_moments=calibration[name])
    except (ValueError, TypeError) as e:
        where = repr(name) if name else "the model (a bare nn.Linear)"
        raise type(e)(f"replace_linear: layer {where} (nn.Linear in_features={lin.in_features}, "
                      f"out_features={lin.out_features}) cannot be quantized as {quant_type!r}: {e}") from e
