"""The format-family registry: one `Family` record per family, registered beside its layer.

A family is added by writing its own files (format spec in formats/, kernels in kernels/, C kernels in
csrc/, a layer module in nn/ that ends with `register_family(Family(...))`) plus one line in
`lowbit/nn/__init__.py`'s list of family modules. Everything that used to name the families (replace_linear,
empty layers for loading, the transformers quantizer and LowbitConfig, PEFT merges, `lowbit quantize` /
`lowbit eval` options, the vLLM plugin) asks this registry instead; what a layer must say about itself beyond
the record is a few class attributes of QuantLinear (STORES_WEIGHT, DATA_DEPENDENT_SHAPES, FROZEN_BIAS,
KEEP_DTYPE) and its `requantize_` / `narrow` methods (docs/adding-a-family.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Option:
    """One option of a family's layers (replace_linear / LowbitConfig / `lowbit quantize` keyword).

    default: the value when not given (`REQUIRED` for none: replace_linear and LowbitConfig then refuse).
    flag / cli_type / cli_action / choices / help: its `lowbit quantize` command-line flag (flag None: not on
    the CLI); an option name shared by several families is one flag, declared by the first family's Option.
    quant_types: the family's quant types that take it (() = all of them).
    dtype: the value is a torch dtype, stored in JSON configs by name ("bfloat16").
    """

    name: str
    default: Any
    help: str = ""
    flag: Optional[str] = None
    cli_type: Optional[Callable[[str], Any]] = None
    quant_types: tuple[str, ...] = ()
    dtype: bool = False
    cli_action: Optional[str] = None  # e.g. "store_false": a switch (--no-double-quant) instead of a value
    choices: tuple = ()


REQUIRED = object()  # Option.default of an option that has none


@dataclass(frozen=True)
class Family:
    """A format family, as everything outside its own files sees it.

    name: the "family" field of the layers' format metadata. layer: its QuantLinear subclass.
    quant_types: the formats it serves ("nf4", "int3", ...). options: its Options.
    build(quant_type, linear, **options) -> layer: quantize an nn.Linear (options complete: defaults filled in;
        `input_moments=h` is added for a calibrated fit when quant_type is in `calibrated`).
    empty(quant_type, in_features, out_features, bias, device, **options) -> layer: allocate only (for a
        checkpoint to be loaded into; never quantizes).
    calibrated: quant types whose build takes calibration statistics (input_moments).
    label(quant_type, options) -> str: a short name for reports (lowbit eval's rows).
    doc: its documentation page.
    """

    name: str
    layer: type
    quant_types: tuple[str, ...]
    options: tuple[Option, ...]
    build: Callable[..., Any]
    empty: Callable[..., Any]
    calibrated: tuple[str, ...] = ()
    label: Optional[Callable[[str, dict], str]] = None
    doc: str = ""
    extra: dict = field(default_factory=dict)

    def option_names(self, quant_type: str) -> tuple[str, ...]:
        return tuple(o.name for o in self.options if not o.quant_types or quant_type in o.quant_types)

    def defaults(self, quant_type: str) -> dict:
        """{option: default} of quant_type's options (REQUIRED ones left out)."""
        return {o.name: o.default for o in self.options
                if (not o.quant_types or quant_type in o.quant_types) and o.default is not REQUIRED}

    def check_options(self, quant_type: str, opts: dict) -> dict:
        """opts with the defaults filled in; ValueError naming an option quant_type does not take (or one of
        another family) and a required option that is missing."""
        allowed = self.option_names(quant_type)
        bad = sorted(set(opts) - set(allowed))
        if bad:
            others = {o.name for f in FAMILIES.values() if f is not self for o in f.options}
            where = " (an option of another format family)" if set(bad) & others else ""
            raise ValueError(f"unknown options {bad} for quant_type={quant_type!r}{where}; allowed: {sorted(allowed)}")
        missing = [o.name for o in self.options if o.name in allowed and o.default is REQUIRED and o.name not in opts]
        if missing:
            helps = "; ".join(f"{o.name}: {o.help}" for o in self.options if o.name in missing)
            raise ValueError(f"quant_type={quant_type!r} needs {', '.join(f'{m}=...' for m in missing)} ({helps})")
        return {**self.defaults(quant_type), **opts}

    def describe(self, quant_type: str, opts: dict) -> str:
        if self.label is not None:
            return self.label(quant_type, opts)
        return " ".join([quant_type] + [f"{k}={v}" for k, v in opts.items() if v is not None])


FAMILIES: dict[str, Family] = {}  # by name, in registration order
_BY_QUANT_TYPE: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to the registry (its layer module calls this once, at import). ValueError when its name or
    one of its quant types is taken, or its layer does not say it is this family (layer.FAMILY)."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be a lowbit.nn.Family, got {type(family).__name__}")
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"a format family named {family.name!r} is already registered")
    taken = [q for q in family.quant_types if q in _BY_QUANT_TYPE and _BY_QUANT_TYPE[q] is not family]
    if taken:
        raise ValueError(f"quant types {taken} are already registered by family {_BY_QUANT_TYPE[taken[0]].name!r}")
    if getattr(family.layer, "FAMILY", None) != family.name:
        raise ValueError(f"family {family.name!r}: its layer {family.layer.__name__}.FAMILY is "
                         f"{getattr(family.layer, 'FAMILY', None)!r}")
    FAMILIES[family.name] = family
    for q in family.quant_types:
        _BY_QUANT_TYPE[q] = family
    return family


def quant_types() -> tuple[str, ...]:
    """Every quant_type replace_linear accepts, family by family in registration order."""
    return tuple(_BY_QUANT_TYPE)


def family_of(quant_type: str) -> Family:
    """The Family serving quant_type; ValueError listing every quant type otherwise."""
    if not isinstance(quant_type, str):
        raise TypeError(f"quant_type must be a str, got {type(quant_type).__name__}")
    try:
        return _BY_QUANT_TYPE[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {quant_types()}, got {quant_type!r}") from None


def family_named(name: str) -> Family:
    """The Family whose metadata name is `name` ("nf4", "intq", "sz", ...); ValueError otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"no lowbit format family named {name!r}; known: {sorted(FAMILIES)}") from None


def all_options() -> tuple[Option, ...]:
    """Every family's Options, first declaration of a name kept (the CLI's flags)."""
    seen: dict[str, Option] = {}
    for fam in FAMILIES.values():
        for o in fam.options:
            seen.setdefault(o.name, o)
    return tuple(seen.values())
