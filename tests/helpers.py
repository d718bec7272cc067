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
def expect_calls(*names: str):
    """Fail unless each C fast path in `names` ran inside the block (lowbit._clib.CALLS grew): the CPU-backend
    twin of expect_launches, for tests/test_cpu.py and the families' own CPU tests."""
    from lowbit._clib import CALLS

    before = collections.Counter(CALLS)
    yield
    ran = CALLS - before
    missing = [n for n in names if not ran[n]]
    assert not missing, f"fast CPU path(s) {missing} did not run (ran: {dict(ran) or 'nothing'})"


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


def nf4_oracle_weight(q) -> torch.Tensor:
    """float64 [*q.shape] of a Quant4bit decoded from its bytes as docs/formats.md states them, without
    lowbit's decoders (an oracle for every 4-bit path): byte i holds element 2i in its high nibble and
    2i+1 in its low one; value = code[nibble] * scale of block i // blocksize, the product rounded to
    fp32; a double-quantized scale is nested_code[absmax] * nested_absmax[b // nested_blocksize], rounded
    to fp32, then + offset, rounded to fp32 (bitsandbytes' order)."""
    import numpy as np

    raw = q.codes.detach().cpu().numpy().astype(np.int64)
    nib = np.empty(2 * raw.size, dtype=np.int64)
    nib[0::2], nib[1::2] = raw >> 4, raw & 15
    nib = nib[: q.numel]
    table = q.code.detach().cpu().numpy().astype(np.float32)
    if q.nested_absmax is None:
        scale = q.absmax.detach().cpu().numpy().astype(np.float32)
    else:
        qa = q.absmax.detach().cpu().numpy().astype(np.int64)
        nested = q.nested_absmax.detach().cpu().numpy().astype(np.float32)
        first = q.nested_code.detach().cpu().numpy().astype(np.float32)[qa] * nested[np.arange(qa.size) //
                                                                                     q.nested_blocksize]
        scale = (first.astype(np.float32) + np.float32(q.offset.detach().cpu().item())).astype(np.float32)
    values = (table[nib] * scale[np.arange(q.numel) // q.blocksize]).astype(np.float32)
    return torch.from_numpy(values.astype(np.float64)).view(q.shape)


def int_oracle_weight(q) -> torch.Tensor:
    """float64 [N, K] of a QuantInt decoded from its words as formats/intq.py documents them (format version
    3), vectorized, without lowbit's unpacking: int4 / int2 word t of a row holds codes 8t + i (16t + i) in bits
    4i (2i); int3 rows are quads of 4 chunks of 32 codes (the last quad has K / 32 % 4 chunks when that is not
    0) laid out as r words A, r words B, r words H: chunk j of a quad has code i < 16 in A[j] bits 2i..2i+1 with
    bit 2 from H[j] bit 2i + 1, code 16 + i in B[j] bits 2i..2i+1 with bit 2 from H[j] bit 2i. W = s * (Q - z),
    the product rounded to fp32 (the documented decode)."""
    import numpy as np

    n, k = q.shape
    bits = q.bits
    words = q.codes.detach().cpu().reshape(n, -1).numpy().view(np.uint32).astype(np.int64)
    if bits in (2, 4):
        per = 32 // bits
        shifts = bits * np.arange(per)
        codes = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, k)
    else:
        nch = k // 32
        c = np.arange(nch)
        quad, j = c // 4, c % 4
        r = np.minimum(4, nch - 4 * quad)
        a, b, h = (words[:, 12 * quad + off] for off in (j, r + j, 2 * r + j))  # [n, nch] each
        i = np.arange(16)
        lo = ((a[:, :, None] >> (2 * i)) & 3) | (((h[:, :, None] >> (2 * i + 1)) & 1) << 2)
        hi = ((b[:, :, None] >> (2 * i)) & 3) | (((h[:, :, None] >> (2 * i)) & 1) << 2)
        codes = np.concatenate([lo, hi], axis=2).reshape(n, k)
    length = k if q.group_size is None else q.group_size
    group = np.arange(k) // length  # column -> its group (the last one ragged when length does not divide k)
    z = q.zeros.detach().cpu().reshape(n, -1).numpy().astype(np.int64)[:, group]
    s = q.scale.detach().cpu().float().reshape(n, -1).numpy()[:, group]
    qz = (codes - z).astype(np.float32)
    return torch.from_numpy((qz * s).astype(np.float32).astype(np.float64))


def use_cpu_build(monkeypatch, variant: str) -> None:
    """Route lowbit._cpu's kernels to another build of the same C sources for the rest of the test ("generic":
    the plain-C kernels of CPUs without AVX-512; "no-gfni": AVX-512 without GFNI); "native" keeps the default."""
    if variant == "native":
        return
    from lowbit import _clib

    monkeypatch.setitem(_clib._STATE, "lib", _clib.load(_clib.build(variant)))  # every declared binding set


def smollm2_or_skip():
    """lowbit.smollm2, or a pytest skip naming what is missing (the realmodel tier: the SmolLM2 GGUF package and
    the Lee corpus are installed --no-deps from requirements/realmodel.lock)."""
    from lowbit import smollm2

    try:
        smollm2.gguf_path()
        smollm2.lee_articles()
    except ImportError as e:
        pytest.skip(f"realmodel tier: the SmolLM2 fixture is not installed: {e}")
    return smollm2
