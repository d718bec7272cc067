"""The block-FP4 family's ops (lowbit._blockfp): its scale table, its reference, its autograd Function, and
the opcheck cases tests/test_ops.py runs for its three ops (OPCHECK_CASES).

Oracles: tests/test_blockfp.py's layout decoders (E2M1 table written out, low nibble first, E8M0 as 2^(S-127),
E4M3 from its bit fields) and float64 math; never the op under test. The kernels' own tests:
tests/test_blockfp_kernels.py (Triton, interpreter) and tests/test_blockfp_cpu.py (C).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit import _blockfp as ops
from lowbit import _ops
from lowbit.formats import blockfp as bfp
from lowbit.nn.blockfp import BlockFPLinear
from tests.test_blockfp import e4m3_oracle, e8m0_oracle, oracle_weight


def _q(quant_type: str, n: int, k: int, seed: int = 0) -> bfp.QuantBlockFP:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    return bfp.quantize_blockfp(w, quant_type)


def _args(q: bfp.QuantBlockFP):
    return q.packed, q.scales, bfp.scale_table(q), q.block


# ----------------------------------------------------------------------------------------------
# opcheck cases (run by tests/test_ops.py: reference path, and the Triton kernel under the interpreter)
# ----------------------------------------------------------------------------------------------


def dequantize_cases():
    for qt, dtype in (("nvfp4", torch.float32), ("mxfp4", torch.bfloat16)):
        q = _q(qt, 24, 96)
        yield f"{qt}-{dtype}", (*_args(q), 24, 96, dtype)


def matmul_cases():
    n, k = 40, 128
    for qt, dtype, has_bias in (("nvfp4", torch.float32, True), ("mxfp4", torch.bfloat16, False)):
        q = _q(qt, n, k)
        bias = torch.randn(n).to(dtype) if has_bias else None
        yield f"{qt}-{dtype}-bias={has_bias}", (torch.randn(3, k).to(dtype), *_args(q), n, bias)


def grad_x_cases():
    n, k = 40, 128
    for qt, dtype in (("mxfp4", torch.float32), ("nvfp4", torch.float16)):
        q = _q(qt, n, k)
        yield f"{qt}-{dtype}", (torch.randn(3, n).to(dtype), *_args(q), k)


# op name -> (cases, the launcher that must run when routed to Triton; None: no Triton kernel)
OPCHECK_CASES = {
    "dequantize_blockfp": (dequantize_cases, None),
    "matmul_blockfp": (matmul_cases, "blockfp.words|blockfp.gemv|blockfp.dot"),
    "matmul_blockfp_grad_x": (grad_x_cases, "blockfp.grad_x"),
}


def test_the_family_declares_exactly_its_ops():
    # tests/test_ops.py checks every Op has a case; this pins the three to this family's module
    assert {op.name for op in ops.OPS} == set(OPCHECK_CASES)
    assert all(_ops.REGISTRY[op.name] is op for op in ops.OPS)
    with pytest.raises(ValueError, match="declared twice"):
        _ops.Op("matmul_blockfp", lambda x: x, lambda x: x)


# ----------------------------------------------------------------------------------------------
# The scale table and the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [1.0, 448 * 6 / 3.7, 0.013, 2.0**40])
def test_scale_table_every_byte(g):
    # every byte against the bit-field oracles; nvfp4 divides once in fp32 (compressed-tensors' order)
    t_mx = bfp.scale_table_of("mxfp4", None, torch.device("cpu"))
    t_nv = bfp.scale_table_of("nvfp4", torch.tensor(g), torch.device("cpu"))
    exp_mx = np.array([e8m0_oracle(b) for b in range(256)], dtype=np.float64).astype(np.float32)
    exp_nv = np.array([e4m3_oracle(b) for b in range(256)], dtype=np.float32) / np.float32(g)
    np.testing.assert_array_equal(t_mx.numpy().view(np.int32)[:255], exp_mx.view(np.int32)[:255])
    assert np.isnan(t_mx[255].item())
    ok = ~np.isnan(exp_nv)
    np.testing.assert_array_equal(t_nv.numpy().view(np.int32)[ok], exp_nv.view(np.int32)[ok])
    assert torch.isnan(t_nv[[0x7F, 0xFF]]).all()
    # and scale_table(q): the same values, as a tensor of its own
    q = _q("nvfp4", 4, 32)
    q = bfp.QuantBlockFP("nvfp4", q.shape, q.packed, q.scales, torch.tensor(g))
    assert torch.equal(bfp.scale_table(q).view(torch.int32)[ok], t_nv.view(torch.int32)[ok])


def test_scale_table_follows_the_global_scale():
    # not cached across global scales: a bug returning the first call's table fails here
    a = bfp.scale_table_of("nvfp4", torch.tensor(2.0), torch.device("cpu"))
    b = bfp.scale_table_of("nvfp4", torch.tensor(4.0), torch.device("cpu"))
    assert torch.equal(a[1:0x7F], 2 * b[1:0x7F])


@pytest.mark.parametrize("qt", bfp.QUANT_TYPES)
def test_reference_weight_is_the_layout(qt):
    q = _q(qt, 7, bfp.BLOCK[qt] * 5, seed=3)
    w = ops.reference_weight(*_args(q), 7, bfp.BLOCK[qt] * 5)
    np.testing.assert_array_equal(w.numpy(), oracle_weight(q))


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("qt", bfp.QUANT_TYPES)
def test_ops_against_float64(qt, backend, monkeypatch):
    # forward, grad_x and dequantize of the op on either CPU path, against float64 math on the layout
    monkeypatch.setenv("LOWBIT_CPU_BACKEND", backend)
    n, k = 37, bfp.BLOCK[qt] * 6
    q = _q(qt, n, k, seed=5)
    w64 = torch.from_numpy(oracle_weight(q)).double()
    x, g, bias = torch.randn(5, k), torch.randn(5, n), torch.randn(n)
    y = ops.matmul_blockfp(x, *_args(q), n, bias)
    torch.testing.assert_close(y.double(), x.double() @ w64.t() + bias.double(), rtol=1e-5, atol=1e-4)
    gx = ops.matmul_blockfp_grad_x(g, *_args(q), k)
    torch.testing.assert_close(gx.double(), g.double() @ w64, rtol=1e-5, atol=1e-4)
    assert torch.equal(ops.dequantize_blockfp(*_args(q), n, k, torch.float32), w64.float())


def test_function_gradients_reach_x_and_bias_only():
    q = _q("nvfp4", 24, 64, seed=9)
    w64 = torch.from_numpy(oracle_weight(q)).double()
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    y = ops.matmul_blockfp_unchecked(x, *_args(q), 24, bias)
    assert y.shape == (2, 3, 24)
    gy = torch.randn(2, 3, 24)
    y.backward(gy)
    torch.testing.assert_close(x.grad.double(), gy.double() @ w64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.grad.double(), gy.double().sum((0, 1)), rtol=1e-5, atol=1e-4)
    # without a gradient to compute, the op runs directly, same values
    with torch.no_grad():
        torch.testing.assert_close(ops.matmul_blockfp_unchecked(x, *_args(q), 24, bias), y)


@pytest.mark.parametrize("qt", bfp.QUANT_TYPES)
def test_layer_runs_the_ops(qt, monkeypatch):
    # the layer's forward goes through matmul_blockfp (not a private decode): swap the op and see it called
    lin = torch.nn.Linear(64, 24)
    m = BlockFPLinear.from_linear(lin, quant_type=qt)
    seen = []
    real = ops.matmul_blockfp.impl
    monkeypatch.setattr(ops.matmul_blockfp, "impl", lambda *a: seen.append(a[4]) or real(*a))
    x = torch.randn(4, 64)
    y = m(x)
    assert seen == [bfp.BLOCK[qt]]
    torch.testing.assert_close(y, bfp.matmul_blockfp_reference(x, m.quantized_weight, m.bias), rtol=1e-5, atol=1e-5)
