"""The family kernel modules, found rather than listed: every `kernels/<family>.py` that defines
`aot_specs()`.

The AOT compile (kernels/_compile.py, `python -m lowbit._aot`), the cost report (kernels/cost.py)
and their tests iterate `families()`, so a new family's kernel file is compiled, reported and
held to its budgets without an edit to any shared file. A family module defines:

* `aot_specs() -> list[KernelSpec]`: its launches on meta tensors (kernels/_spec.py); this is
  what makes a module a family;
* `COST_BUDGETS: list[CostBudget]`: its static goals in the cost report (may be empty);
* `INT64_POINTERS: dict[str, tuple[str, ...]]`: by spec-name prefix, the pointer arguments
  whose offsets grow with M or N * K and must be 64-bit (may be empty).

Not families: modules whose name starts with "_" (shared machinery) and the tools in TOOLS.
Families are returned in name order. Like everything in kernels/, nothing here imports lowbit:
the modules are imported relative to this package, whatever its name.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType

TOOLS = ("cost",)  # modules of this folder that are not families (they import the families)


def family_names() -> list[str]:
    """Candidate family modules of this folder, by name: not "_"-prefixed, not a tool."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name for m in pkgutil.iter_modules([here])
                  if not m.name.startswith("_") and m.name not in TOOLS and not m.ispkg)


def families() -> dict[str, ModuleType]:
    """{name: module} of every family kernel module (one that defines aot_specs()), imported."""
    found = {}
    for name in family_names():
        module = importlib.import_module(f"{__package__}.{name}")
        if callable(getattr(module, "aot_specs", None)):
            found[name] = module
    return found
