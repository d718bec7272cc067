"""GPU tier (marked gpu; skipped without CUDA, refused under TRITON_INTERPRET=1): the compiled
Triton paths at real sizes on the device. Each test checks by the launch counter that the kernels,
not the pure-torch reference, produced what it compares."""

from __future__ import annotations

import pytest
import torch

import lowbit
from tests.helpers import TOL, TOL_TF32, expect_launches, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize_cuda_bit_identical_to_reference(quant_type, dtype):
    from lowbit.formats import codebooks as codes
    from lowbit.formats import nf4 as reference
    from lowbit._backend import kernels

    K = kernels()

    w = torch.randn(1 << 20 | 7, device="cuda", dtype=dtype)
    code = codes.code_table(quant_type).cuda()
    b, o = codes.quantize_bounds(code)
    p1, a1 = reference.quantize_flat(w, 64, b, o)
    p2, a2 = K.nf4.quantize_4bit(w, 64, b, o)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    with expect_launches("nf4.quantize"):
        q = lowbit.quantize_4bit(w, 64, quant_type, True)
    assert torch.equal(q.codes, p1)
    ref = reference.dequantize_flat(q.codes, q.scales(), q.code, 64, q.numel, dtype)
    with expect_launches("nf4.dequantize"):
        out = lowbit.dequantize_4bit(q)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("m", [1, 4, 16, 100, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_4bit_cuda_against_float64(m, dtype):
    n, k = 1536, 2048
    q = lowbit.quantize_4bit(torch.randn(n, k, device="cuda"), 64, "nf4", True)
    w = lowbit.dequantize_4bit(q, torch.float32).double()
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype)
    # The tuner may pick the dequantize + cuBLAS candidate: any lowbit launch proves the Triton path.
    with expect_launches("nf4.words|nf4.gemv|nf4.dot|nf4.dequantize", "nf4.grad_x|nf4.dequantize"):
        y = lowbit.matmul_4bit(x, q, b)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
    tol = TOL_TF32 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(y, x.double() @ w.t() + b.double()) <= tol
    assert rel_err(gx, gy.double() @ w) <= tol


def test_every_forward_config_on_cuda():
    import lowbit.kernels.nf4 as K

    n, k = 512, 1024
    q = lowbit.quantize_4bit(torch.randn(n, k, device="cuda"), 64, "nf4", True)
    w = lowbit.dequantize_4bit(q, torch.float32).double()
    args, dq = (q.codes, q.absmax, q.code, 64), (q.nested_absmax, q.nested_code, q.offset, 256)
    for bucket, cfgs in K.FORWARD_CONFIGS.items():
        for cfg in cfgs:
            m = min(bucket, 64) if cfg[0] == "dot" else cfg[1]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with expect_launches(f"nf4.{cfg.kind}"):
                y = K.matmul_4bit(x, *args, n, *dq, None, config=cfg)
            assert rel_err(y, x.double() @ w.t()) <= TOL[torch.bfloat16], cfg
    for cfgs in K.GRAD_X_CONFIGS.values():
        for cfg in cfgs:
            g = torch.randn(48, n, device="cuda", dtype=torch.bfloat16)
            with expect_launches("nf4.grad_x"):
                gx = K.matmul_4bit_grad_x(g, *args, k, *dq, config=cfg)
            assert rel_err(gx, g.double() @ w) <= TOL[torch.bfloat16], cfg


def test_linear4bit_module_on_cuda():
    lin = torch.nn.Linear(1024, 512)
    layer = lowbit.Linear4bit.from_linear(lin).cuda().bfloat16()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantized_weight(torch.float32).double().t() + lin.bias.double().cuda()
    with expect_launches("nf4.words|nf4.gemv|nf4.dot|nf4.dequantize"):
        y = layer(x)
    assert rel_err(y, ref) <= TOL[torch.bfloat16]


def test_sz_decode_cuda_bit_identical():
    from lowbit import sz_compress, sz_decompress
    from lowbit.formats.sz import decode_reference

    w = torch.randn(768, 384) * 0.05
    c = sz_compress(w, 1e-3)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        ref = decode_reference(c, dt)
        with expect_launches("sz.decode"):
            got = sz_decompress(c, device="cuda", dtype=dt).cpu()
        assert torch.equal(got, ref)
        if dt == torch.float32:
            assert float((got - w).abs().max()) <= 1e-3


def _decode_step_in_a_cuda_graph(layer, k: int, w64: torch.Tensor, launcher: str) -> None:
    """A bf16 M=1 forward of `layer` captured in a CUDA graph (warm-up on a side stream first; the
    capture must go through `launcher`) and replayed with new inputs, each against float64 W `w64`."""
    static_x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with expect_launches(launcher), torch.cuda.graph(graph), torch.no_grad():
        static_y = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        ref = static_x.double() @ w64.t() + layer.bias.double()
        assert rel_err(static_y, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("split", [1, 8])
def test_words_gemv_on_cuda_and_in_a_cuda_graph(split):
    """The one-launch decode GEMV at a real size (every split reduced by its counter), then a
    Linear4bit decode step captured in a CUDA graph and replayed with new inputs."""
    import lowbit.kernels.nf4 as K

    n, k = 4096 + 96, 4096
    lin = torch.nn.Linear(k, n, device="cuda")
    layer = lowbit.Linear4bit.from_linear(lin).to(torch.bfloat16)
    q = layer.quantized_weight
    w64 = lowbit.dequantize_4bit(q, torch.float32).double()
    cfg = K.MatmulConfig("words", 4, 128, 32, split, 1, 1)
    for m in (1, 3):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with expect_launches("nf4.words"):
            y = K.matmul_4bit(x, q.codes, q.absmax, q.code, 64, n, q.nested_absmax, q.nested_code, q.offset, 256,
                              layer.bias, config=cfg)
        ref = x.double() @ w64.t() + layer.bias.double()
        assert rel_err(y, ref) <= TOL[torch.bfloat16]
    _decode_step_in_a_cuda_graph(layer, k, w64, "nf4.words")


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128), (2, 64)])
@pytest.mark.parametrize("split", [1, 8])
def test_int_words_gemv_on_cuda_and_in_a_cuda_graph(bits, group_size, split):
    """The integer one-launch decode GEMV (packed format-3 codes) at a real size, bf16 and fp16, M = 1
    and 3, every split reduced by its counter; then an IntLinear decode step captured in a CUDA graph
    and replayed with new inputs."""
    import lowbit.kernels.intq as K

    n, k = 4096 + 96, 4096
    layer = lowbit.IntLinear.from_linear(torch.nn.Linear(k, n, device="cuda"), bits=bits, group_size=group_size)
    q = layer.quantized_weight
    w64 = lowbit.dequantize_int(q, torch.float32).double()
    cfg = K.MatmulConfig("words", 4, 128, 0, split, 1, 1)
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 3):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            with expect_launches("intq.words"):
                y = K.matmul_int(x, q.codes, q.scale, q.zeros, bits, q.group_len, n, layer.bias.to(dtype),
                                 config=cfg)
            ref = x.double() @ w64.t() + layer.bias.double()
            assert y.dtype == dtype and rel_err(y, ref) <= TOL[dtype]
    layer = layer.to(torch.bfloat16)
    _decode_step_in_a_cuda_graph(layer, k, layer.dequantized_weight(torch.float32).double(), "intq.words")
