"""The block floating-point family (MXFP4, NVFP4): format object, byte layout, scalar codecs,
quantizer, pure-torch reference (the spec kernels are checked against) and checkpoint import/export
(gpt-oss `*_blocks`/`*_scales`, compressed-tensors `weight_packed`/`weight_scale`/`weight_global_scale`).
Sources, quotes and the choices made where they are silent: docs/blockfp.md.

Format
------
A weight W [N, K] (N = out_features, K = in_features) is cut along K into blocks of B consecutive
elements of a row: B = 32 (mxfp4) or 16 (nvfp4), K % B == 0 (no ragged block), G = K / B blocks per
row. Every element is an E2M1 code c (4 bits) and every block has one 8-bit scale byte:

    mxfp4:  W[n, k] = e2m1(c[n, k]) * 2^(S[n, g] - 127)                      (S: E8M0 byte, 0..254)
    nvfp4:  W[n, k] = e2m1(c[n, k]) * fp32(e4m3(S[n, g]) / global_scale)     (S: E4M3 byte)

with g = k // B, products and the nvfp4 quotient rounded to fp32 (compressed-tensors' order: the
block scale is divided by the global scale first, then multiplied by the element; the global scale is
a DIVISOR, = 448 * 6 / amax(W) when quantized).

E2M1 code (4 bits)  bit 3 = sign, bits 2..1 = exponent (bias 1), bit 0 = mantissa; no Inf, no NaN:
                    code & 7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6   (0 and 1 are the subnormals 0 and 0.5);
                    code 8 is -0 (decodes to -0.0; the quantizer writes it for x < 0 rounding to 0).
E8M0 byte           2^(byte - 127), byte 0..254 (2^-127 .. 2^127); 0xFF = NaN (refused); no zero.
E4M3 byte           torch.float8_e4m3fn: bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0 mantissa;
                    exponent 0 = subnormal m/8 * 2^-6; 0x7F/0xFF = NaN (refused); max 448. Block scales
                    must be non-negative (0x00..0x7E): the hardware type is the unsigned UE4M3.

Byte layout (row-major, contiguous)
-----------------------------------
packed        uint8 [N, K/2]  byte j of row n = c[n, 2j] | c[n, 2j+1] << 4: element 2j in the LOW
                              nibble (gpt-oss, compressed-tensors, ModelOpt and PTX's e2m1x2 agree;
                              bitsandbytes' fp4 is high-nibble-first with another code map: not
                              compatible, not converted).
scales        uint8 [N, G]    the block scale bytes (E8M0 for mxfp4; E4M3's raw bytes for nvfp4, viewed
                              as float8_e4m3fn by `QuantBlockFP.scale_fp8`).
global_scale  fp32 0-d        nvfp4 only (None for mxfp4: there is nothing to divide by).

bits/param: mxfp4 4 + 8/32 = 4.25; nvfp4 4 + 8/16 + 32/(N K) = 4.5 + 32/numel.

Checkpoint layouts: gpt-oss `<param>_blocks` uint8 [out, K/32, 16] (= packed viewed per block) and
`<param>_scales` uint8 [out, K/32] (= scales, same bytes, bias 127 kept); in the checkpoint these
carry a leading expert dimension, which the caller slices. compressed-tensors `<module>.weight_packed`
uint8 [out, K/2], `.weight_scale` float8_e4m3fn [out, K/16], `.weight_global_scale` float32 [1].
Import never re-quantizes: bytes in = bytes stored = bytes out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validate import (
    check_choice,
    check_dtype,
    check_finite,
    check_float_tensor,
    check_has_values,
    check_matmul_args,
    check_same_device,
    check_tensor,
)

QUANT_TYPES = ("mxfp4", "nvfp4")
BLOCK = {"mxfp4": 32, "nvfp4": 16}

# E2M1: the value of each 4-bit code (index = code), and the midpoints between neighbouring magnitudes.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (4.0): OCP MX's emax_elem
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_MAX = 448.0
E4M3_NAN = (0x7F, 0xFF)
NVFP4_ZERO_SCALE = 0.125  # compressed-tensors' replacement for a block scale that rounds to 0 in E4M3


# ----------------------------------------------------------------------------------------------
# Scalar codecs
# ----------------------------------------------------------------------------------------------


def e2m1_decode(codes: Tensor) -> Tensor:
    """E2M1 codes (ints 0..15, any shape) -> fp32 values (E2M1_VALUES[code])."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def e2m1_encode_rne(x: Tensor) -> Tensor:
    """fp32-representable values -> uint8 E2M1 codes: round to nearest, ties to the even code (mantissa
    bit 0), saturating at +-6 (OCP MX: "clamped to the max normal, preserving the sign"). The sign bit is
    x < 0, so a negative value that rounds to 0 is code 8 (-0), as compressed-tensors and ModelOpt write
    it; -0.0 itself is code 0. NaN has no E2M1 code: ValueError."""
    a = x.float().abs()
    if bool(torch.isnan(a).any()):
        raise ValueError("x contains NaN; E2M1 has no NaN code")
    mid = torch.tensor(E2M1_MIDPOINTS, dtype=torch.float32, device=a.device)
    idx = torch.bucketize(a, mid)  # mid[i-1] < a <= mid[i] -> i: a value on a midpoint takes the lower code
    on_mid = a == mid[idx.clamp(max=len(E2M1_MIDPOINTS) - 1)]
    idx = idx + (on_mid & (idx % 2 == 1)).long()  # ...unless that code is odd: ties go to the even code
    return (idx | ((x < 0).long() << 3)).to(torch.uint8)  # idx <= 7: a > 5 saturates to 6


def e8m0_decode(scale_bytes: Tensor) -> Tensor:
    """E8M0 bytes -> fp32 2^(byte - 127) (2^-127 is an fp32 subnormal, exact); 0xFF -> NaN."""
    e = scale_bytes.to(torch.int32) - E8M0_BIAS
    v = torch.ldexp(torch.ones(e.shape, dtype=torch.float64, device=e.device), e).float()
    return torch.where(scale_bytes.to(torch.int32) == E8M0_NAN, torch.full_like(v, float("nan")), v)


@functools.lru_cache(maxsize=None)
def _e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * (man / 8) * 2.0**-6  # subnormal
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def e4m3_decode(scale_bytes: Tensor) -> Tensor:
    """E4M3 (float8_e4m3fn) bytes -> fp32, from the bit fields (sign, 4-bit exponent bias 7, 3-bit
    mantissa; exponent 0 subnormal; 0x7F/0xFF NaN)."""
    table = torch.tensor([_e4m3_value(b) for b in range(256)], dtype=torch.float32, device=scale_bytes.device)
    return table[scale_bytes.long()]


def pack_e2m1(codes: Tensor) -> Tensor:
    """uint8 codes [..., K] (K even) -> bytes [..., K/2]: element 2j in the low nibble of byte j."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_e2m1(packed: Tensor) -> Tensor:
    """bytes [..., K/2] -> uint8 codes [..., K] (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantBlockFP:
    """A 2-D weight [out, in] in MXFP4 or NVFP4 (layout in the module docstring). Building one checks
    nothing (a layer builds one per forward); `validate` checks it (quantize and the imports call it)."""

    quant_type: str
    shape: tuple[int, int]
    packed: Tensor  # uint8 [out, in/2]
    scales: Tensor  # uint8 [out, in/BLOCK]: E8M0 (mxfp4) or E4M3 bytes (nvfp4)
    global_scale: Optional[Tensor] = None  # fp32 0-d divisor (nvfp4); None (mxfp4)

    @property
    def block(self) -> int:
        return BLOCK[self.quant_type]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_blocks(self) -> int:
        """Blocks per row."""
        return self.in_features // self.block

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Exact storage: packed codes, scale bytes and (nvfp4) the fp32 global scale."""
        ts = (self.packed, self.scales, self.global_scale)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def bits_per_param(self) -> float:
        """mxfp4: 4.25; nvfp4: 4.5 + 32 / numel."""
        return 8.0 * self.nbytes / self.numel

    @property
    def scale_fp8(self) -> Tensor:
        """nvfp4's scale bytes viewed as float8_e4m3fn (no copy)."""
        if self.quant_type != "nvfp4":
            raise ValueError(f"scale_fp8 is the E4M3 view of nvfp4 scales; this is {self.quant_type} (E8M0 bytes)")
        return self.scales.view(torch.float8_e4m3fn)

    def to(self, device) -> "QuantBlockFP":
        g = None if self.global_scale is None else self.global_scale.to(device)
        return QuantBlockFP(self.quant_type, self.shape, self.packed.to(device), self.scales.to(device), g)


def block_scales(q: QuantBlockFP) -> Tensor:
    """fp32 [out, in/BLOCK]: the factor each block's E2M1 values are multiplied by (2^(S-127), or
    fp32(e4m3(S) / global_scale): divided once per block, as compressed-tensors does)."""
    if q.quant_type == "mxfp4":
        return e8m0_decode(q.scales)
    return e4m3_decode(q.scales) / q.global_scale.float()


@functools.lru_cache(maxsize=None)
def _byte_values(quant_type: str, device: torch.device) -> Tensor:
    # the fp32 value of every scale byte before any global scale: E8M0 (mxfp4) or E4M3 (nvfp4), once per device
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return (e8m0_decode(codes) if quant_type == "mxfp4" else e4m3_decode(codes)).to(device)


def scale_table_of(quant_type: str, global_scale: Optional[Tensor], device) -> Tensor:
    """fp32 [256]: the block factor of every scale byte of a `quant_type` weight on `device` (nvfp4: divided by
    `global_scale`, in fp32, as block_scales divides). The kernels (Triton and C) decode a block's scale with one
    lookup in it; a layer's forward calls this, so it costs one 256-element division (nvfp4) or nothing (mxfp4:
    the cached table itself is returned: read it, do not write it). Bytes the format refuses (E8M0 0xFF, E4M3
    0x7F / 0xFF) hold NaN here and never occur in a validated weight."""
    table = _byte_values(quant_type, torch.device(device))
    return table if quant_type == "mxfp4" else table / global_scale.float()


def scale_table(q: QuantBlockFP) -> Tensor:
    """scale_table_of for `q`, a tensor of its own: `block_scales(q) == scale_table(q)[q.scales]` bit for bit."""
    return scale_table_of(q.quant_type, q.global_scale, q.packed.device).clone()


def _check_structure(q: QuantBlockFP, name: str) -> None:
    """Shapes, dtypes and devices (no pass over the values, no host sync)."""
    if not isinstance(q, QuantBlockFP):
        raise TypeError(f"{name} must be a QuantBlockFP, got {type(q).__name__}")
    check_choice(f"{name}.quant_type", q.quant_type, QUANT_TYPES)
    shape = tuple(q.shape)
    if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"{name}.shape must be (out_features, in_features) of positive ints, got {q.shape!r}")
    n, k = shape
    _check_in_features(k, q.quant_type, f"{name}.shape: ")
    for field, t, want in (("packed", q.packed, (n, k // 2)), ("scales", q.scales, (n, k // q.block))):
        check_tensor(f"{name}.{field}", t)
        if t.dtype != torch.uint8 or tuple(t.shape) != want:
            raise ValueError(f"{name}.{field} must be uint8 {list(want)} for shape {shape} ({q.quant_type}), "
                             f"got {t.dtype} {list(t.shape)}")
    if q.quant_type == "mxfp4":
        if q.global_scale is not None:
            raise ValueError(f"{name}.global_scale must be None for mxfp4 (it has no global scale)")
    else:
        check_tensor(f"{name}.global_scale", q.global_scale)
        if q.global_scale.dtype != torch.float32 or q.global_scale.dim() != 0:
            raise ValueError(f"{name}.global_scale must be a 0-d float32 tensor for nvfp4, got "
                             f"{q.global_scale.dtype} {list(q.global_scale.shape)}")
    check_same_device(packed=q.packed, scales=q.scales, global_scale=q.global_scale)


def validate(q: QuantBlockFP, name: str = "q") -> None:
    """Check a QuantBlockFP fully: structure, no NaN scale code, a positive finite global scale, and
    every value it decodes to finite in fp32. Raises TypeError/ValueError naming `name` and the field."""
    _check_structure(q, name)
    if q.quant_type == "mxfp4":
        _check_e8m0(f"{name}.scales", q.scales)
    else:
        _check_e4m3_scales(f"{name}.scales", q.scales)
        _check_global_scale(f"{name}.global_scale", q.global_scale)
    _check_decodes_finite(q, f"{name}.scales")


def _check_in_features(k: int, quant_type: str, where: str = "") -> None:
    if k % BLOCK[quant_type]:
        raise ValueError(f"{where}in_features={k} is not a multiple of {quant_type}'s block of {BLOCK[quant_type]} "
                         "(every block has exactly that many elements; pad the weight first)")


def _first(mask: Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero()[0]]


def _check_e8m0(label: str, scales: Tensor) -> None:
    bad = scales == E8M0_NAN
    if bool(bad.any()):
        raise ValueError(f"{label} holds the E8M0 NaN code 0xFF (first at {_first(bad)}); "
                         "MXFP4 block scales must be 0x00..0xFE")


def _check_e4m3_scales(label: str, scale_bytes: Tensor) -> None:
    nan = (scale_bytes == E4M3_NAN[0]) | (scale_bytes == E4M3_NAN[1])
    if bool(nan.any()):
        raise ValueError(f"{label} holds an E4M3 NaN code (0x7F/0xFF, first at {_first(nan)})")
    neg = scale_bytes >= 0x80
    if bool(neg.any()):
        raise ValueError(f"{label} holds a negative E4M3 block scale (sign bit set, first at {_first(neg)}); "
                         "NVFP4 block scales are non-negative (UE4M3 on the hardware)")


def _check_global_scale(label: str, g: Tensor) -> None:
    v = float(g.reshape(()))
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"{label} must be a positive finite fp32 divisor (448 * 6 / amax(W)), got {v}")


def _check_decodes_finite(q: QuantBlockFP, label: str) -> None:
    """Refuse a tensor that decodes to +-inf or NaN in fp32. Only blocks whose largest possible value
    (6 * block scale) overflows are decoded to check (none in anything a quantizer writes)."""
    f = block_scales(q)
    suspect = ~torch.isfinite(f * E2M1_MAX)
    if not bool(suspect.any()):
        return
    rows, blocks = suspect.nonzero(as_tuple=True)
    codes = unpack_e2m1(q.packed).view(q.out_features, q.n_blocks, q.block)[rows, blocks]
    ok = torch.isfinite(e2m1_decode(codes) * f[rows, blocks, None]).all(-1)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        r, b = int(rows[i]), int(blocks[i])
        raise ValueError(f"{label}: block [{r}, {b}] (scale byte 0x{int(q.scales[r, b]):02X}, factor {float(f[r, b]):g}) "
                         "decodes to values beyond float32 (inf/NaN); refusing it")


# ----------------------------------------------------------------------------------------------
# Quantization (pure torch; the bytes a kernel quantizer must reproduce)
# ----------------------------------------------------------------------------------------------


def _mxfp4_scales(wb: Tensor) -> Tensor:
    """OCP MX 6.3: shared_exp = floor(log2(amax)) - emax_elem per block, clamped to E8M0's [-127, 127]
    (an all-zero block, or amax < 2^-125, takes 2^-127 = byte 0). floor(log2) is read exactly from
    frexp (amax = m 2^e, m in [0.5, 1)), never from a rounded float log2 (fp32 log2 of the float just below
    2^20 is 20.0). Returns the E8M0 bytes."""
    amax = wb.abs().amax(-1)
    _, e = torch.frexp(amax)
    shared = e.long() - 1 - E2M1_EMAX
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    return (shared + E8M0_BIAS).to(torch.uint8)


def _nvfp4_scales(wb: Tensor) -> tuple[Tensor, Tensor]:
    """compressed-tensors' NVFP4 (generate_gparam + calculate_qparams), in fp32:
    global = 448 * 6 / max(amax(W), fp32 tiny), 1.0 where that is not finite (an all-zero W);
    block  = e4m3(min(global * (amax_b / 6), 448)) rounded to nearest even, 0 replaced by 0.125.
    Returns (E4M3 bytes [N, G], global scale fp32 0-d)."""
    amax = wb.abs().amax()
    g = (E4M3_MAX * E2M1_MAX) / amax.clamp(min=torch.finfo(torch.float32).tiny)
    g = torch.where(torch.isfinite(g), g, torch.ones_like(g))
    s = (g * (wb.abs().amax(-1) / E2M1_MAX)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, NVFP4_ZERO_SCALE), s)
    return s.to(torch.float8_e4m3fn).view(torch.uint8).contiguous(), g.reshape(()).contiguous()


# scale_search: the scale bytes tried around the standard rule's byte b0 (each block keeps the one whose
# decoded block has the least squared error). mxfp4: b0 (OCP's floor, amax / scale in [4, 8): the top of a
# block above 6 saturates) and b0 + 1 (amax / scale in [2, 4): nothing saturates, half the grid unused).
# nvfp4: the E4M3 neighbours of compressed-tensors' rounded scale.
SCALE_SEARCH_OFFSETS = {"mxfp4": (0, 1), "nvfp4": (0, -1, 1, 2)}  # 0 first: ties keep the standard byte
_SEARCH_CHUNK = 1 << 24  # candidate elements decoded at once (rows are processed in chunks of this size)


def _search_scales(wb: Tensor, scales: Tensor, quant_type: str, g: Optional[Tensor]) -> Tensor:
    """Per block, the scale byte among b0 + SCALE_SEARCH_OFFSETS whose E2M1 round trip has the least
    squared error (ties: the first offset, i.e. the standard rule's byte). Bytes stay in the format's
    valid range (E8M0 0..254; E4M3 1..0x7E, non-negative and never 0, whose factor would be 0)."""
    lo, hi = (0, 254) if quant_type == "mxfp4" else (1, 0x7E)
    offsets = torch.tensor(SCALE_SEARCH_OFFSETS[quant_type], dtype=torch.int32, device=wb.device)
    out = torch.empty_like(scales)
    rows = max(1, _SEARCH_CHUNK // max(1, wb[0].numel() * len(offsets)))
    for r0 in range(0, wb.shape[0], rows):
        w = wb[r0:r0 + rows]
        cand = (scales[r0:r0 + rows].to(torch.int32)[..., None] + offsets).clamp(lo, hi).to(torch.uint8)  # [r,G,C]
        factor = e8m0_decode(cand) if quant_type == "mxfp4" else e4m3_decode(cand) / g
        deq = e2m1_decode(e2m1_encode_rne(w[..., None, :] / factor[..., None])) * factor[..., None]
        err = (deq - w[..., None, :]).square().sum(-1)  # [r, G, C]
        out[r0:r0 + rows] = cand.gather(-1, err.argmin(-1, keepdim=True)).squeeze(-1)
    return out


def quantize_blockfp(w: Tensor, quant_type: str, *, scale_search: bool = False) -> QuantBlockFP:
    """Quantize a 2-D float weight [out, in] (in a multiple of BLOCK[quant_type]) to mxfp4 or nvfp4.
    Works in fp32 on w.float(); element codes are round-to-nearest-even of w / block factor (an exact
    power of two for mxfp4; compressed-tensors' fp32 quotient for nvfp4), saturating at +-6.

    scale_search=False: the standard scale rules (OCP MX's floor for mxfp4, compressed-tensors' for nvfp4:
    the same bytes those libraries write). True: each block's scale byte is chosen among the standard one
    and its neighbours (SCALE_SEARCH_OFFSETS) by the least squared error of the block; the bytes are the
    same format, read by every MXFP4 / NVFP4 decoder (docs/blockfp.md: what it gains on SmolLM2)."""
    check_float_tensor("w", w)
    check_has_values("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not isinstance(quant_type, str):
        raise TypeError(f"quant_type must be a str, got {type(quant_type).__name__}")
    check_choice("quant_type", quant_type, QUANT_TYPES)
    n, k = w.shape
    _check_in_features(k, quant_type)
    check_finite("w", w)
    wb = w.detach().float().reshape(n, k // BLOCK[quant_type], BLOCK[quant_type])
    if not isinstance(scale_search, bool):
        raise TypeError(f"scale_search must be a bool, got {type(scale_search).__name__}")
    scales, g = (_mxfp4_scales(wb), None) if quant_type == "mxfp4" else _nvfp4_scales(wb)
    if scale_search:
        scales = _search_scales(wb, scales, quant_type, g)
    factor = e8m0_decode(scales) if quant_type == "mxfp4" else e4m3_decode(scales) / g
    codes = e2m1_encode_rne(wb / factor[..., None]).reshape(n, k)
    q = QuantBlockFP(quant_type, (n, k), pack_e2m1(codes), scales, g)
    _check_decodes_finite(q, f"w (as {quant_type})")  # only w's near float32's limit can fail (nvfp4)
    return q


# ----------------------------------------------------------------------------------------------
# Reference implementations (any device; the spec every kernel is checked against)
# ----------------------------------------------------------------------------------------------


def dequantize_blockfp(q: QuantBlockFP, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [out, in]: e2m1(code) * block factor in fp32 (exact for mxfp4; compressed-tensors' arithmetic
    for nvfp4), then rounded to `dtype`."""
    _check_structure(q, "q")
    check_dtype("dtype", dtype)
    n, k = q.shape
    values = e2m1_decode(unpack_e2m1(q.packed)).view(n, q.n_blocks, q.block)
    return (values * block_scales(q)[..., None]).reshape(n, k).to(dtype)


def matmul_blockfp_reference(x: Tensor, q: QuantBlockFP, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T + bias, fp32 math on the dequantized W, returned in x's dtype (x [..., in])."""
    _check_structure(q, "q")
    bias = check_matmul_args(x, q.out_features, q.in_features, bias)
    check_same_device(x=x, q=q.packed, bias=bias)
    y = x.reshape(-1, q.in_features).float() @ dequantize_blockfp(q).t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], q.out_features).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Checkpoint import / export (bytes unchanged; inputs fully checked before anything is built)
# ----------------------------------------------------------------------------------------------


def _check_uint8(label: str, t) -> Tensor:
    check_tensor(label, t)
    if t.dtype != torch.uint8:
        raise TypeError(f"{label} must be uint8, got {t.dtype}")
    return t


def from_gpt_oss(blocks: Tensor, scales: Tensor, *, name: str) -> QuantBlockFP:
    """MXFP4 from gpt-oss tensors `<name>_blocks` uint8 [out, in/32, 16] and `<name>_scales` uint8
    [out, in/32] (one expert: slice the checkpoint's leading expert dimension first)."""
    lb, ls = f"{name}_blocks", f"{name}_scales"
    _check_uint8(lb, blocks)
    _check_uint8(ls, scales)
    if blocks.dim() != 3 or blocks.shape[-1] != 16 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        hint = " (one expert at a time: pass blocks[e], scales[e])" if blocks.dim() == 4 else ""
        raise ValueError(f"{lb} must be [out, in/32, 16] (16 bytes = one block of 32 codes){hint}, "
                         f"got {list(blocks.shape)}")
    n, nb = blocks.shape[:2]
    if tuple(scales.shape) != (n, nb):
        raise ValueError(f"{ls} must be [out, in/32] = {[n, nb]} to match {lb} {list(blocks.shape)}, "
                         f"got {list(scales.shape)}")
    check_same_device(**{lb: blocks, ls: scales})
    _check_e8m0(ls, scales)
    q = QuantBlockFP("mxfp4", (n, nb * 32), blocks.reshape(n, nb * 16).contiguous(), scales.contiguous(), None)
    _check_decodes_finite(q, ls)
    return q


def to_gpt_oss(q: QuantBlockFP) -> dict[str, Tensor]:
    """{"blocks": uint8 [out, in/32, 16], "scales": uint8 [out, in/32]} (views of q's bytes), saved by
    gpt-oss as `<param>_blocks` / `<param>_scales` (stack experts along a new leading dimension)."""
    _check_structure(q, "q")
    if q.quant_type != "mxfp4":
        raise ValueError(f"gpt-oss stores mxfp4 only; q is {q.quant_type}")
    return {"blocks": q.packed.view(q.out_features, q.n_blocks, 16), "scales": q.scales}


def from_compressed_tensors(weight_packed: Tensor, weight_scale: Tensor, weight_global_scale: Tensor, *,
                            name: str) -> QuantBlockFP:
    """NVFP4 from compressed-tensors' `<name>.weight_packed` uint8 [out, in/2], `<name>.weight_scale`
    float8_e4m3fn [out, in/16] and `<name>.weight_global_scale` float32 [1] (the divisor)."""
    lp, ls, lg = (f"{name}.{t}" for t in ("weight_packed", "weight_scale", "weight_global_scale"))
    _check_uint8(lp, weight_packed)
    check_tensor(ls, weight_scale)
    check_tensor(lg, weight_global_scale)
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{ls} must be float8_e4m3fn, got {weight_scale.dtype}")
    if weight_global_scale.dtype != torch.float32:
        raise TypeError(f"{lg} must be float32, got {weight_global_scale.dtype}")
    if weight_packed.dim() != 2 or weight_packed.shape[0] == 0 or weight_packed.shape[1] == 0:
        raise ValueError(f"{lp} must be 2-D [out, in/2], got {list(weight_packed.shape)}")
    n, k = weight_packed.shape[0], 2 * weight_packed.shape[1]
    if k % BLOCK["nvfp4"]:
        raise ValueError(f"{lp}: in_features = 2 * {weight_packed.shape[1]} = {k} is not a multiple of "
                         f"nvfp4's block of 16 (the packed width must be a multiple of 8 bytes)")
    if tuple(weight_scale.shape) != (n, k // 16):
        raise ValueError(f"{ls} must be [out, in/16] = {[n, k // 16]} to match {lp} {list(weight_packed.shape)}, "
                         f"got {list(weight_scale.shape)}")
    if tuple(weight_global_scale.shape) not in ((1,), ()):
        raise ValueError(f"{lg} must be [1] (one per tensor), got {list(weight_global_scale.shape)}")
    check_same_device(**{lp: weight_packed, ls: weight_scale, lg: weight_global_scale})
    scale_bytes = weight_scale.contiguous().view(torch.uint8)
    _check_e4m3_scales(ls, scale_bytes)
    _check_global_scale(lg, weight_global_scale)
    q = QuantBlockFP("nvfp4", (n, k), weight_packed.contiguous(), scale_bytes,
                     weight_global_scale.reshape(()).contiguous())
    _check_decodes_finite(q, f"{ls} / {lg}")
    return q


def to_compressed_tensors(q: QuantBlockFP) -> dict[str, Tensor]:
    """{"weight_packed": uint8 [out, in/2], "weight_scale": float8_e4m3fn [out, in/16],
    "weight_global_scale": float32 [1]} (views of q's bytes), saved under `<module>.`."""
    _check_structure(q, "q")
    if q.quant_type != "nvfp4":
        raise ValueError(f"compressed-tensors' nvfp4-pack-quantized stores nvfp4 only; q is {q.quant_type}")
    return {"weight_packed": q.packed, "weight_scale": q.scale_fp8, "weight_global_scale": q.global_scale.reshape(1)}
