"""Fused 4-bit matmul: kernels (interpreter) and autograd against float64; modules; checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from tests.helpers import TOL, expect_launches, rel_err, triton_on_cpu

interp = pytest.mark.interp  # skipped where TRITON_INTERPRET is off (tests/conftest.py)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ref64(x, q, bias=None):
    w = lowbit.dequantize_4bit(q, torch.float32).double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


# ---------------------------------------------------------------- kernels in the interpreter


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("double_quant,quant_type", [(True, "nf4"), (False, "fp4")])
def test_kernel_forward_and_grad_x(dtype, m, double_quant, quant_type):
    n, k = 72, 256  # N not a multiple of any tile: masked rows
    w = torch.randn(n, k)
    q = lowbit.quantize_4bit(w, 64, quant_type, double_quant)
    x = torch.randn(2, m, k, dtype=dtype, requires_grad=True)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    with triton_on_cpu("nf4.dot", "nf4.grad_x", absent=("nf4.dequantize",)):  # M = 2m rows: the dot kernel
        y = lowbit.matmul_4bit(x, q, bias)
        gy = torch.randn_like(y)
        gx, gb = torch.autograd.grad(y, (x, bias), gy)
    assert y.dtype == dtype and y.shape == (2, m, n)
    assert rel_err(y, _ref64(x, q, bias)) <= TOL[dtype]
    wd = lowbit.dequantize_4bit(q, torch.float32).double()
    assert rel_err(gx, gy.double() @ wd) <= TOL[dtype]
    assert rel_err(gb, gy.double().sum((0, 1))) <= TOL[dtype]


@interp
@pytest.mark.parametrize("blocksize", [32, 128])
def test_kernel_other_blocksizes_and_blocks_wider_than_tiles(blocksize):
    n, k = 40, 512
    q = lowbit.quantize_4bit(torch.randn(n, k), blocksize, "nf4", True)
    x = torch.randn(3, k)
    with triton_on_cpu("nf4.dot", absent=("nf4.dequantize",)):
        y = lowbit.matmul_4bit(x, q)
    assert rel_err(y, _ref64(x, q)) <= TOL[torch.float32]


@interp
def test_k_not_multiple_of_blocksize_is_correct():
    # Rows straddle quantization blocks: the op falls back to the dequantize kernel + matmul, still exact.
    n, k = 17, 100
    q = lowbit.quantize_4bit(torch.randn(n, k), 64, "nf4", True)
    x = torch.randn(4, k)
    with triton_on_cpu("nf4.dequantize", absent=("nf4.gemv", "nf4.dot")):
        y = lowbit.matmul_4bit(x, q)
    assert rel_err(y, _ref64(x, q)) <= TOL[torch.float32]


@interp
def test_every_config_of_the_interpreter_table():
    import lowbit.kernels.nf4 as K

    n, k = 48, 256
    q = lowbit.quantize_4bit(torch.randn(n, k), 64, "nf4", True)
    args = (q.codes, q.absmax, q.code, 64)
    dq = (q.nested_absmax, q.nested_code, q.offset, 256)
    for cfg in K.INTERPRETER_FORWARD:
        m = 1 if cfg.kind in ("gemv", "words") else 20
        x = torch.randn(m, k)
        with expect_launches(f"nf4.{cfg.kind}"):
            y = K.matmul_4bit(x, *args, n, *dq, None, config=cfg)
        assert rel_err(y, _ref64(x, q)) <= TOL[torch.float32], cfg
    for cfg in K.INTERPRETER_GRAD_X:
        g = torch.randn(9, n)
        with expect_launches("nf4.grad_x"):
            gx = K.matmul_4bit_grad_x(g, *args, k, *dq, config=cfg)
        assert rel_err(gx, g.double() @ lowbit.dequantize_4bit(q, torch.float32).double()) <= TOL[torch.float32], cfg


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,split,block_n", [(1, 1, 32), (1, 4, 64), (2, 2, 32), (3, 1, 64), (4, 8, 32)])
@pytest.mark.parametrize("double_quant,blocksize,bias", [(True, 64, True), (False, 32, False), (True, 128, False)])
def test_words_gemv_against_float64(dtype, m, split, block_n, double_quant, blocksize, bias):
    """The one-launch GEMV (int32 words, L1 table gather, counter-reduced split-K): M = 1..4, odd
    N, every split, bias or not; twice in a row (the split counters must reset themselves)."""
    import lowbit.kernels.nf4 as K

    n, k = 70, 256
    q = lowbit.quantize_4bit(torch.randn(n, k), blocksize, "nf4", double_quant)
    b = torch.randn(n, dtype=dtype) if bias else None
    block_k = 64 if blocksize % 64 == 0 and split <= 2 else 32  # two 32-code tiles per step, one scale
    cfg = K.MatmulConfig("words", 4, block_n, block_k, split, 1, 1)
    for _ in range(2):
        x = torch.randn(m, k, dtype=dtype)
        with expect_launches("nf4.words"):
            y = K.matmul_4bit(x, q.codes, q.absmax, q.code, blocksize, n, q.nested_absmax, q.nested_code, q.offset,
                              256, b, config=cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, _ref64(x.float(), q, None if b is None else b.float())) <= TOL[dtype]
    from lowbit.kernels._common import WORKSPACES

    assert all(int(c.abs().sum()) == 0 for _, c in WORKSPACES.values())


@interp
def test_public_decode_path_uses_the_words_gemv():
    layer = lowbit.Linear4bit.from_linear(nn.Linear(256, 40))
    x = torch.randn(1, 256)
    with triton_on_cpu("nf4.words", absent=("nf4.dequantize",)):
        y = layer(x)
    assert rel_err(y, _ref64(x, layer.quantized_weight, layer.bias)) <= TOL[torch.float32]


# ---------------------------------------------------------------- autograd (reference path)


def test_autograd_matches_float64_autograd():
    n, k = 24, 128
    q = lowbit.quantize_4bit(torch.randn(n, k), 64, "nf4", True)
    x = torch.randn(3, 4, k, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(n, requires_grad=True)
    y = lowbit.matmul_4bit(x, q, b)
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), gy)
    w = lowbit.dequantize_4bit(q, torch.float32).double()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = x64 @ w.t() + b64
    gx64, gb64 = torch.autograd.grad(y64, (x64, b64), gy.double())
    assert rel_err(y, y64) <= 1e-6 and rel_err(gx, gx64) <= 1e-6 and rel_err(gb, gb64) <= 1e-6


def test_zero_size_batch():
    q = lowbit.quantize_4bit(torch.randn(16, 64))
    y = lowbit.matmul_4bit(torch.randn(0, 64), q)
    assert y.shape == (0, 16)


@pytest.mark.parametrize("x,match", [
    (torch.randn(3, 65), "last dimension"),
    (torch.ones(3, 64, dtype=torch.int64), "dtype"),
])
def test_matmul_bad_input(x, match):
    q = lowbit.quantize_4bit(torch.randn(16, 64))
    with pytest.raises((ValueError, TypeError), match=match):
        lowbit.matmul_4bit(x, q)


def test_matmul_bad_bias_and_weight():
    q = lowbit.quantize_4bit(torch.randn(16, 64))
    with pytest.raises(ValueError, match="bias"):
        lowbit.matmul_4bit(torch.randn(2, 64), q, torch.randn(15))
    with pytest.raises(ValueError, match="2-D"):
        lowbit.matmul_4bit(torch.randn(2, 64), lowbit.quantize_4bit(torch.randn(1024)))


# ---------------------------------------------------------------- modules


def test_linear4bit_from_linear_and_moves():
    lin = nn.Linear(128, 48)
    layer = lowbit.Linear4bit.from_linear(lin)
    x = torch.randn(5, 128)
    ref = _ref64(x, layer.quantized_weight, lin.bias)
    assert rel_err(layer(x), ref) <= 1e-5
    assert "bits_per_param" in repr(layer)
    codes_before = layer.weight.clone()
    half = copy.deepcopy(layer).half()
    assert half.weight.dtype == torch.uint8 and torch.equal(half.weight, codes_before)
    assert half.weight_absmax.dtype == torch.uint8 and half.weight_nested_absmax.dtype == torch.float32
    assert half.compute_dtype == torch.float16
    y16 = half(x.half())
    assert y16.dtype == torch.float16 and rel_err(y16, ref) <= TOL[torch.float16]
    bf = copy.deepcopy(layer).bfloat16()
    assert bf.compute_dtype == torch.bfloat16 and rel_err(bf(x), ref) <= TOL[torch.bfloat16]
    assert bf(x).dtype == torch.float32  # output follows the input dtype
    assert layer.weight.shape == (48, 64) and layer.weight_absmax.shape == (48, 2)  # row layout


def test_linear4bit_constructor_and_bad_args():
    layer = lowbit.Linear4bit(64, 32, bias=False, quant_type="fp4", blocksize=32, double_quant=False)
    assert layer(torch.randn(2, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="quant_type"):
        lowbit.Linear4bit(64, 32, quant_type="q4")
    with pytest.raises(ValueError, match="in_features"):
        lowbit.Linear4bit(0, 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        lowbit.Linear4bit.from_linear(nn.Conv1d(2, 2, 1))


def test_lora_only_adapters_train():
    base = lowbit.Linear4bit.from_linear(nn.Linear(64, 32))
    lora = lowbit.LoRALinear(base, r=4, alpha=8)
    x = torch.randn(6, 64)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    lora(x).pow(2).sum().backward()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert lora.lora_B.grad is not None and base.bias.grad is None


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def test_qlora_tiny_causal_lm_trains():
    model = _tiny_llama()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    lowbit.replace_linear(model, "nf4", skip=("lm_head",))
    assert sum(isinstance(m, lowbit.Linear4bit) for m in model.modules()) == n_linear - 1
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, lowbit.Linear4bit):
                setattr(mod, cname, lowbit.LoRALinear(child, r=8, alpha=16))
    for p in model.parameters():
        p.requires_grad_(False)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(lora_params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_replace_linear_options_and_errors():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    lowbit.replace_linear(model, "fp4", skip=("2",), blocksize=32)
    assert isinstance(model[0], lowbit.Linear4bit) and type(model[2]) is nn.Linear
    assert model[0].quant_type == "fp4" and model[0].blocksize == 32
    with pytest.raises(ValueError, match="quant_type"):
        lowbit.replace_linear(nn.Sequential(nn.Linear(4, 4)), "nf3")
    with pytest.raises(ValueError, match="unknown options"):
        lowbit.replace_linear(nn.Sequential(nn.Linear(64, 4)), "nf4", group_size=32)


# ---------------------------------------------------------------- checkpoints


def test_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = lowbit.replace_linear(nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)), "optimal")
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(model, path)
    with pytest.raises(FileExistsError):
        lowbit.save_state_dict(model, path)
    fresh = lowbit.replace_linear(nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)), "optimal")
    x = torch.randn(3, 128)
    assert not torch.equal(fresh(x), model(x))
    lowbit.load_state_dict(fresh, path)
    assert torch.equal(fresh(x), model(x))
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


def test_bitsandbytes_state_dict_import_and_export():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.utils import unpack_tensor_to_dict  # noqa: F401  (bnb's reader exists)

    lin = nn.Linear(128, 32)
    w = lin.weight.detach()
    bq, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_sd = {"weight": bq, "bias": lin.bias.detach()}
    bnb_sd.update({f"weight.{k}": v for k, v in st.as_dict(packed=True).items()})
    model = nn.Sequential(nn.Linear(128, 32))
    lowbit.replace_linear(model, "nf4")
    model.load_state_dict({f"0.{k}": v for k, v in bnb_sd.items()})
    x = torch.randn(4, 128)
    theirs = x @ torch.compiler.disable(bnbF.dequantize_4bit)(bq, st).t() + lin.bias
    assert rel_err(model(x), theirs.detach()) <= 1e-6
    # export: bnb parses our keys back into a QuantState and dequantizes to the same weight
    out = lowbit.to_bnb_state_dict(model)
    qs = {k[len("0.weight."):]: v for k, v in out.items() if k.startswith("0.weight.")}
    st2 = bnbF.QuantState.from_dict(qs, device=torch.device("cpu"))
    w2 = torch.compiler.disable(bnbF.dequantize_4bit)(out["0.weight"], st2)
    assert torch.equal(w2, model[0].dequantized_weight())


@pytest.mark.parametrize("quant_type,opts", [("nf4", {}), ("int3", {"group_size": 32}), ("sz", {"error_bound": 1e-3})])
def test_torch_compile_fullgraph_forward(quant_type, opts):
    # Inductor (the default backend) with fullgraph=True: any graph break in a lowbit layer fails.
    torch._dynamo.reset()
    model = lowbit.replace_linear(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), quant_type, **opts)
    x = torch.randn(4, 64)
    compiled = torch.compile(model, fullgraph=True)
    assert rel_err(compiled(x), model(x)) <= 1e-6


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_nf4_matches_bitsandbytes_nf4():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from lowbit.minilm import SENTENCES, embed, load_minilm

    model, tok = load_minilm()
    fp32 = embed(model, tok, SENTENCES)
    bnb_model = copy.deepcopy(model)
    for mod in bnb_model.modules():
        if type(mod) is nn.Linear:
            bq, st = bnbF.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
            mod.weight.data = torch.compiler.disable(bnbF.dequantize_4bit)(bq, st)
    ours = copy.deepcopy(model)
    n = sum(type(m) is nn.Linear for m in ours.modules())
    lowbit.replace_linear(ours, "nf4", skip=())
    assert n == 37 and sum(isinstance(m, lowbit.Linear4bit) for m in ours.modules()) == 37
    e_bnb, e_ours = embed(bnb_model, tok, SENTENCES), embed(ours, tok, SENTENCES)
    cos_pair = torch.nn.functional.cosine_similarity(e_ours, e_bnb)
    cos_fp32 = torch.nn.functional.cosine_similarity(e_ours, fp32)
    print(f"\nMiniLM NF4: cosine to bnb-NF4 min {cos_pair.min():.6f}; to fp32 mean {cos_fp32.mean():.4f}")
    assert float(cos_pair.min()) >= 0.9999
    assert 0.9 < float(cos_fp32.mean()) < 0.9999


def test_replace_linear_int_formats_and_lora_on_top():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    dense = model(x).detach()
    lowbit.replace_linear(model, "int4", skip=(), group_size=32, method="mse")
    assert all(isinstance(model[i], lowbit.IntLinear) for i in (0, 2))
    assert rel_err(model(x), dense) < 0.2  # 4-bit rows: close, not equal
    lora = lowbit.LoRALinear(model[0], r=4)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    with pytest.raises(ValueError, match="unknown options"):
        lowbit.replace_linear(nn.Sequential(nn.Linear(64, 4)), "int3", blocksize=64)


def test_dtype_move_keeps_buffers_on_their_device():
    # .cuda().bfloat16() once left the fp32 scale buffers behind on the CPU (seen on an H100);
    # the meta device reproduces the device change without a GPU.
    layer = lowbit.Linear4bit.from_linear(nn.Linear(128, 32)).to("meta").bfloat16()
    assert {t.device.type for t in layer.buffers()} == {"meta"}
    assert layer.weight_code.dtype == torch.float32 and layer.weight.dtype == torch.uint8
    assert layer.compute_dtype == torch.bfloat16


def test_non_contiguous_input_and_bias_dtype():
    q = lowbit.quantize_4bit(torch.randn(24, 64))
    xt = torch.randn(64, 5).t()  # a transposed view: not contiguous
    assert not xt.is_contiguous()
    assert rel_err(lowbit.matmul_4bit(xt, q), _ref64(xt, q)) <= 1e-6
    b = torch.randn(24, dtype=torch.float64)
    with pytest.raises(TypeError, match="bias"):
        lowbit.matmul_4bit(xt, q, b)


def test_tuner_keys_separate_m_sizes():
    # A config timed at M=512 must not be reused at M=4096 (it was, and ran 4x slower on an H100).
    from lowbit.kernels._common import tune_m

    keys = [tune_m(m) for m in (1, 2, 3, 16, 17, 512, 4096, 10**6)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(tune_m(m) >= m for m in range(1, 8193, 37))


@interp
def test_kernels_take_a_strided_code_table_and_odd_byte_offsets():
    """A Quant4bit whose code table is a strided view, or whose codes start at an odd byte, is
    valid: every launcher must give the float64 answer (the words GEMV read past a strided table
    and could not view odd-offset codes as int32)."""
    import lowbit.kernels.nf4 as K

    n, k = 40, 256
    q = lowbit.quantize_4bit(torch.randn(n, k), 64, "nf4", True)
    strided = torch.zeros(32)
    strided[::2] = q.code
    table = strided[::2]
    assert not table.is_contiguous()
    buf = torch.zeros(q.codes.numel() + 1, dtype=torch.uint8)
    buf[1:] = q.codes
    odd = buf[1:]
    x = torch.randn(1, k)
    ref = _ref64(x, q)
    for cfg in (K.MatmulConfig("words", 1, 32, 32, 2, 1, 1), K.INTERPRETER_FORWARD[1]):
        for codes, code in ((q.codes, table), (odd, q.code)):
            y = K.matmul_4bit(x, codes, q.absmax, code, 64, n, q.nested_absmax, q.nested_code, q.offset, 256, None,
                              config=cfg)
            assert rel_err(y, ref) <= TOL[torch.float32], cfg
    w = K.dequantize_4bit(q.codes, q.absmax, table, 64, n * k, torch.float32, q.nested_absmax, q.nested_code,
                          q.offset, 256)
    assert torch.equal(w.view(n, k), lowbit.dequantize_4bit(q, torch.float32))


@interp
@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (32, True), (128, True)])
def test_every_config_at_blocks_narrower_and_wider_than_the_tile(blocksize, double_quant):
    """Every interpreter config at blocksize 32 (BLOCK_K 64 and 128 tiles hold several quantization blocks:
    the kernels' per-column scale branch, which a GPU runs for fp32 x at M=1, blocksize 32) and 128 (a block
    spans several tiles), fp32 x, against the bytes decoded in float64 (not lowbit's decoder). K = 256 gives
    every config at least two K steps. A gemv that left the odd columns of that branch unscaled passed the
    blocksize-64 table test (error 0.46 here)."""
    import lowbit.kernels.nf4 as K
    from tests.helpers import nf4_oracle_weight

    n, k = 40, 256
    q = lowbit.quantize_4bit(torch.randn(n, k), blocksize, "nf4", double_quant)
    w64 = nf4_oracle_weight(q)
    args = (q.codes, q.absmax, q.code, blocksize)
    dq = (q.nested_absmax, q.nested_code, q.offset, 256)
    ran = []
    for cfg in K.INTERPRETER_FORWARD:
        m = 1 if cfg.kind in ("gemv", "words") else 20
        if not K._fits_forward(cfg, m, k, torch.float32, blocksize):
            continue  # (a words step never spans two blocks: it is refused at blocksize 32 with BLOCK_K 64)
        x = torch.randn(m, k)
        with expect_launches(f"nf4.{cfg.kind}"):
            y = K.matmul_4bit(x, *args, n, *dq, None, config=cfg)
        assert rel_err(y, x.double() @ w64.t()) <= TOL[torch.float32], cfg
        ran.append(cfg)
    wider = [c for c in ran if c.block_k > blocksize]
    assert blocksize > 64 or {c.kind for c in wider} == {"gemv", "dot"}  # the branch ran for both kernels
    for cfg in K.INTERPRETER_GRAD_X:
        g = torch.randn(9, n)
        with expect_launches("nf4.grad_x"):
            gx = K.matmul_4bit_grad_x(g, *args, k, *dq, config=cfg)
        assert rel_err(gx, g.double() @ w64) <= TOL[torch.float32], cfg
