"""A compile spec is a launch: the launcher's own call on meta tensors, intercepted at its
`kernel[grid](...)` (kernels/_compile.py explains why). The kernel files import this module to
list their specs (`aot_specs()`) and their cost goals (`COST_BUDGETS`); _families.py finds the
kernel files for _compile.py and cost.py. This module imports no kernel file, so the imports run
one way."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch


class KernelSpec(NamedTuple):
    """One kernel launch to compile: the kernel and the arguments its launcher passed."""

    name: str
    fn: Any  # the @triton.jit kernel
    args: tuple  # positional arguments as launched (meta tensors, ints)
    kwargs: dict  # constexprs and launch options (num_warps, num_stages, ...) as launched
    # What the cost report needs to know (kernels/cost.py); None: not reported. Keys: kernel, format,
    # m_bucket, config, weights_per_iter, bytes_per_weight; optional: unit (also report
    # instr_per_<unit>), iterations_by_stores (count source iterations of an unrolled loop by its
    # stores), roles ({pointer argument: codes | scales | x | table} beyond cost.ROLE).
    cost: dict | None = None


class CostBudget(NamedTuple):
    """A static goal for one spec of the cost report (kernels/cost.py). A family module lists its
    goals in `COST_BUDGETS`; tests/test_cost.py compiles every listed spec and checks each one."""

    spec: str  # the spec's full name, as its aot_specs() names it
    max_instr_per_weight: float  # SASS instructions per weight in the steady-state loop, at most
    arch: int = 90  # the sm_ it is compiled for
    code_load_bits: int | None = None  # the widest load of the codes is exactly this wide (None: unchecked)
    code_bits_per_weight: float | None = None  # code bits loaded per weight (each code bit loaded once)
    max_barriers: int = 0  # per loop iteration
    max_shuffles: int = 0  # per loop iteration
    max_spill_bytes: int = 0
    max_stack_bytes: int = 0


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with a shape, a dtype and strides but no memory, for launch_spec."""
    return torch.empty(shape, dtype=dtype, device="meta")


class _Launched(Exception):
    def __init__(self, fn, args, kwargs):
        super().__init__(getattr(fn, "__name__", str(fn)))
        self.fn, self.args, self.kwargs = fn, args, kwargs


@contextlib.contextmanager
def _intercept_launches():
    # `kernel[grid](*args, **kwargs)` goes through KernelInterface.__getitem__ for both the JIT
    # and the interpreter; for the duration of the block it raises with the arguments instead.
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def record(self, grid):
        def launch(*args, **kwargs):
            raise _Launched(self, args, kwargs)

        return launch

    KernelInterface.__getitem__ = record
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def launch_spec(name: str, launch: Callable[[], Any], cost: dict | None = None) -> KernelSpec:
    """The first kernel launch that `launch()` (a launcher call on meta tensors) makes, as a spec.

    The launcher runs up to its `kernel[grid](...)` call (its allocations are meta tensors too),
    which is intercepted; nothing after it runs.
    """
    with _intercept_launches():
        try:
            launch()
        except _Launched as launched:
            return KernelSpec(name, launched.fn, launched.args, launched.kwargs, cost)
    raise RuntimeError(f"{name}: the launcher returned without launching a kernel")
