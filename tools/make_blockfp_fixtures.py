#!/usr/bin/env python3
"""Write tests/data/blockfp/*.safetensors: what the reference implementations of MXFP4 / NVFP4 make of
small weights, so tests/test_blockfp.py can check lowbit.formats.blockfp against them offline.

Needs, in a SCRATCH environment (not the project's .venv; torch is the project's):
    compressed-tensors 0.20.1, transformers 5.25.0, torchao 0.18.0, safetensors
e.g.  python -m venv /tmp/ctvenv && echo "$(.venv/bin/python -c 'import site;print(site.getsitepackages()[0])')" \
        > /tmp/ctvenv/lib/python3.11/site-packages/projvenv.pth && \
      /tmp/ctvenv/bin/pip install --no-deps compressed-tensors==0.20.1 loguru torchao==0.18.0 && \
      /tmp/ctvenv/bin/python tools/make_blockfp_fixtures.py
The versions used are written into each file's metadata; the script refuses other versions.

Files (every tensor on the CPU):
* nvfp4_compressed_tensors.safetensors: an fp32 weight [32, 64] (a zero block, a block of tiny values
  whose E4M3 scale underflows, a row holding the tensor's amax, negative values rounding to -0, a block
  whose scale differs between g * (a / 6) and (g * a) / 6), and
  what compressed-tensors' own code makes of it: the global scale (generate_gparam), the block scales
  (calculate_qparams with that global scale, the NVFP4 preset's weight args), then
  NVFP4PackedCompressor.compress -> weight_packed / weight_scale / weight_global_scale, and its
  dequantizations: NVFP4PackedCompressor.decompress (bfloat16) and `dequantize` in float32.
* mxfp4_gpt_oss.safetensors: gpt-oss-shaped blocks [2, 8, 2, 16] / scales [2, 8, 2] (random codes,
  scale bytes over the whole finite E8M0 range incl. 0 and 254 with codes that stay finite) and
  transformers' convert_moe_packed_tensors(blocks, scales) in float32 and bfloat16 ([E, in, out]).
* mxfp4_torchao.safetensors: an fp32 weight [6, 96] (zero block, subnormal block, values on E2M1
  midpoints, amax just under a power of two, saturating blocks) and torchao's to_mx(...,
  float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR) (the OCP 6.3 rule): E8M0 bytes and packed bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "blockfp"
VERSIONS = {"compressed_tensors": "0.20.1", "transformers": "5.25.0", "torchao": "0.18.0"}


def _versions() -> dict[str, str]:
    import importlib

    got = {}
    for mod, want in VERSIONS.items():
        v = importlib.import_module(mod).__version__
        if v != want:
            sys.exit(f"{mod} {v} is installed; this script is pinned to {want} (edit VERSIONS knowingly)")
        got[mod] = v
    got["torch"] = torch.__version__
    return got


def nvfp4_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(32, 64, generator=g) * 0.05
    w[3, 16:32] = 0.0  # an all-zero block: compressed-tensors' scale becomes 0.125
    w[4, 0:16] = torch.randn(16, generator=g) * 1e-7  # E4M3 scale underflows to 0 -> 0.125, codes 0
    w[5, 48:64] = -torch.rand(16, generator=g) * 1e-4  # negatives that round to -0 (code 8)
    w[7, 5] = 0.9  # the tensor's amax (sets the global scale)
    a = order_sensitive_amax(w)  # row 9, block 0: its E4M3 scale depends on the order of the fp32 ops
    w[9, 1:16] = w[9, 1:16].clamp(-a / 2, a / 2)
    w[9, 0] = a
    return w.contiguous()


def order_sensitive_amax(w: torch.Tensor) -> float:
    """A block amax a < amax(w) whose E4M3 block scale differs between compressed-tensors' order
    e4m3(g * (a / 6)) and e4m3((g * a) / 6), g = 448 * 6 / amax(w): the fixture then pins the order."""
    g = torch.tensor(448.0 * 6.0, dtype=torch.float32) / w.abs().amax()
    fp8 = torch.arange(0x38, 0x60, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()
    for mid in ((fp8[:-1] + fp8[1:]) / 2).tolist():  # E4M3 rounding boundaries in [1, 16)
        a0 = torch.tensor(6.0 * mid, dtype=torch.float32) / g
        for d in range(-64, 65):
            a = (a0.view(torch.int32) + d).view(torch.float32)
            s1 = (g * (a / 6.0)).to(torch.float8_e4m3fn).float()
            s2 = ((g * a) / 6.0).to(torch.float8_e4m3fn).float()
            if s1 != s2:
                return float(a)
    raise RuntimeError("no order-sensitive block amax found")


def make_nvfp4(meta: dict) -> None:
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    args = scheme.weights
    w = nvfp4_weight()
    n, k = w.shape
    gscale = generate_gparam(w.amin(), w.amax())  # float32 [1]
    wb = w.view(n, k // 16, 16)
    scale, zp = calculate_qparams(wb.amin(-1), wb.amax(-1), args, global_scale=gscale)
    sd = {"weight": w.clone(), "weight_scale": scale, "weight_global_scale": gscale, "weight_zero_point": zp}
    comp = NVFP4PackedCompressor.compress(sd, scheme)
    dec_bf16 = NVFP4PackedCompressor.decompress(dict(comp), scheme)["weight"]
    x_q = unpack_fp4_from_uint8(comp["weight_packed"], n, k, dtype=torch.float32)
    dec_f32 = dequantize(x_q=x_q, scale=comp["weight_scale"].float(), args=args,
                         global_scale=comp["weight_global_scale"], dtype=torch.float32)
    tensors = {
        "weight": w,
        "weight_packed": comp["weight_packed"],
        "weight_scale": comp["weight_scale"],
        "weight_global_scale": comp["weight_global_scale"],
        "decompressed_bf16": dec_bf16,
        "dequantized_f32": dec_f32,
    }
    _save(tensors, "nvfp4_compressed_tensors.safetensors", meta)


def make_gpt_oss(meta: dict) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(99)
    e, rows, nb = 2, 8, 2
    blocks = torch.randint(0, 256, (e, rows, nb, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(110, 140, (e, rows, nb), generator=g, dtype=torch.int64).to(torch.uint8)
    scales[0, 0, 0], scales[0, 0, 1], scales[1, 7, 1], scales[1, 6, 0] = 0, 1, 200, 254
    # byte 254 (2^127): keep every code's magnitude <= 1.5 (codes 0..3, 8..11) so nothing overflows fp32
    blocks[1, 6, 0] &= 0xBB
    out_f32 = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    out_bf16 = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    tensors = {"blocks": blocks, "scales": scales, "converted_f32": out_f32.contiguous(),
               "converted_bf16": out_bf16.contiguous()}
    _save(tensors, "mxfp4_gpt_oss.safetensors", meta)


def mxfp4_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 96, generator=g)
    w[0, 32:64] = 0.0  # all-zero block
    w[1, 0:32] = torch.randn(32, generator=g) * 1e-39  # fp32 subnormals only
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0])
    w[2, 0:32] = torch.cat([mids, -mids, mids * 2, -mids * 2])  # amax 10 -> X = 2: ties at both scales
    w[3, 32:64] = torch.linspace(-1, 1, 32) * torch.nextafter(torch.tensor(4.0), torch.tensor(0.0))
    w[4, 64:96] = torch.linspace(-7.9, 7.9, 32)  # amax in [4, 8): values past 6 saturate
    w[5, 0:32] = torch.randn(32, generator=g) * 3e37  # near float32's top
    return w.contiguous()


def make_torchao(meta: dict) -> None:
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    w = mxfp4_weight()
    scale, data = to_mx(w, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    tensors = {"weight": w, "scales": scale.view(torch.uint8).contiguous(),
               "packed": data.view(torch.uint8).contiguous()}
    _save(tensors, "mxfp4_torchao.safetensors", meta)


def _save(tensors: dict, fname: str, meta: dict) -> None:
    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / fname),
              metadata={**meta, "generator": "tools/make_blockfp_fixtures.py"})
    print(f"wrote {OUT / fname}: " + ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in tensors.items()))


def main() -> None:
    meta = _versions()
    make_nvfp4(meta)
    make_gpt_oss(meta)
    make_torchao(meta)


if __name__ == "__main__":
    main()
