"""Shared test helpers: error metrics, poisoning, the interpreter routing switch and the launch
check that proves a kernel-tier test ran its kernel."""

from __future__ import annotations

import collections
import contextlib
import os

import pytest
import torch

# METHOD.md tolerances for ||out - ref|| / ||ref|| against a float64 reference.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TOL_TF32 = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN/Inf anywhere gives inf so that it never passes."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-300))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t full of NaN (floats) or 0xAB (ints): unwritten outputs show up."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, 0xAB)


def kernels_interpreted() -> bool:
    """Whether lowbit's @triton.jit kernels were decorated under the interpreter (TRITON_INTERPRET=1
    when lowbit.kernels was first imported: the switch is read at decoration time)."""
    from lowbit._backend import kernels

    K = kernels()
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K.nf4.quantize_4bit_kernel, InterpretedFunction)


@contextlib.contextmanager
def expect_launches(*names: str, absent: tuple[str, ...] = ()):
    """Fail unless each launcher in `names` ran inside the block (lowbit.kernels._common.LAUNCHES
    grew; "a|b" is met by either) and none in `absent` did. An op that quietly took the pure-torch
    reference launches nothing, so a test wrapped in this can not pass without its kernel."""
    if not names and not absent:
        raise TypeError("expect_launches: name the launchers that must (or must not) run")
    from lowbit.kernels._common import LAUNCHES

    before = collections.Counter(LAUNCHES)
    yield
    ran = LAUNCHES - before  # only the launchers that ran in the block
    missing = [n for n in names if not any(ran[alt] for alt in n.split("|"))]
    assert not missing, (f"kernel launcher(s) {missing} did not run (launched: {dict(ran) or 'nothing'}): "
                         "the op took another path, e.g. the pure-torch reference")
    unwanted = [n for n in absent if ran[n]]
    assert not unwanted, f"kernel launcher(s) {unwanted} ran but must not (launched: {dict(ran)})"


@contextlib.contextmanager
def triton_on_cpu(*names: str, absent: tuple[str, ...] = ()):
    """Route lowbit ops on CPU tensors through the Triton kernels (interpreter) and check, with
    expect_launches, that the named launchers ran. Only in interpreter-tier tests (marked interp)."""
    if not names:
        raise TypeError("triton_on_cpu: name the launchers that must run (see expect_launches)")
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels_interpreted():
        pytest.fail("triton_on_cpu() needs the Triton interpreter (TRITON_INTERPRET=1 before lowbit.kernels is "
                    "imported); mark the test `interp` so that it is skipped where the interpreter is off",
                    pytrace=False)
    old = os.environ.get("LOWBIT_CPU_BACKEND")
    os.environ["LOWBIT_CPU_BACKEND"] = "triton"
    try:
        with expect_launches(*names, absent=absent):
            yield
    finally:
        if old is None:
            del os.environ["LOWBIT_CPU_BACKEND"]
        else:
            os.environ["LOWBIT_CPU_BACKEND"] = old
