"""Block floating point: MXFP4 and NVFP4 (lowbit.formats.blockfp): codecs, layout, quantizer, reference
dequantize/matmul, gpt-oss and compressed-tensors import/export.

Oracles are independent of the code under test: the 16 E2M1 values written out, E8M0 = 2.0 ** (e - 127),
E4M3 from its bit fields, nibbles read from the documented layout with numpy, a per-element float64
MXFP4 quantizer, and fixtures made by compressed-tensors, transformers and torchao themselves
(tools/make_blockfp_fixtures.py). Each test's docstring names the bug it catches.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit.formats.blockfp import (
    BLOCK,
    QuantBlockFP,
    dequantize_blockfp,
    e2m1_decode,
    e2m1_encode_rne,
    e4m3_decode,
    e8m0_decode,
    from_compressed_tensors,
    from_gpt_oss,
    matmul_blockfp_reference,
    quantize_blockfp,
    to_compressed_tensors,
    to_gpt_oss,
    validate,
)

DATA = Path(__file__).parent / "data" / "blockfp"
NAN = float("nan")

# ----------------------------------------------------------------------------------------------
# Oracles, written from the formats' definitions (docs/blockfp.md)
# ----------------------------------------------------------------------------------------------

# E2M1, code -> value: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; 0/1 are subnormals.
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e8m0_oracle(byte: int) -> float:
    return NAN if byte == 0xFF else 2.0 ** (byte - 127)


def e4m3_oracle(byte: int) -> float:
    """OFP8 E4M3 (fn): bias 7, no infinities, S.1111.111 is NaN, exponent field 0 is subnormal."""
    sign = -1.0 if byte >> 7 else 1.0
    exp, man = (byte >> 3) & 0b1111, byte & 0b111
    if exp == 0b1111 and man == 0b111:
        return NAN
    if exp == 0:
        return sign * 2.0 ** (1 - 7) * (man / 8.0)
    return sign * 2.0 ** (exp - 7) * (1.0 + man / 8.0)


def codes_from_layout(packed: torch.Tensor) -> np.ndarray:
    """uint8 [N, K/2] -> int codes [N, K]: byte j holds element 2j in bits 0..3, element 2j+1 in bits 4..7."""
    p = packed.cpu().numpy().astype(np.int64)
    c = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int64)
    c[:, 0::2] = p % 16
    c[:, 1::2] = p // 16
    return c


def oracle_weight(q: QuantBlockFP) -> np.ndarray:
    """float32 [N, K] from the layout: e2m1 * 2^(S-127) (exact: float64 then float32), or for nvfp4
    e2m1 * float32(float32(e4m3(S)) / float32(g)) in float32, as compressed-tensors computes it."""
    n, k = q.shape
    b = BLOCK[q.quant_type]
    vals = np.array(E2M1_TABLE, dtype=np.float64)[codes_from_layout(q.packed)]
    s = q.scales.cpu().numpy().astype(np.int64)
    if q.quant_type == "mxfp4":
        f = np.vectorize(e8m0_oracle)(s)
        out = vals * np.repeat(f, b, axis=1)
        with np.errstate(over="ignore"):
            return out.astype(np.float32)
    f = np.vectorize(e4m3_oracle)(s).astype(np.float32) / np.float32(float(q.global_scale))
    with np.errstate(over="ignore", invalid="ignore"):
        return vals.astype(np.float32) * np.repeat(f, b, axis=1).astype(np.float32)


def e2m1_nearest_even(v: float) -> int:
    """Code of the E2M1 value nearest v (ties to the even code), saturating at +-6; sign bit = v < 0."""
    a = abs(v)
    mags = E2M1_TABLE[:8]
    if a >= 6.0:
        i = 7
    else:
        d = [abs(a - m) for m in mags]
        best = min(d)
        cands = [j for j in range(8) if d[j] == best]
        i = cands[0] if len(cands) == 1 else next(j for j in cands if j % 2 == 0)
    return i | (8 if v < 0 else 0)


def mxfp4_oracle(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX 6.3 in float64 one block at a time: (E8M0 bytes [N, K/32], codes [N, K])."""
    x = w.double().numpy()
    n, k = x.shape
    scales = np.zeros((n, k // 32), dtype=np.int64)
    codes = np.zeros((n, k), dtype=np.int64)
    for r in range(n):
        for g in range(k // 32):
            blk = x[r, 32 * g: 32 * g + 32]
            amax = float(np.abs(blk).max())
            shared = -127 if amax == 0 else max(math.frexp(amax)[1] - 1 - 2, -127)
            scales[r, g] = shared + 127
            for i, v in enumerate(blk):
                codes[r, 32 * g + i] = e2m1_nearest_even(float(v) / 2.0**shared)
    return scales, codes


def make_q(quant_type: str, codes: np.ndarray, scales, g: float | None = None) -> QuantBlockFP:
    """A QuantBlockFP packed by hand from codes [N, K] (low nibble first) and scale bytes."""
    c = torch.as_tensor(codes, dtype=torch.int64)
    packed = (c[:, 0::2] + 16 * c[:, 1::2]).to(torch.uint8)
    gs = None if g is None else torch.tensor(g, dtype=torch.float32)
    return QuantBlockFP(quant_type, tuple(c.shape), packed, torch.as_tensor(scales, dtype=torch.uint8), gs)


# ----------------------------------------------------------------------------------------------
# Scalar codecs
# ----------------------------------------------------------------------------------------------


def test_e2m1_decode_every_code():
    """Catches a wrong E2M1 code map (bitsandbytes' fp4 table, 3.0 and 4.0 swapped, a sign on bit 0)."""
    got = e2m1_decode(torch.arange(16)).tolist()
    assert got == E2M1_TABLE
    assert [math.copysign(1, v) for v in got] == [math.copysign(1, v) for v in E2M1_TABLE]


def test_e8m0_decode_every_byte():
    """Catches a bias off by one, 2^-127 (an fp32 subnormal) flushed to 0, and 0xFF decoded as a number."""
    got = e8m0_decode(torch.arange(256, dtype=torch.int64).to(torch.uint8)).double()
    for b in range(255):
        assert got[b].item() == e8m0_oracle(b), b
    assert math.isnan(got[255].item())


def test_e4m3_decode_every_byte():
    """Catches a wrong subnormal rule (implicit 1 or exponent -7 at exponent field 0), a missed NaN code
    (0x7F/0xFF) or 0x7E not being 448; checked by hand bit fields and against torch's float8_e4m3fn."""
    bytes_ = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    got = e4m3_decode(bytes_).double()
    via_torch = bytes_.view(torch.float8_e4m3fn).double()
    for b in range(256):
        want = e4m3_oracle(b)
        if math.isnan(want):
            assert b in (0x7F, 0xFF) and math.isnan(got[b].item()) and math.isnan(via_torch[b].item())
        else:
            assert got[b].item() == want == via_torch[b].item(), hex(b)
    assert got[0x01].item() == 2.0**-9 and got[0x07].item() == 7 / 8 * 2.0**-6 and got[0x08].item() == 2.0**-6
    assert got[0x7E].item() == 448.0 and got[0x38].item() == 1.0 and got[0xFE].item() == -448.0


def test_e2m1_encode_ties_go_to_even_both_signs():
    """Catches round-half-up / half-away-from-zero (0.25 -> 0.5, 1.25 -> 1.5, 2.5 -> 3, 5 -> 6) and a
    tie rule applied to the value instead of the code (0.75 -> 0.5)."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the neighbour with mantissa bit 0
    x = torch.tensor(mids + [-m for m in mids])
    got = e2m1_decode(e2m1_encode_rne(x)).tolist()
    assert got == want + [-v for v in want]


def test_e2m1_encode_nearest_off_ties_and_sign_of_zero():
    """Catches truncation or a wrong bucket edge: a hair above a midpoint goes up, a hair below goes down;
    a negative value rounding to 0 keeps its sign bit (code 8, as compressed-tensors and ModelOpt pack it)."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up, down = torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)
    levels = E2M1_TABLE[:8]
    assert e2m1_decode(e2m1_encode_rne(up)).tolist() == levels[1:]
    assert e2m1_decode(e2m1_encode_rne(down)).tolist() == levels[:-1]
    assert e2m1_encode_rne(torch.tensor([-0.1, -0.0, 0.0, 0.1])).tolist() == [8, 0, 0, 0]


def test_e2m1_encode_saturates():
    """Catches a missing clamp: 7.99 or inf must become +-6 (code 7 / 15), not spill into the sign bit."""
    x = torch.tensor([6.0, 6.5, 7.99, 1e30, float("inf"), -6.5, -float("inf")])
    assert e2m1_encode_rne(x).tolist() == [7, 7, 7, 7, 7, 15, 15]
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode_rne(torch.tensor([1.0, NAN]))


# ----------------------------------------------------------------------------------------------
# Layout and dequantization
# ----------------------------------------------------------------------------------------------


def test_nibble_order_hand_built_byte():
    """Catches swapped nibbles (bitsandbytes' high-nibble-first): byte 0x21 is [code 1, code 2] = [0.5, 1.0]."""
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = 0x21
    q = QuantBlockFP("mxfp4", (1, 32), packed, torch.tensor([[128]], dtype=torch.uint8))  # s = 2
    assert dequantize_blockfp(q)[0, :3].tolist() == [1.0, 2.0, 0.0]
    q = QuantBlockFP("nvfp4", (1, 32), packed, torch.tensor([[0x40, 0x40]], dtype=torch.uint8),  # e4m3 2.0
                     torch.tensor(0.5))  # factor 2.0 / 0.5 = 4
    assert dequantize_blockfp(q)[0, :3].tolist() == [2.0, 4.0, 0.0]


def test_mxfp4_every_code_times_every_scale_byte():
    """Catches any wrong (code, E8M0 byte) product, including 2^-128 subnormal results and fp32 overflow
    at bytes 253/254, and rows/blocks read from the wrong place (row r has scale byte r)."""
    codes = np.tile(np.arange(16), (255, 2))  # [255, 32]
    q = make_q("mxfp4", codes, np.arange(255).reshape(255, 1))
    got = dequantize_blockfp(q).numpy()
    want = oracle_weight(q)
    assert np.array_equal(got, want)
    assert np.isinf(got[254, 4]) and got[0, 1] == 2.0**-128  # 2 * 2^127 overflows; 0.5 * 2^-127 does not


@pytest.mark.parametrize("g", [0.25, 3.0, 2986.6667])
def test_nvfp4_every_code_times_every_scale_byte(g):
    """Catches the global scale multiplied instead of divided, a factor computed as e4m3 * (1 / g) (a
    different rounding for g = 3), and E4M3 subnormal scales decoded wrongly."""
    codes = np.tile(np.arange(16), (0x7F, 1))  # [127, 16], row r has scale byte r (0x00..0x7E)
    q = make_q("nvfp4", codes, np.arange(0x7F).reshape(0x7F, 1), g)
    got = dequantize_blockfp(q).numpy()
    assert np.array_equal(got, oracle_weight(q))
    assert got[0x38, 2] == np.float32(1.0) / np.float32(g)  # code 2 (1.0) * e4m3 0x38 (1.0) / g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_dtype(dtype):
    """Catches rounding to the output dtype before the scale is applied (an fp16 intermediate)."""
    torch.manual_seed(0)
    q = quantize_blockfp(torch.randn(3, 64), "nvfp4")
    assert torch.equal(dequantize_blockfp(q, dtype), torch.from_numpy(oracle_weight(q)).to(dtype))


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def test_mxfp4_quantize_ties_through_the_scale():
    """Catches round-half-up in the quantizer: amax 5 gives X = 2^(2-2) = 1, so the block's midpoints are
    exact ties; each must go to the even neighbour, both signs."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = mids + [-m for m in mids] + [0.0] * 18
    q = quantize_blockfp(torch.tensor([row]), "mxfp4")
    assert q.scales.tolist() == [[127]]
    assert dequantize_blockfp(q)[0, :14].tolist() == want + [-v for v in want]


def test_mxfp4_saturates_past_six():
    """Catches a missing clamp after scaling: amax 7.9 gives X = 1 and 7.9 -> 6, not 8 (no such code)."""
    w = torch.linspace(-7.9, 7.9, 32)[None]
    q = quantize_blockfp(w, "mxfp4")
    d = dequantize_blockfp(q)[0]
    assert q.scales.tolist() == [[127]] and d[0].item() == -6.0 and d[-1].item() == 6.0


@pytest.mark.parametrize("amax,byte", [
    (4.0, 127), (float(np.nextafter(np.float32(4.0), np.float32(0))), 126), (7.99, 127), (1.0, 125),
    (float(np.nextafter(np.float32(2.0**20), np.float32(0))), 127 + 19 - 2),
    (float(np.nextafter(np.float32(2.0**-20), np.float32(0))), 127 - 21 - 2),
    (2.0**-124, 1), (2.0**-125, 0), (1e-39, 0), (float(np.finfo(np.float32).max), 252), (3e-45, 0)])
def test_mxfp4_shared_exponent_is_exact_floor_log2(amax, byte):
    """Catches floor(log2(amax)) taken from a rounded float log2 (fp32 log2 of the float just below 2^20
    is 20.0, not 19.99...),
    the emax_elem offset missing, and no clamp at E8M0's 2^-127 (subnormal and tiny amax)."""
    w = torch.zeros(1, 32)
    w[0, 3] = amax
    q = quantize_blockfp(w, "mxfp4")
    assert q.scales.tolist() == [[byte]]
    assert dequantize_blockfp(q)[0, 3].item() <= amax * (1 + 1e-6) or amax < 2.0**-125


@pytest.mark.parametrize("shape", [(7, 96), (1, 32), (3, 64), (5, 160)])
def test_mxfp4_quantize_matches_float64_oracle(shape):
    """Catches a block misassigned (rows vs columns, a block of 16), a scale from the wrong block and any
    element rounding error, on shapes with several blocks and odd row counts and blocks of very different
    magnitude (2^-130 .. 2^100)."""
    torch.manual_seed(shape[0] * 1000 + shape[1])
    n, k = shape
    w = torch.randn(n, k) * torch.exp2(torch.randint(-130, 100, (n, k // 32, 1)).float()).repeat_interleave(32, 1)[..., 0]
    w = w.reshape(n, k)
    q = quantize_blockfp(w, "mxfp4")
    validate(q)
    scales, codes = mxfp4_oracle(w)
    assert np.array_equal(q.scales.numpy(), scales)
    assert np.array_equal(codes_from_layout(q.packed), codes)


def test_all_zero_blocks_and_weight():
    """Catches a division by zero in an all-zero block (NaN codes or a 0xFF scale): mxfp4 takes E8M0 byte 0
    (2^-127), nvfp4 compressed-tensors' 0.125 (E4M3 0x20); an all-zero nvfp4 weight gets global scale 1."""
    w = torch.randn(3, 64)
    w[1, 32:] = 0.0
    qm = quantize_blockfp(w, "mxfp4")
    assert qm.scales[1, 1].item() == 0 and torch.equal(dequantize_blockfp(qm)[1, 32:], torch.zeros(32))
    w[1, 16:32] = 0.0
    qn = quantize_blockfp(w, "nvfp4")
    assert qn.scales[1, 1:].tolist() == [0x20, 0x20, 0x20] and float(e4m3_decode(torch.tensor([0x20]))) == 0.125
    assert torch.equal(dequantize_blockfp(qn)[1, 16:], torch.zeros(48))
    qz = quantize_blockfp(torch.zeros(2, 32), "nvfp4")
    assert float(qz.global_scale) == 1.0 and torch.equal(dequantize_blockfp(qz), torch.zeros(2, 32))


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), NAN])
def test_nonfinite_weight_refused(quant_type, bad):
    """Catches a NaN/inf weight quantized silently (its block scale would poison the block)."""
    w = torch.randn(2, 32)
    w[1, 7] = bad
    with pytest.raises(ValueError, match=r"^w contains NaN or Inf"):
        quantize_blockfp(w, quant_type)


@pytest.mark.parametrize("quant_type,k", [("mxfp4", 100), ("mxfp4", 48), ("nvfp4", 24)])
def test_in_features_not_a_multiple_of_the_block_refused(quant_type, k):
    """Catches a ragged last block packed silently (or a reshape error instead of a message)."""
    with pytest.raises(ValueError, match=f"in_features={k} is not a multiple of {quant_type}'s block of {BLOCK[quant_type]}"):
        quantize_blockfp(torch.randn(2, k), quant_type)


def test_quantize_argument_checks():
    """Catches bad arguments reaching the arithmetic (1-D weights, integer weights, unknown or non-str types)."""
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_blockfp(torch.randn(64), "mxfp4")
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_blockfp(torch.ones(2, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_blockfp(torch.randn(2, 32), "fp4")
    with pytest.raises(TypeError, match="quant_type must be a str"):
        quantize_blockfp(torch.randn(2, 32), 4)


def test_nvfp4_from_bf16_weight_equals_fp32_path():
    """Catches arithmetic in the weight's dtype (a bf16 global scale or bf16 quotient): the quantizer works
    on w.float()."""
    torch.manual_seed(3)
    w = torch.randn(4, 64).bfloat16()
    a, b = quantize_blockfp(w, "nvfp4"), quantize_blockfp(w.float(), "nvfp4")
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales) and torch.equal(a.global_scale, b.global_scale)


# ----------------------------------------------------------------------------------------------
# Against the reference implementations (fixtures made by tools/make_blockfp_fixtures.py)
# ----------------------------------------------------------------------------------------------


def test_nvfp4_matches_compressed_tensors():
    """Catches any difference from compressed-tensors 0.20.1: import + dequantize must equal its own
    dequantize (fp32) and decompress (bf16) exactly, and quantizing its input weight must give its bytes
    (global scale 448*6/amax as a divisor, e4m3 RNE block scales, 0 -> 0.125, RNE codes, -0 codes)."""
    d = load_file(DATA / "nvfp4_compressed_tensors.safetensors")
    q = from_compressed_tensors(d["weight_packed"], d["weight_scale"], d["weight_global_scale"], name="layer")
    assert torch.equal(dequantize_blockfp(q), d["dequantized_f32"])
    assert torch.equal(dequantize_blockfp(q, torch.bfloat16), d["decompressed_bf16"])
    mine = quantize_blockfp(d["weight"], "nvfp4")
    assert torch.equal(mine.packed, d["weight_packed"])
    assert torch.equal(mine.scales, d["weight_scale"].view(torch.uint8))
    assert torch.equal(mine.global_scale.reshape(1), d["weight_global_scale"])
    assert (codes_from_layout(mine.packed) == 8).any()  # the fixture does exercise -0
    # ...and a block (row 9, block 0) whose scale tells compressed-tensors' g * (amax_b / 6) from (g * amax_b) / 6
    g, a = d["weight_global_scale"][0], d["weight"][9, :16].abs().max()
    assert (g * (a / 6)).to(torch.float8_e4m3fn).float() != ((g * a) / 6).to(torch.float8_e4m3fn).float()


def test_mxfp4_matches_gpt_oss_converter():
    """Catches a gpt-oss layout misread (scales without the 127 bias, blocks transposed, nibbles swapped):
    import + dequantize equals transformers' convert_moe_packed_tensors (fp32 and bf16), per expert."""
    d = load_file(DATA / "mxfp4_gpt_oss.safetensors")
    for e in range(d["blocks"].shape[0]):
        q = from_gpt_oss(d["blocks"][e], d["scales"][e], name=f"experts.gate_up_proj[{e}]")
        assert torch.equal(dequantize_blockfp(q), d["converted_f32"][e].t())
        assert torch.equal(dequantize_blockfp(q, torch.bfloat16), d["converted_bf16"][e].t())


def test_mxfp4_quantizer_matches_torchao_floor():
    """Catches an OCP 6.3 deviation in the quantizer, against torchao 0.18's to_mx(FLOOR). One block is
    excluded from the packed bytes: torchao 0.18 divides a block whose scale byte is 0 by 2^-126, not by
    2^-127 ("scale_fp32 = torch.clamp(scale_fp32, min=F32_MIN_NORMAL)"), so its codes for that block do
    not match its own stored scale; the float64 oracle checks ours there."""
    d = load_file(DATA / "mxfp4_torchao.safetensors")
    q = quantize_blockfp(d["weight"], "mxfp4")
    assert torch.equal(q.scales, d["scales"])
    mask = torch.ones_like(q.packed, dtype=torch.bool)
    mask[1, :16] = False  # row 1, block 0: fp32 subnormal inputs, scale byte 0
    assert torch.equal(q.packed[mask], d["packed"][mask])
    scales, codes = mxfp4_oracle(d["weight"])
    assert np.array_equal(codes_from_layout(q.packed), codes) and np.array_equal(q.scales.numpy(), scales)


# ----------------------------------------------------------------------------------------------
# Import / export
# ----------------------------------------------------------------------------------------------


def test_export_import_round_trip_is_byte_identical():
    """Catches an export that renames, reshapes wrongly, converts a dtype or re-quantizes, and an import
    that does not read it back to the same bytes."""
    torch.manual_seed(1)
    w = torch.randn(5, 64)
    qm = quantize_blockfp(w, "mxfp4")
    go = to_gpt_oss(qm)
    assert set(go) == {"blocks", "scales"}
    assert (go["blocks"].dtype, tuple(go["blocks"].shape)) == (torch.uint8, (5, 2, 16))
    assert (go["scales"].dtype, tuple(go["scales"].shape)) == (torch.uint8, (5, 2))
    back = from_gpt_oss(go["blocks"].clone(), go["scales"].clone(), name="p")
    assert torch.equal(back.packed, qm.packed) and torch.equal(back.scales, qm.scales) and back.shape == (5, 64)

    qn = quantize_blockfp(w, "nvfp4")
    ct = to_compressed_tensors(qn)
    assert set(ct) == {"weight_packed", "weight_scale", "weight_global_scale"}
    assert (ct["weight_packed"].dtype, tuple(ct["weight_packed"].shape)) == (torch.uint8, (5, 32))
    assert (ct["weight_scale"].dtype, tuple(ct["weight_scale"].shape)) == (torch.float8_e4m3fn, (5, 4))
    assert (ct["weight_global_scale"].dtype, tuple(ct["weight_global_scale"].shape)) == (torch.float32, (1,))
    back = from_compressed_tensors(*(ct[k].clone() for k in ("weight_packed", "weight_scale", "weight_global_scale")),
                                   name="m")
    assert torch.equal(back.packed, qn.packed) and torch.equal(back.scales, qn.scales)
    assert torch.equal(back.global_scale, qn.global_scale) and back.global_scale.dim() == 0
    with pytest.raises(ValueError, match="mxfp4 only"):
        to_gpt_oss(qn)
    with pytest.raises(ValueError, match="nvfp4 only"):
        to_compressed_tensors(qm)


def _gpt_oss_ok():
    return torch.zeros(4, 2, 16, dtype=torch.uint8), torch.full((4, 2), 127, dtype=torch.uint8)


def _bad_gpt_oss(case):
    b, s = _gpt_oss_ok()
    if case == "scale shape":
        s = s[:, :1]
    elif case == "blocks dtype":
        b = b.to(torch.int8)
    elif case == "scales dtype":
        s = s.float()
    elif case == "nan scale":
        s[2, 1] = 0xFF
    elif case == "expert dim":
        b, s = b[None], s[None]
    elif case == "block width":
        b = torch.zeros(4, 2, 15, dtype=torch.uint8)
    elif case == "overflow":
        s[3, 0], b[3, 0, 5] = 254, 0x06  # code 6 (4.0) * 2^127 = 2^129
    return b, s


GPT_OSS_BAD = [
    ("scale shape", ValueError, r"^L_scales must be \[out, in/32\] = \[4, 2\]"),
    ("blocks dtype", TypeError, r"^L_blocks must be uint8, got torch.int8"),
    ("scales dtype", TypeError, r"^L_scales must be uint8, got torch.float32"),
    ("nan scale", ValueError, r"^L_scales holds the E8M0 NaN code 0xFF \(first at \[2, 1\]\)"),
    ("expert dim", ValueError, r"^L_blocks must be \[out, in/32, 16\].*one expert at a time"),
    ("block width", ValueError, r"^L_blocks must be \[out, in/32, 16\]"),
    ("overflow", ValueError, r"^L_scales: block \[3, 0\] \(scale byte 0xFE.*beyond float32")]


@pytest.mark.parametrize("case,exc,msg", GPT_OSS_BAD, ids=[c[0] for c in GPT_OSS_BAD])
def test_from_gpt_oss_refuses_bad_input(case, exc, msg):
    """Catches malformed gpt-oss tensors accepted (wrong shapes or dtypes, the E8M0 NaN code, a block that
    decodes to inf) or refused with a message that does not say which tensor and why."""
    b, s = _bad_gpt_oss(case)
    with pytest.raises(exc, match=msg):
        from_gpt_oss(b, s, name="L")


def test_from_gpt_oss_accepts_the_largest_finite_block():
    """Catches an overflow check that is too strict: byte 254 (2^127) with codes up to 1.5 is finite."""
    b, s = _gpt_oss_ok()
    s[3, 0], b[3, 0, :] = 254, 0x3B  # codes 11 (-1.5) and 3 (1.5)
    d = dequantize_blockfp(from_gpt_oss(b, s, name="L"))
    assert d[3, 0].item() == -1.5 * 2.0**127 and d[3, 1].item() == 1.5 * 2.0**127


def _ct_ok():
    return (torch.zeros(4, 16, dtype=torch.uint8), torch.full((4, 2), 1.0).to(torch.float8_e4m3fn),
            torch.tensor([2.0]))


def _bad_ct(case):
    p, s, g = _ct_ok()
    sb = s.view(torch.uint8)
    if case == "scale shape":
        s = s[:, :1]
    elif case == "scale dtype":
        s = s.float()
    elif case == "packed dtype":
        p = p.to(torch.int8)
    elif case == "odd packed width":
        p = torch.zeros(4, 7, dtype=torch.uint8)
    elif case == "nan scale":
        sb[1, 1] = 0x7F
    elif case == "negative scale":
        sb[0, 0] = 0xB8  # -1.0
    elif case == "global shape":
        g = torch.tensor([2.0, 2.0])
    elif case == "global dtype":
        g = g.half()
    elif case in ("global 0", "global inf", "global nan", "global negative"):
        g = torch.tensor([{"global 0": 0.0, "global inf": float("inf"), "global nan": NAN, "global negative": -1.0}[case]])
    elif case == "overflow":
        p[0, 0], sb[0, 0], g = 0x07, 0x7E, torch.tensor([2e-36])  # factor 448 / 2e-36 is finite, 6x it is not
    return p, s, g


CT_BAD = [
    ("scale shape", ValueError, r"weight_scale must be \[out, in/16\] = \[4, 2\]"),
    ("scale dtype", TypeError, r"weight_scale must be float8_e4m3fn, got torch.float32"),
    ("packed dtype", TypeError, r"weight_packed must be uint8"),
    ("odd packed width", ValueError, r"weight_packed: in_features = 2 \* 7 = 14 is not a multiple of nvfp4's block of 16"),
    ("nan scale", ValueError, r"weight_scale holds an E4M3 NaN code \(0x7F/0xFF, first at \[1, 1\]\)"),
    ("negative scale", ValueError, r"weight_scale holds a negative E4M3 block scale"),
    ("global shape", ValueError, r"weight_global_scale must be \[1\]"),
    ("global dtype", TypeError, r"weight_global_scale must be float32, got torch.float16"),
    ("global 0", ValueError, r"weight_global_scale must be a positive finite fp32 divisor .*got 0.0"),
    ("global inf", ValueError, r"weight_global_scale must be a positive finite fp32 divisor .*got inf"),
    ("global nan", ValueError, r"weight_global_scale must be a positive finite fp32 divisor .*got nan"),
    ("global negative", ValueError, r"weight_global_scale must be a positive finite fp32 divisor .*got -1.0"),
    ("overflow", ValueError, r"weight_scale / model.mlp.weight_global_scale: block \[0, 0\].*beyond float32")]


@pytest.mark.parametrize("case,exc,msg", CT_BAD, ids=[c[0] for c in CT_BAD])
def test_from_compressed_tensors_refuses_bad_input(case, exc, msg):
    """Catches malformed compressed-tensors tensors accepted (shapes, dtypes, E4M3 NaN or negative block
    scales, a global scale that is 0/inf/NaN/negative, values that decode to inf) or refused with a
    message that does not say which tensor and why."""
    p, s, g = _bad_ct(case)
    with pytest.raises(exc, match="^model.mlp." + msg):
        from_compressed_tensors(p, s, g, name="model.mlp")


def test_from_compressed_tensors_keeps_bytes_and_accepts_0d_global():
    """Catches an import that re-quantizes or converts: the stored bytes are the input bytes."""
    p, s, g = _ct_ok()
    p[1, 3] = 0x9F
    q = from_compressed_tensors(p, s, g.reshape(()), name="m")
    assert torch.equal(q.packed, p) and torch.equal(q.scale_fp8.view(torch.uint8), s.view(torch.uint8))
    assert q.scale_fp8.dtype == torch.float8_e4m3fn and float(q.global_scale) == 2.0


# ----------------------------------------------------------------------------------------------
# The format object, validate, matmul
# ----------------------------------------------------------------------------------------------


def test_bits_per_param_and_nbytes():
    """Catches storage accounting that forgets the scales or the global scale."""
    w = torch.randn(8, 64)
    qm, qn = quantize_blockfp(w, "mxfp4"), quantize_blockfp(w, "nvfp4")
    assert qm.bits_per_param() == 4.25 and qm.nbytes == 8 * 32 + 8 * 2
    assert qn.bits_per_param() == 4.5 + 32 / 512 and qn.nbytes == 8 * 32 + 8 * 4 + 4


def _corrupt(q: QuantBlockFP, case: str) -> QuantBlockFP:
    f = {"quant_type": q.quant_type, "shape": q.shape, "packed": q.packed, "scales": q.scales, "global_scale": q.global_scale}
    if case == "packed shape":
        f["packed"] = q.packed[:, :-1]
    elif case == "scales dtype":
        f["scales"] = q.scales.float()
    elif case == "shape not a multiple":
        f["shape"] = (q.shape[0], q.shape[1] - 2)
    elif case == "unknown type":
        f["quant_type"] = "fp4"
    elif case == "mxfp4 with global":
        f["global_scale"] = torch.tensor(1.0)
    elif case == "nvfp4 without global":
        f["quant_type"], f["scales"], f["global_scale"] = "nvfp4", torch.full((q.shape[0], q.shape[1] // 16), 0x38, dtype=torch.uint8), None
    elif case == "nan scale":
        f["scales"] = q.scales.clone()
        f["scales"][0, 0] = 0xFF
    return QuantBlockFP(**f)


@pytest.mark.parametrize("case", ["packed shape", "scales dtype", "shape not a multiple", "unknown type",
                                  "mxfp4 with global", "nvfp4 without global", "nan scale"])
def test_validate_refuses_inconsistent_objects(case):
    """Catches a validate that lets a half-built or inconsistent QuantBlockFP through to a kernel."""
    q = quantize_blockfp(torch.randn(3, 64), "mxfp4")
    validate(q)
    with pytest.raises((ValueError, TypeError), match="layer"):
        validate(_corrupt(q, case), "layer")


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_reference(quant_type, dtype):
    """Catches a matmul that transposes W, drops the bias, loses leading dims or does not accumulate in fp32."""
    torch.manual_seed(5)
    q = quantize_blockfp(torch.randn(7, 96), quant_type)
    x = torch.randn(2, 3, 96).to(dtype)
    bias = torch.randn(7)
    y = matmul_blockfp_reference(x, q, bias)
    w = torch.from_numpy(oracle_weight(q)).double()
    want = (x.double() @ w.t() + bias.double()).to(dtype)
    assert y.dtype == dtype and y.shape == (2, 3, 7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(y.double(), want.double(), rtol=tol, atol=tol * float(want.abs().max()))
    with pytest.raises(ValueError, match="in_features=96"):
        matmul_blockfp_reference(torch.randn(2, 64), q)


def test_scale_fp8_view_and_to():
    """Catches scale_fp8 copying or converting the bytes, and .to() dropping the global scale."""
    qn = quantize_blockfp(torch.randn(2, 32), "nvfp4")
    assert qn.scale_fp8.data_ptr() == qn.scales.data_ptr()
    moved = qn.to("cpu")
    assert torch.equal(moved.global_scale, qn.global_scale) and moved.quant_type == "nvfp4"
    with pytest.raises(ValueError, match="E4M3 view of nvfp4"):
        quantize_blockfp(torch.randn(2, 32), "mxfp4").scale_fp8


# ----------------------------------------------------------------------------------------------
# scale_search: each block's scale byte by least squared error among the standard one and neighbours
# ----------------------------------------------------------------------------------------------

SEARCH_NEIGHBOURS = {"mxfp4": (0, 1), "nvfp4": (-1, 0, 1, 2)}  # written out here, not read from the module


def _block_error64(wblock: np.ndarray, factor: np.float32) -> float:
    """Squared error of one block quantized with `factor`: the fp32 quotient, E2M1 nearest-even (the
    oracle above), decoded in float64."""
    codes = [e2m1_nearest_even(float(np.float32(v) / factor)) for v in wblock]
    deq = np.array([E2M1_TABLE[c] for c in codes], dtype=np.float64) * np.float64(factor)
    return float(np.square(deq - wblock.astype(np.float64)).sum())


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_scale_search_takes_the_least_error_neighbour(quant_type):
    # Catches: a search that keeps the standard byte, picks the worst candidate, looks beyond the documented
    # neighbours, moves the nvfp4 global scale, or breaks ties away from the standard byte.
    b = BLOCK[quant_type]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(12, b * 4, generator=g) * (torch.rand(12, 1, generator=g) * 4 + 0.01)
    w[0, :b] = 0.0  # all-zero block: every candidate is exact, the standard byte stays
    w[1, 5] = 40.0  # an outlier block
    std = quantize_blockfp(w, quant_type)
    got = quantize_blockfp(w, quant_type, scale_search=True)
    if quant_type == "nvfp4":
        assert torch.equal(got.global_scale, std.global_scale)
    lo, hi = (0, 254) if quant_type == "mxfp4" else (1, 0x7E)
    wn = w.numpy().reshape(12, 4, b)
    s0, s1 = std.scales.numpy().astype(int), got.scales.numpy().astype(int)
    moved = 0
    for r in range(12):
        for j in range(4):
            cands = sorted({min(max(s0[r, j] + o, lo), hi) for o in SEARCH_NEIGHBOURS[quant_type]})
            assert s1[r, j] in cands, (r, j, s0[r, j], s1[r, j])
            if quant_type == "mxfp4":
                fac = {c: np.float32(e8m0_oracle(c)) for c in cands}
            else:
                fac = {c: np.float32(np.float32(e4m3_oracle(c)) / np.float32(float(got.global_scale)))
                       for c in cands}
            err = {c: _block_error64(wn[r, j], fac[c]) for c in cands}
            assert err[s1[r, j]] <= min(err.values()) * (1 + 1e-6), (r, j, err, s1[r, j])
            moved += s1[r, j] != s0[r, j]
    assert s1[0, 0] == s0[0, 0]  # the all-zero block
    assert moved > 0, "the search never moved a byte: it is not searching"
    # and the bytes decode as any decoder reads them: the layout oracle
    w_std, w_got = oracle_weight(std), oracle_weight(got)
    assert np.square(w_got - w.numpy()).sum() < np.square(w_std - w.numpy()).sum()


def test_scale_search_is_a_bool():
    with pytest.raises(TypeError, match="scale_search must be a bool"):
        quantize_blockfp(torch.randn(4, 32), "mxfp4", scale_search=1)
