"""Every quantized layer returns the dtype of its input, whatever dtype it computes in, with the values of
float64 math on the stored weight; LoRALinear adds (alpha / r) * B A x.

The layers compute in `compute_dtype` (set by .half() / .bfloat16() / .float() / .to(dtype)) and cast the
result back to the input's dtype, as bitsandbytes' Linear4bit does. This was checked for Linear4bit only:
an IntLinear that returned its compute dtype (fp16 out for fp32 in after .half()) passed. Here every
layer type, every conversion and every input dtype, at M = 1 (the fused decode paths) and M = 40 (the
dequantize + GEMM paths). Weights are decoded by oracles independent of lowbit's decoders (the nf4 bytes
per docs/formats.md, the int codes per formats/intq.py's layout, the SZ stream by its pure-Python
reference decoder).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from tests.helpers import TOL, int_oracle_weight, nf4_oracle_weight, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYERS = {
    "nf4": lambda lin: lowbit.Linear4bit.from_linear(lin, quant_type="nf4"),
    "fp4-bs32": lambda lin: lowbit.Linear4bit.from_linear(lin, quant_type="fp4", blocksize=32, double_quant=False),
    "int2": lambda lin: lowbit.IntLinear.from_linear(lin, bits=2, group_size=32),
    "int3": lambda lin: lowbit.IntLinear.from_linear(lin, bits=3),
    "int4": lambda lin: lowbit.IntLinear.from_linear(lin, bits=4, group_size=64),
    "sz": lambda lin: lowbit.SZLinear.from_linear(lin, error_bound=1e-2),
}
# conversion -> (what it does, the compute dtype it must leave: None computes in the input's dtype)
CONVERSIONS = {
    "as built": (lambda m: m, None),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "float after half": (lambda m: m.half().float(), torch.float32),
    "to(float16)": (lambda m: m.to(torch.float16), torch.float16),
}


def oracle_weight(layer) -> torch.Tensor:
    """The layer's stored weight in float64, decoded without lowbit's decoders."""
    if isinstance(layer, lowbit.Linear4bit):
        return nf4_oracle_weight(layer.quantized_weight)
    if isinstance(layer, lowbit.IntLinear):
        return int_oracle_weight(layer.quantized_weight)
    from lowbit.formats import sz

    return sz.decode_reference(layer.to_sz(), torch.float32).double()


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("kind", LAYERS)
def test_output_dtype_is_the_input_dtype(kind, conversion):
    lin = nn.Linear(128, 24)
    convert, compute = CONVERSIONS[conversion]
    layer = convert(LAYERS[kind](lin))
    # bitsandbytes' attribute, set by the conversion (a layer left computing in fp32 after .half() would
    # still give fp32-accurate values, so the dtype is checked by name)
    assert layer.compute_dtype == compute
    w64 = oracle_weight(layer)
    b64 = layer.bias.detach().double()
    for x_dtype in DTYPES:
        for m in (1, 40):
            x = torch.randn(2, m, 128).to(x_dtype)
            with torch.no_grad():
                y = layer(x)
            assert y.dtype == x_dtype, (kind, conversion, x_dtype, m, y.dtype)
            assert y.shape == (2, m, 24)
            cd = compute or x_dtype
            ref = x.to(cd).double() @ w64.t() + b64  # x as the layer computes with it
            tol = max(TOL[cd], TOL[x_dtype])
            assert rel_err(y, ref) <= tol, (kind, conversion, x_dtype, m, rel_err(y, ref))


@pytest.mark.parametrize("kind", ["nf4", "int3", "sz"])
def test_gradient_follows_the_input_dtype(kind):
    # Training through a layer converted to half precision with fp32 activations (mixed setups): the input
    # gradient comes back in the input's dtype, with the values of float64 math.
    layer = LAYERS[kind](nn.Linear(64, 16)).half()
    w64 = oracle_weight(layer)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert gx.dtype == torch.float32
    assert rel_err(gx, gy.half().double() @ w64) <= TOL[torch.float16]


@pytest.mark.parametrize("kind", ["nf4", "int4", "sz"])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_lora_linear_adds_the_scaled_update(kind, x_dtype):
    """y = base(x) + (x A^T B^T) * alpha / r, in x's dtype; alpha / r = 3 here (a dropped or inverted
    scaling shows; B starts at zero, so it is given values first)."""
    base = LAYERS[kind](nn.Linear(128, 20))
    lora = lowbit.LoRALinear(copy.deepcopy(base), r=4, alpha=12)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.3)
    x = torch.randn(3, 128).to(x_dtype)
    with torch.no_grad():
        y = lora(x)
    assert y.dtype == x_dtype
    w64 = oracle_weight(base)
    a64, b64 = lora.lora_A.detach().double(), lora.lora_B.detach().double()
    x64 = x.double()
    ref = x64 @ w64.t() + base.bias.detach().double() + (x64 @ a64.t() @ b64.t()) * 3.0
    assert rel_err(y, ref) <= TOL[x_dtype]
    delta = (x64 @ a64.t() @ b64.t()) * 3.0
    assert delta.norm() > 0.3 * ref.norm()  # the update is large enough for a wrong scaling to fail above
