"""Sub-4-bit integer weights with trainable scales (lowbit.formats.intq, lowbit.nn.IntLinear, lowbit.kernels.intq).

Every numeric check compares against a float64 oracle built here from the documented byte layout
(independent of lowbit's own unpacking), with the METHOD.md tolerances of helpers.TOL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import TOL, expect_launches, rel_err, triton_on_cpu

from lowbit import IntLinear, LoRALinear, QuantInt, dequantize_int, matmul_int, quantize_int
from lowbit.formats.intq import pack_codes

LAYOUTS = [None, 32, 64]  # rows; groups of 32 (a 64-wide kernel tile spans 2 groups); groups of 64


# ----------------------------------------------------------------------------------------------
# float64 oracle from the documented layout
# ----------------------------------------------------------------------------------------------


def decode_q(codes: torch.Tensor, bits: int) -> np.ndarray:
    """int32 [N, K/32, bits] -> int64 codes [N, K], one code at a time from the layout documented in
    lowbit.formats.intq (format version 3), independently of its pack/unpack code."""
    n = codes.shape[0]
    words = codes.cpu().reshape(n, -1).numpy().view(np.uint32).astype(np.int64)
    k = words.shape[1] * 32 // bits
    q = np.zeros((n, k), dtype=np.int64)
    for col in range(k):
        if bits in (2, 4):
            per = 32 // bits
            q[:, col] = (words[:, col // per] >> (bits * (col % per))) & ((1 << bits) - 1)
            continue
        chunk, i = divmod(col, 32)
        quad, j = divmod(chunk, 4)
        r = min(4, k // 32 - 4 * quad)
        a, b, h = 12 * quad + j, 12 * quad + r + j, 12 * quad + 2 * r + j
        if i < 16:
            q[:, col] = ((words[:, a] >> (2 * i)) & 3) | (((words[:, h] >> (2 * i + 1)) & 1) << 2)
        else:
            q[:, col] = ((words[:, b] >> (2 * (i - 16))) & 3) | (((words[:, h] >> (2 * (i - 16))) & 1) << 2)
    return q


def oracle_parts(q: QuantInt):
    """(Q - z) float64 [N, K] and the group length."""
    n, k = q.shape
    length = k if q.group_size is None else q.group_size
    qq = torch.from_numpy(decode_q(q.codes, q.bits)).double()
    z = q.zeros.reshape(n, k // length).double()
    return (qq.view(n, k // length, length) - z[..., None]).view(n, k), length


def oracle_weight(q: QuantInt, scale: torch.Tensor | None = None) -> torch.Tensor:
    n, k = q.shape
    qz, length = oracle_parts(q)
    s = (q.scale if scale is None else scale).double().reshape(n, k // length, 1)
    return (qz.view(n, k // length, length) * s).view(n, k)


def heavy_weight(n: int, k: int) -> torch.Tensor:
    w = torch.randn(n, k)
    w[torch.rand(n, k) < 0.02] *= 8.0  # outliers: clipping matters
    return w


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN / 0xAB-filled tensors while the test runs: unwritten outputs show up."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(0x2B)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


# ----------------------------------------------------------------------------------------------
# format
# ----------------------------------------------------------------------------------------------


def test_pack_layout_known_words():
    # int2: Q[i] = i % 4 -> crumbs 0,1,2,3 repeating from bit 0: 0b11100100 per byte.
    q = (torch.arange(32) % 4).view(1, 32)
    assert pack_codes(q, 2).view(-1).numpy().view(np.uint32).tolist() == [0xE4E4E4E4, 0xE4E4E4E4]
    # int4: Q[i] = i % 16 -> nibbles 0..7, then 8..15, lowest first.
    q = (torch.arange(32) % 16).view(1, 32)
    assert pack_codes(q, 4).view(-1).numpy().view(np.uint32).tolist() == [0x76543210, 0xFEDCBA98] * 2
    # int3, one chunk (a short quad, r = 1: words A, B, H): code 0 = 7, code 16 = 5, code 31 = 6.
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 0], q[0, 16], q[0, 31] = 7, 5, 6
    a, b, h = pack_codes(q, 3).view(-1).numpy().view(np.uint32).tolist()
    assert a == 0b11  # code 0's low bits
    assert b == 0b01 | (0b10 << 30)  # code 16 (low bits 01), code 31 (low bits 10) at bits 30..31
    assert h == (1 << 1) | (1 << 0) | (1 << 30)  # bit 2 of code 0 -> bit 1; code 16 -> bit 0; code 31 -> bit 30
    # int3 full quad: chunk j's words at j, 4 + j, 8 + j
    q = torch.zeros(1, 128, dtype=torch.int64)
    q[0, 32 * 2 + 3] = 4  # chunk 2, code 3: only bit 2 -> H[2] bit 7
    q[0, 32 * 3 + 17] = 3  # chunk 3, code 17: crumb 3 in B[3] bits 2..3
    words = pack_codes(q, 3).view(-1).numpy().view(np.uint32).tolist()
    expect = [0] * 12
    expect[8 + 2] = 1 << 7
    expect[4 + 3] = 3 << 2
    assert words == expect


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [32, 96, 128, 224, 512])
def test_bit_plane_conversion_is_exact_both_ways(bits, k):
    """Format 1-2 checkpoints held bit planes: the conversion to and from them loses nothing."""
    from lowbit.formats.intq import packed_to_planes, planes_to_packed

    q = torch.randint(0, 2**bits, (5, k))
    planes = torch.zeros(5, k // 32, bits, dtype=torch.int64)  # independent bit-plane packing
    for j in range(bits):
        for i in range(32):
            planes[:, :, j] |= ((q.view(5, k // 32, 32)[:, :, i] >> j) & 1) << i
    planes = torch.where(planes >= 2**31, planes - 2**32, planes).to(torch.int32)
    packed = planes_to_packed(planes, bits)
    assert np.array_equal(decode_q(packed, bits), q.numpy())
    assert torch.equal(packed_to_planes(packed, bits), planes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", LAYOUTS)
def test_quantize_rtn_roundtrip(bits, group_size):
    n, k = 24, 128
    w = torch.randn(n, k) * 0.1
    q = quantize_int(w, bits, group_size)
    qq = decode_q(q.codes, bits)
    assert qq.min() >= 0 and qq.max() <= 2**bits - 1
    assert int(q.zeros.max()) <= 2**bits - 1
    length = k if group_size is None else group_size
    wd = oracle_weight(q)
    # rtn with the min-max range: every element is within half a step of its group's scale.
    step = q.scale.double().reshape(n, k // length, 1).expand(n, k // length, length).reshape(n, k)
    assert bool(((w.double() - wd).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all())
    # dequantize_int agrees with the oracle (fp32 product), in the original dtype
    d = dequantize_int(q)
    assert d.dtype == torch.float32 and d.shape == (n, k)
    assert rel_err(d, wd) <= TOL[torch.float32]
    assert dequantize_int(q, torch.float16).dtype == torch.float16


def test_quantize_constant_and_zero_rows_exact():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    w[2] = -1.5
    q = quantize_int(w, 2)
    assert torch.equal(dequantize_int(q), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 64])
def test_mse_never_worse_than_rtn(bits, group_size):
    n, k = 32, 256
    w = heavy_weight(n, k)
    length = k if group_size is None else group_size

    def group_err(q):
        e = (w.double() - dequantize_int(q).double()) ** 2
        return e.view(n, k // length, length).sum(-1)

    e_rtn = group_err(quantize_int(w, bits, group_size, "rtn"))
    e_mse = group_err(quantize_int(w, bits, group_size, "mse"))
    assert bool((e_mse <= e_rtn).all())
    assert float(e_mse.sum()) < float(e_rtn.sum())  # with outliers, clipping must help somewhere


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_bits_per_param_exact(bits, group_size):
    n, k = 16, 256
    q = quantize_int(torch.randn(n, k), bits, group_size)
    length = k if group_size is None else group_size
    codes_bytes = n * k * bits // 8
    assert q.codes.numel() * q.codes.element_size() == codes_bytes
    assert q.nbytes == codes_bytes + (4 + 1) * n * (k // length)
    assert q.bits_per_param == bits + 40 / length


# ----------------------------------------------------------------------------------------------
# reference path vs float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", LAYOUTS)
def test_reference_matmul_vs_float64(dtype, group_size):
    q = quantize_int(torch.randn(48, 128), 3, group_size)
    x = torch.randn(2, 5, 128).to(dtype)
    b = torch.randn(48).to(dtype)
    y = matmul_int(x, q, bias=b)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    ref = x.double() @ oracle_weight(q).t() + b.double()
    assert rel_err(y, ref) <= TOL[dtype]


def _grads_vs_float64(x, q, bias, gy_dtype_tol):
    scale = q.scale.clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    bb = bias.clone().requires_grad_(True)
    y = matmul_int(xx, q, scale, bb)
    gy = torch.randn(y.shape).to(y.dtype)
    y.backward(gy)

    s64 = q.scale.double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    y64 = x64 @ oracle_weight(q, s64).t() + b64
    y64.backward(gy.double())
    assert rel_err(y.detach(), y64.detach()) <= gy_dtype_tol
    assert scale.grad.shape == q.scale.shape and scale.grad.dtype == scale.dtype
    assert rel_err(scale.grad, s64.grad) <= gy_dtype_tol
    assert rel_err(xx.grad, x64.grad) <= gy_dtype_tol
    assert rel_err(bb.grad, b64.grad) <= gy_dtype_tol


@pytest.mark.parametrize("group_size", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_grads_vs_float64(group_size, dtype):
    q = quantize_int(torch.randn(40, 128), 3, group_size)
    _grads_vs_float64(torch.randn(3, 7, 128).to(dtype), q, torch.randn(40).to(dtype), TOL[dtype])


def test_grad_scale_never_divides_by_scale():
    # A zero scale must still get its gradient (dividing y by s would give NaN or 0).
    q = quantize_int(torch.randn(8, 64), 2, 32)
    scale = q.scale.clone()
    scale[0, 0] = 0.0
    scale.requires_grad_(True)
    x = torch.randn(4, 64)
    gy = torch.randn(4, 8)
    matmul_int(x, q, scale).backward(gy)
    qz, _ = oracle_parts(q)
    expect = (gy.double()[:, 0] @ (x.double()[:, :32] @ qz[0, :32]))
    assert torch.isfinite(scale.grad).all()
    assert abs(float(scale.grad[0, 0]) - float(expect)) <= 1e-4 * max(1.0, abs(float(expect)))


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (each test checks, by the launch counter, that its kernels ran)
# ----------------------------------------------------------------------------------------------


STEP = {2: 64, 3: 128, 4: 32}  # codes per row per step of the words GEMV (one 128-bit tile; int3: a quad)


def _fwd(m: int, bits: int = 3, group_size=None) -> str:
    """The interpreter table's choice for M rows: the words GEMV at M = 1 when a group holds whole
    steps, else the gemv; tl.dot tiles for more rows."""
    if m > 1:
        return "intq.dot"
    return "intq.words" if group_size is None or group_size % STEP[bits] == 0 else "intq.gemv"


@pytest.mark.interp
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("group_size", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_forward_fp32(bits, group_size, m, poisoned_empty):
    n, k = 40, 128  # n not a multiple of the 32-wide tile: masked rows
    q = quantize_int(torch.randn(n, k), bits, group_size)
    x, b = torch.randn(m, k), torch.randn(n)
    with triton_on_cpu(_fwd(m, bits, group_size)):
        y = matmul_int(x, q, bias=b)
    ref = x.double() @ oracle_weight(q).t() + b.double()
    assert rel_err(y, ref) <= TOL[torch.float32]


@pytest.mark.interp
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_forward_half(dtype, group_size, m, poisoned_empty):
    n, k = 40, 128
    q = quantize_int(torch.randn(n, k), 3, group_size)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    with triton_on_cpu(_fwd(m, 3, group_size)):
        y = matmul_int(x, q, bias=b)
    assert y.dtype == dtype
    ref = x.double() @ oracle_weight(q).t() + b.double()
    assert rel_err(y, ref) <= TOL[dtype]


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16


# every width x rows/groups, every M, every split, every dtype, each at least twice (not the full product:
# the interpreter runs ~2 s per case)
@pytest.mark.interp
@pytest.mark.parametrize("bits,group_size,m,split,block_n,dtype", [
    (2, None, 1, 2, 64, _BF16), (2, 128, 4, 4, 32, _F32), (2, None, 3, 1, 16, _F16), (2, 128, 1, 1, 32, _BF16),
    (3, None, 1, 4, 32, _BF16), (3, 128, 2, 2, 32, _F16), (3, None, 4, 1, 64, _F32), (3, 128, 1, 2, 16, _BF16),
    (4, None, 1, 1, 32, _F16), (4, 32, 3, 4, 32, _BF16), (4, None, 2, 2, 16, _BF16), (4, 32, 1, 4, 64, _F32),
])
def test_words_gemv_against_float64(bits, group_size, m, split, block_n, dtype):
    """The one-launch integer GEMV (packed words, mantissa-OR decode, counter-reduced split-K):
    M = 1..4, odd N, every split, rows and groups, bias or not; twice in a row (the split counters
    must reset themselves), fresh inputs each time."""
    import lowbit.kernels.intq as K

    n, k = 70, 512
    q = quantize_int(torch.randn(n, k), bits, group_size)
    glen = k if group_size is None else group_size
    cfg = K.MatmulConfig("words", 4, block_n, 0, split, 1, 1)
    for bias in (True, False):
        x = torch.randn(m, k).to(dtype)
        b = torch.randn(n).to(dtype) if bias else None
        with expect_launches("intq.words"):
            y = K.matmul_int(x, q.codes, q.scale, q.zeros, bits, glen, n, b, config=cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        ref = x.double() @ oracle_weight(q).t() + (0 if b is None else b.double())
        assert rel_err(y, ref) <= TOL[dtype]
    from lowbit.kernels._common import WORKSPACES

    assert all(int(c.abs().sum()) == 0 for _, c in WORKSPACES.values() if c.numel() > 1)


@pytest.mark.interp
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("group_size", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_grads_fp32(bits, group_size, m, poisoned_empty):
    q = quantize_int(torch.randn(40, 128), bits, group_size)
    with triton_on_cpu(_fwd(m, bits, group_size), "intq.grad_x", "intq.grad_scale"):
        _grads_vs_float64(torch.randn(m, 128), q, torch.randn(40), TOL[torch.float32])


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_grads_half(dtype, poisoned_empty):
    q = quantize_int(torch.randn(40, 128), 3, 64)
    with triton_on_cpu("intq.dot", "intq.grad_x", "intq.grad_scale"):
        _grads_vs_float64(torch.randn(20, 128).to(dtype), q, torch.randn(40).to(dtype), TOL[dtype])


@pytest.mark.interp
def test_triton_launcher_configs_split_and_per_element(poisoned_empty):
    """Explicit configs: SPLIT_K > 1, a K-tile spanning two groups, a K-tile inside a group."""
    from lowbit.kernels import intq as km

    n, k = 33, 256
    q = quantize_int(torch.randn(n, k), 3, 32)
    x = torch.randn(5, k)
    ref = x.double() @ oracle_weight(q).t()
    C = km.MatmulConfig
    for cfg in [C("dot", 16, 32, 64, 2, 4, 1), C("gemv", 8, 32, 64, 2, 4, 1), C("dot", 16, 16, 32, 4, 4, 1)]:
        with expect_launches(f"intq.{cfg.kind}"):
            y = km.matmul_int(x, q.codes, q.scale, q.zeros, 3, 32, n, None, config=cfg)
        assert rel_err(y, ref) <= TOL[torch.float32], cfg
    g = torch.randn(5, n)
    with expect_launches("intq.grad_x", "intq.grad_scale"):
        gx = km.matmul_int_grad_x(g, q.codes, q.scale, q.zeros, 3, 32, k, config=km.GradXConfig(16, 64, 16, 2, 4, 1))
        gs = km.matmul_int_grad_scale(g, x, q.codes, q.zeros, 3, 32, config=km.GradScaleConfig(16, 32, 16, 4, 1))
    assert rel_err(gx, g.double() @ oracle_weight(q)) <= TOL[torch.float32]
    qz, _ = oracle_parts(q)
    expect = ((g.double().t() @ x.double()) * qz).view(n, k // 32, 32).sum(-1)
    assert rel_err(gs, expect) <= TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# IntLinear
# ----------------------------------------------------------------------------------------------


def test_intlinear_params_buffers_and_repr():
    lin = torch.nn.Linear(128, 24)
    layer = IntLinear.from_linear(lin, bits=3, group_size=64, method="mse")
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["scale"]
    assert layer.scale.shape == (24, 2)
    sd = layer.state_dict()
    assert set(sd) == {"codes", "zeros", "scale", "bias", "_extra_state"}
    assert type(sd["codes"]) is torch.Tensor and sd["codes"].dtype == torch.int32
    assert sd["zeros"].dtype == torch.uint8
    assert "bits=3" in repr(layer) and f"bits_per_param={3 + 40 / 64:.3f}" in repr(layer)
    x = torch.randn(4, 128)
    ref = x.double() @ layer.dequantized_weight().double().t() + lin.bias.double()
    assert rel_err(layer(x), ref) <= TOL[torch.float32]
    d = IntLinear(64, 16, bits=2, bias=False)
    assert d.bias is None and d(torch.randn(3, 64)).shape == (3, 16)


def test_intlinear_finetune_save_load_roundtrip(tmp_path):
    from lowbit.io import load_state_dict, save_state_dict

    layer = IntLinear.from_linear(torch.nn.Linear(128, 32), bits=2, group_size=32)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(16, 128), torch.randn(16, 32)
    before = layer.scale.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    assert not torch.equal(before, layer.scale.detach())
    path = tmp_path / "int.safetensors"
    save_state_dict(layer, path)
    fresh = IntLinear(128, 32, bits=2, group_size=32)
    load_state_dict(fresh, path)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.codes, layer.codes) and torch.equal(fresh.scale, layer.scale)


def test_intlinear_dtype_moves_keep_codes():
    layer = IntLinear.from_linear(torch.nn.Linear(64, 16), bits=4)
    codes = layer.codes.clone()
    x = torch.randn(3, 64)
    y32 = layer(x)
    h = layer.half()
    assert h.codes.dtype == torch.int32 and torch.equal(h.codes, codes) and h.zeros.dtype == torch.uint8
    yh = h(x.half())
    assert yh.dtype == torch.float16
    assert rel_err(yh, y32) <= 1e-2
    f = h.to(torch.float32)
    assert torch.equal(f.codes, codes)


def test_intlinear_under_lora():
    base = IntLinear.from_linear(torch.nn.Linear(64, 16), bits=3)
    x = torch.randn(5, 64)
    y0 = base(x)
    lora = LoRALinear(base, r=4)
    y = lora(x)
    assert torch.equal(y, y0)  # B starts at zero
    y.sum().backward()
    assert lora.lora_B.grad is not None and base.scale.grad is None


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"bits": 5}, ValueError, "bits"),
        ({"bits": 1}, ValueError, "bits"),
        ({"bits": 3.0}, TypeError, "bits"),
        ({"bits": True}, TypeError, "bits"),
        ({"group_size": 48}, ValueError, "group_size"),
        ({"group_size": 16}, ValueError, "group_size"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"group_size": 64.0}, TypeError, "group_size"),
        ({"method": "gptq"}, ValueError, "method"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        quantize_int(torch.randn(4, 96), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="w"):
        quantize_int(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="w"):
        quantize_int([[1.0] * 64])
    with pytest.raises(ValueError, match="empty"):
        quantize_int(torch.empty(0, 64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int(torch.randn(64))
    with pytest.raises(ValueError, match="in_features"):
        quantize_int(torch.randn(4, 40))
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 64)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_int(w)
    q = quantize_int(torch.randn(8, 64), 3, 32)
    with pytest.raises(ValueError, match="scale"):
        matmul_int(torch.randn(2, 64), q, torch.ones(8))
    with pytest.raises(ValueError, match="in_features"):
        matmul_int(torch.randn(2, 32), q)
    with pytest.raises(ValueError, match="bias"):
        matmul_int(torch.randn(2, 64), q, bias=torch.ones(7))
    with pytest.raises(TypeError, match="q"):
        matmul_int(torch.randn(2, 64), "not a weight")
    with pytest.raises(ValueError, match="in_features"):
        IntLinear(40, 8)
    with pytest.raises(TypeError, match="linear"):
        IntLinear.from_linear(torch.nn.Conv1d(1, 1, 1))


# ----------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the compiled kernels at model-like shapes, autotuning on
# ----------------------------------------------------------------------------------------------


GPU_CASES = [(torch.bfloat16, bits, gs, m) for bits in (2, 3, 4) for gs in (None, 128) for m in (1, 200)] + [
    (dt, 3, 32, m) for dt in (torch.float32, torch.float16) for m in (3, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bits, group_size, m", GPU_CASES)
def test_gpu_forward_backward(dtype, bits, group_size, m):
    from tests.helpers import TOL_TF32

    n, k = 320, 512
    q = quantize_int(torch.randn(n, k), bits, group_size).to("cuda")
    x = torch.randn(m, k).to(dtype).cuda()
    bias = torch.randn(n).to(dtype).cuda()
    tol = TOL_TF32 if dtype == torch.float32 else TOL[dtype]
    scale = q.scale.clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    with expect_launches("intq.gemv|intq.dot", "intq.grad_x", "intq.grad_scale"):
        y = matmul_int(xx, q, scale, bias)
        gy = torch.randn(y.shape, device="cuda").to(dtype)
        y.backward(gy)
    qc = QuantInt(q.codes.cpu(), q.scale.cpu(), q.zeros.cpu(), q.shape, q.dtype, q.bits, q.group_size)
    s64 = qc.scale.double().requires_grad_(True)
    x64 = x.cpu().double().requires_grad_(True)
    y64 = x64 @ oracle_weight(qc, s64).t() + bias.cpu().double()
    y64.backward(gy.cpu().double())
    assert rel_err(y.detach().cpu(), y64.detach()) <= tol
    assert rel_err(xx.grad.cpu(), x64.grad) <= tol
    assert rel_err(scale.grad.cpu(), s64.grad) <= tol


def test_an_explicit_config_that_does_not_serve_the_call_is_refused():
    """A words config over more codes than K (or groups shorter than its step) would read past the row
    or mix groups: the launcher raises instead of returning a wrong tensor."""
    import lowbit.kernels.intq as K

    q = quantize_int(torch.randn(8, 128), 3, None)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="does not serve M=1, K=128, int3"):
        K.matmul_int(x, q.codes, q.scale, q.zeros, 3, 128, 8, None, config=K.MatmulConfig("words", 1, 32, 0, 16, 1, 1))
    q = quantize_int(torch.randn(8, 256), 2, 32)
    with pytest.raises(ValueError, match="group_len=32"):
        K.matmul_int(torch.randn(1, 256), q.codes, q.scale, q.zeros, 2, 32, 8, None,
                     config=K.MatmulConfig("words", 1, 32, 0, 1, 1, 1))
