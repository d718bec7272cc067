"""Which implementation runs an op: the Triton kernels or the pure-torch reference.

CUDA tensors go to Triton (when it imports). CPU tensors go to the backend named by
`LOWBIT_CPU_BACKEND`: "fast" (default; lowbit._cpu, which falls back to the reference when it
can not build), "reference" (the pure-torch spec in lowbit.formats), or "triton" (the Triton
kernels under `TRITON_INTERPRET=1`, tests only). Nothing here runs at import time: Triton is
imported on first use.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not triton_available():
        return False
    if t.device.type == "cuda":
        return True
    return (
        t.device.type == "cpu"
        and interpreter_enabled()
        and os.environ.get("LOWBIT_CPU_BACKEND", "fast") == "triton"
    )


def kernels() -> ModuleType:
    """The lowbit.kernels package, every family's kernels imported (imports Triton)."""
    import lowbit.kernels
    from lowbit.kernels._families import families

    families()  # imports every kernels/<family>.py that defines aot_specs()
    return lowbit.kernels
