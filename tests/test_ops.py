"""torch.library.opcheck on every lowbit op (schema, fake/meta implementation, autograd
registration, AOT dispatch with dynamic shapes), with fresh random inputs of realistic layouts.

Every op (lowbit._ops.REGISTRY) needs an entry in CASES, or, for an op a family declares in its own
module, in that family's tests/test_<family>_ops.py OPCHECK_CASES: a new op without one fails
test_every_op_has_an_opcheck_case. Each op with a kernel is checked twice: on the reference path,
and (interp tier) routed through its Triton kernel, with the launch counter proving it ran.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import _ops
from lowbit.formats import codebooks
from lowbit.formats import sz as sz_fmt
from tests.helpers import expect_launches, triton_on_cpu


def _w4(n: int, k: int, double_quant: bool, quant_type: str = "nf4"):
    """(codes, absmax, code, blocksize) and (nested_absmax, nested_code, offset, nested_blocksize) of a
    random [n, k] weight, as lowbit.functional passes them to the ops."""
    q = lowbit.quantize_4bit(torch.randn(n, k) * 2, 64, quant_type, double_quant)
    absmax, nabs, ncode, off = q.scale_tensors()
    return q, (q.codes, absmax, q.code, q.blocksize), (nabs, ncode, off, q.nested_blocksize)


def quantize_4bit_cases():
    for dtype in (torch.float32, torch.bfloat16):
        flat = (torch.randn(1001) * 3).to(dtype)  # odd numel, a short last block
        bounds, order = codebooks.quantize_bounds(codebooks.code_table("fp4"))
        yield f"{dtype}", (flat, 64, bounds, order)


def dequantize_4bit_cases():
    for dq, dtype in ((True, torch.float16), (False, torch.float32)):
        q, w, nested = _w4(45, 130, dq)
        yield f"dq={dq}-{dtype}", (*w, q.numel, dtype, *nested)


def matmul_4bit_cases():
    n, k = 40, 128
    for dq, dtype, has_bias in ((True, torch.float32, True), (False, torch.bfloat16, False)):
        _, w, nested = _w4(n, k, dq)
        bias = torch.randn(n).to(dtype) if has_bias else None
        yield f"dq={dq}-{dtype}-bias={has_bias}", (torch.randn(3, k).to(dtype), *w, n, *nested, bias)


def matmul_4bit_grad_x_cases():
    n, k = 40, 128
    for dq, dtype in ((True, torch.float32), (False, torch.float16)):
        _, w, nested = _w4(n, k, dq)
        yield f"dq={dq}-{dtype}", (torch.randn(3, n).to(dtype), *w, k, *nested)


def _qint(n: int, k: int, bits: int, group_size):
    return lowbit.quantize_int(torch.randn(n, k), bits, group_size)


def int_dequantize_cases():
    for bits, gs, dtype in ((3, 32, torch.float32), (2, None, torch.bfloat16)):
        q = _qint(24, 128, bits, gs)
        yield f"int{bits}-g{gs}-{dtype}", (q.codes, q.scale, q.zeros, bits, q.group_len, 24, 128, dtype)


def int_matmul_cases():
    n, k = 40, 128
    for bits, gs, dtype, has_bias in ((3, 32, torch.float32, True), (4, None, torch.float16, False)):
        q = _qint(n, k, bits, gs)
        bias = torch.randn(n).to(dtype) if has_bias else None
        x = torch.randn(3, k).to(dtype)
        yield f"int{bits}-g{gs}-{dtype}-bias={has_bias}", (x, q.codes, q.scale, q.zeros, bits, q.group_len, n, bias)


def int_matmul_grad_x_cases():
    n, k = 40, 128
    for bits, gs, dtype in ((3, 32, torch.float32), (2, None, torch.bfloat16)):
        q = _qint(n, k, bits, gs)
        yield f"int{bits}-g{gs}-{dtype}", (torch.randn(3, n).to(dtype), q.codes, q.scale, q.zeros, bits, q.group_len, k)


def int_matmul_grad_scale_cases():
    n, k = 40, 128
    for bits, gs, dtype in ((3, 64, torch.float32), (4, None, torch.float16)):
        q = _qint(n, k, bits, gs)
        g, x = torch.randn(3, n).to(dtype), torch.randn(3, k).to(dtype)
        yield f"int{bits}-g{gs}-{dtype}", (g, x, q.codes, q.zeros, bits, q.group_len)


def sz_decode_cases():
    w = torch.randn(20, 30) * 0.05
    w.view(-1)[torch.randint(0, w.numel(), (3,))] = 40.0  # outliers
    c = sz_fmt.sz_compress(w, 1e-3, chunk_size=64)
    for dtype in (torch.float32, torch.bfloat16):
        yield f"{dtype}", (*c.decoder_args(), c.numel, c.chunk_size, c.max_len, c.radius, dtype)


def sz_matmul_cases():
    w = torch.randn(24, 64) * 0.05
    w.view(-1)[torch.randint(0, w.numel(), (3,))] = 40.0  # outliers: the GEMV's sparse correction
    c = sz_fmt.sz_compress(w, 1e-3, chunk_size=16)  # chunks of 8 rows, 32 lanes: the fused kernel's layout
    for dtype, has_bias in ((torch.float32, True), (torch.bfloat16, False)):
        bias = torch.randn(24).to(dtype) if has_bias else None
        yield f"{dtype}-bias={has_bias}", (torch.randn(3, 64).to(dtype), *c.decoder_args(), 24, c.chunk_size,
                                           c.max_len, c.radius, bias)


# op name -> (input cases, the launcher that must run when routed to Triton; None: the op has no kernel)
CASES = {
    "quantize_4bit": (quantize_4bit_cases, "nf4.quantize"),
    "dequantize_4bit": (dequantize_4bit_cases, "nf4.dequantize"),
    "matmul_4bit": (matmul_4bit_cases, "nf4.dot"),  # M = 3 rows: the interpreter table's dot kernel
    "matmul_4bit_grad_x": (matmul_4bit_grad_x_cases, "nf4.grad_x"),
    "int_dequantize": (int_dequantize_cases, None),
    "int_matmul": (int_matmul_cases, "intq.dot"),
    "int_matmul_grad_x": (int_matmul_grad_x_cases, "intq.grad_x"),
    "int_matmul_grad_scale": (int_matmul_grad_scale_cases, "intq.grad_scale"),
    "sz_decode": (sz_decode_cases, "sz.decode"),
    "sz_matmul": (sz_matmul_cases, "sz.gemv"),
}


def _family_cases() -> dict:
    """opcheck cases of the ops a family declares in its own module (lowbit._blockfp): each
    tests/test_<family>_ops.py holds them as OPCHECK_CASES, in CASES' form."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("test_*_ops.py")):
        found.update(getattr(importlib.import_module(f"tests.{path.stem}"), "OPCHECK_CASES", {}))
    return found


ALL_CASES = {**CASES, **_family_cases()}
OPS = dict(_ops.REGISTRY)


def test_every_op_has_an_opcheck_case():
    assert set(ALL_CASES) == set(OPS), ("every lowbit Op (lowbit._ops.REGISTRY) needs an opcheck case, here or in "
                                        "its family's tests/test_<family>_ops.py OPCHECK_CASES (and only those)")
    declared = {v for v in vars(_ops).values() if isinstance(v, _ops.Op)}
    assert declared == set(_ops.ALL_OPS), "an Op declared in lowbit._ops is missing from ALL_OPS"
    assert set(_ops.ALL_OPS) <= set(OPS.values())
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("lowbit::")}
    assert registered == {f"lowbit::{name}" for name in OPS}, "a lowbit:: op registered outside lowbit._ops.Op"


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_opcheck_reference(name):
    cases, _ = ALL_CASES[name]
    for _case, args in cases():
        torch.library.opcheck(OPS[name].op, args)


@pytest.mark.interp
@pytest.mark.parametrize("name", sorted(n for n, (_, launcher) in ALL_CASES.items() if launcher is not None))
def test_opcheck_triton(name):
    cases, launcher = ALL_CASES[name]
    _, args = next(iter(cases()))  # the first case only: the interpreter is slow
    with triton_on_cpu(launcher):
        torch.library.opcheck(OPS[name].op, args)


def test_launch_check_fails_when_no_kernel_runs():
    # The guard of the kernel tiers: a block that launches nothing (an op that fell back to the
    # reference) must fail it, and a launcher named in `absent` that runs must too.
    from lowbit.kernels._common import count_launch

    with pytest.raises(AssertionError, match="did not run"):
        with expect_launches("nf4.quantize"):
            lowbit.quantize_4bit(torch.randn(64))  # CPU, not routed: the reference
    with pytest.raises(AssertionError, match="must not"):
        with expect_launches("nf4.dot", absent=("nf4.dequantize",)):
            count_launch("nf4.dot")
            count_launch("nf4.dequantize")
    with expect_launches("nf4.gemv|nf4.dot"):
        count_launch("nf4.dot")
