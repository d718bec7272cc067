"""The sub-4-bit integer family (int2/int3/int4 rows, PEQA): format object, byte layout, quantizer and
pure-torch reference (the spec the kernels in lowbit.kernels.intq are checked against).

Format
------
A weight W [N, K] (N = out_features, K = in_features, K % 32 == 0) is split into groups of
L consecutive elements of a row: L = K (one group per row, ``group_size=None``) or
L = group_size (any positive multiple of 32); G = ceil(K / L) groups per row. When L does not
divide K the row's last group is ragged: it holds only the K - (G - 1) L real columns (a multiple
of 32), and its range is theirs (nothing is padded in storage). Each group has an fp32 scale s and
an integer zero point z in [0, 2^bits - 1]; every element has an unsigned code Q in
[0, 2^bits - 1] and

    W[n, k] ~= s[n, g] * (Q[n, k] - z[n, g]),    g = k // L.

L is a multiple of 32 because every kernel decodes a whole 32-code chunk (`bits` words) with one
scale and zero point; K % 32 == 0 because a row is a whole number of chunks.

Byte layout (all little-endian, row-major, contiguous; format version 3)
-------------------------------------------------------------------------
codes  int32 [N, K/32, bits]: row n is a stream of K * bits / 32 words (the [K/32, bits] shape only
       says that 32 codes take exactly `bits` words; read the row as one flat word stream). The
       words are stored as int32 (torch has no full uint32 support); read them as uint32.
       int4: word t holds Q[n, 8t + i] in bits 4i..4i+3 (i = 0..7): nibbles, lowest first.
       int2: word t holds Q[n, 16t + i] in bits 2i..2i+1 (i = 0..15): crumbs, lowest first.
       int3: the row's 32-code chunks go in quads of 4 (the last quad of a row has r = K/32 mod 4
             chunks when that is not 0, else 4). A quad of r chunks is 3r words: r words A, then
             r words B, then r words H. For chunk j of the quad (codes c = 32j .. 32j + 31 of it):
               A[j] bits 2i..2i+1  = low 2 bits of code 32j + i        (i = 0..15)
               B[j] bits 2i..2i+1  = low 2 bits of code 32j + 16 + i
               H[j] bit  2i + 1    = bit 2 of code 32j + i
               H[j] bit  2i        = bit 2 of code 32j + 16 + i
             so (H << 1) puts an A-code's third bit right above its crumb, and (H << 2) a B-code's:
             one 3-bit field per code after a shift and two masks, and each of A, B, H of a full quad
             is one aligned 128-bit load (a row of int3 is 12 * K/128 words: 16-byte aligned when
             K % 128 == 0).
       Why not bit planes (format versions 1-2): a plane costs ~4 integer instructions per bit per
       weight to unpack; a field in a word is one mask (lowbit.kernels.intq). `planes_to_packed`
       and `packed_to_planes` convert exactly both ways; IntLinear converts format-1/2
       checkpoints when they are loaded.
scale  fp32  [N] (rows) or [N, G] (groups): the trainable step sizes.
zeros  uint8 [N] (rows) or [N, G] (groups): the frozen zero points z.

``nbytes`` = 4 * N * K * bits / 32 + 5 * N * G and ``bits_per_param`` = bits + 40 * G / K exactly
(= bits + 40 / L when L divides K). A group-dividing shape is byte-identical to format version 3
before ragged groups: older checkpoints load unchanged.

Training (PEQA): only the scales are trained; Q and z are frozen. With y0_g = x_g (Q_g - z_g)^T
(the group's integer matmul), y = sum_g s_g * y0_g + bias, so dL/ds[n, g] = sum_m dL/dy[m, n]
* y0_g[m, n] = sum_{k in g} (Q - z)[n, k] * (dL/dy^T x)[n, k]. The backward recomputes this
from the codes (a fused Triton kernel on CUDA; the reference in row chunks elsewhere); it never
divides y by s and never builds W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_finite, check_float_tensor

BITS = (2, 3, 4)
METHODS = ("rtn", "mse")
# Clipping shrink factors tried by method="mse" (1.0 first: plain rtn, so mse is never worse).
MSE_SHRINKS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


# ----------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantInt:
    """A 2-D weight quantized to `bits`-bit integers with per-row or per-group scale and zero."""

    codes: Tensor  # int32 [N, K/32, bits]: the row's packed word stream (format version 3)
    scale: Tensor  # fp32 [N] or [N, G]
    zeros: Tensor  # uint8 [N] or [N, G]
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: Optional[int]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def group_len(self) -> int:
        return self.in_features if self.group_size is None else self.group_size

    @property
    def n_groups(self) -> int:
        """Groups per row, ceil(K / L): the last one is ragged (shorter) when L does not divide K."""
        return n_groups(self.in_features, self.group_len)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Exact storage: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zeros))

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to(self, device) -> "QuantInt":
        return QuantInt(self.codes.to(device), self.scale.to(device), self.zeros.to(device), self.shape,
                        self.dtype, self.bits, self.group_size)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    check_choice("bits", bits, BITS)
    return bits


def n_groups(k: int, group_len: int) -> int:
    """Groups per row of K columns in groups of group_len: ceil(K / group_len) (the last may be ragged)."""
    return -(-k // group_len)


def check_group_size(group_size, in_features: int) -> Optional[int]:
    """None (per-row scales) or a positive multiple of 32; it need not divide in_features (the row's last
    group is then ragged: shorter, ceil(in_features / group_size) groups per row)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be None or an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(
            f"group_size must be None or a positive multiple of 32 (the kernels decode 32 codes at a time, "
            f"one scale and zero point per 32-code chunk; it need not divide in_features={in_features}), "
            f"got {group_size}"
        )
    return group_size


def check_in_features(k: int) -> None:
    if k % 32:
        raise ValueError(f"in_features must be a multiple of 32 for integer quantization (a row is packed in "
                         f"chunks of 32 codes), got {k}")


def _pad_cols(t: Tensor, cols: int) -> Tensor:
    """t [..., K] zero-padded to [..., cols] (cols >= K); t itself when K == cols (group-dividing shapes)."""
    return t if t.shape[-1] == cols else torch.nn.functional.pad(t, (0, cols - t.shape[-1]))


def _pack_fields(q: Tensor, width: int) -> Tensor:
    """[..., F] small non-negative ints -> int64 [...]: field i in bits width*i .. (values in [0, 2^32))."""
    f = q.shape[-1]
    shifts = torch.arange(f, device=q.device, dtype=torch.int64) * width
    return ((q.to(torch.int64) & ((1 << width) - 1)) << shifts).sum(-1)


def _unpack_fields(words: Tensor, fields: int, width: int) -> Tensor:
    """int32/int64 words [...] -> int32 [..., fields]: field i = bits width*i .. of the word."""
    shifts = torch.arange(fields, device=words.device, dtype=torch.int32) * width
    # int32 throughout: an arithmetic shift of a negative word still leaves the wanted field in the
    # low bits after the mask (half the memory traffic of an int64 unpack on the CPU path)
    return (words.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)


def _as_int32(words: Tensor) -> Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quads(nchunks: int) -> list[tuple[int, int, int]]:
    """int3: (first chunk, quads, chunks per quad) of a row's full quads and its tail quad."""
    full = nchunks // 4
    out = [(0, full, 4)] if full else []
    if nchunks % 4:
        out.append((4 * full, 1, nchunks % 4))
    return out


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Integer codes [N, K] (values < 2^bits) -> int32 words [N, K/32, bits] (the layout above)."""
    n, k = q.shape
    q = q.to(torch.int64)
    if bits in (2, 4):
        per_word = 32 // bits
        words = _pack_fields(q.view(n, k // per_word, per_word), bits)
    else:
        parts = []
        for c0, nq, r in _quads(k // 32):
            qc = q[:, 32 * c0: 32 * (c0 + nq * r)].reshape(n, nq, r, 32)
            a = _pack_fields(qc[..., :16], 2)
            b = _pack_fields(qc[..., 16:], 2)
            # H: bit 2i = code 16 + i, bit 2i + 1 = code i
            hi = torch.stack(((qc[..., 16:] >> 2) & 1, (qc[..., :16] >> 2) & 1), dim=-1).reshape(n, nq, r, 32)
            h = _pack_fields(hi, 1)
            parts.append(torch.cat((a, b, h), dim=-1).reshape(n, nq * 3 * r))
        words = torch.cat(parts, dim=-1)
    return _as_int32(words).view(n, k // 32, bits).contiguous()


def unpack_codes(codes: Tensor, bits: int) -> Tensor:
    """int32 words [N, K/32, bits] (or [N, K * bits / 32]) -> int32 codes [N, K]."""
    n = codes.shape[0]
    words = codes.reshape(n, -1)
    k = words.shape[1] * 32 // bits
    if bits in (2, 4):
        return _unpack_fields(words, 32 // bits, bits).reshape(n, k)
    out = []
    for c0, nq, r in _quads(k // 32):
        wq = words[:, 3 * c0: 3 * (c0 + nq * r)].reshape(n, nq, 3, r)
        a = _unpack_fields(wq[:, :, 0], 16, 2)  # [n, nq, r, 16]
        b = _unpack_fields(wq[:, :, 1], 16, 2)
        h = _unpack_fields(wq[:, :, 2], 32, 1).view(n, nq, r, 16, 2)  # [..., i, 0] = code 16+i, [..., i, 1] = code i
        out.append(torch.cat((a | (h[..., 1] << 2), b | (h[..., 0] << 2)), dim=-1).reshape(n, nq * r * 32))
    return torch.cat(out, dim=-1)


def pack_bit_planes(q: Tensor, bits: int) -> Tensor:
    """Codes [N, K] -> format 1-2 bit planes [N, K/32, bits]: bit i of word (n, c, j) is bit j of Q[n, 32c + i]."""
    n, k = q.shape
    q = q.to(torch.int64).view(n, k // 32, 32)
    planes = [_pack_fields((q >> j) & 1, 1) for j in range(bits)]
    return _as_int32(torch.stack(planes, dim=-1)).contiguous()


def unpack_bit_planes(codes: Tensor, bits: int) -> Tensor:
    """Format 1-2 bit planes [N, K/32, bits] -> int32 codes [N, K]."""
    n, c, _ = codes.shape
    q = _unpack_fields(codes[:, :, 0], 32, 1)
    for j in range(1, bits):
        q |= _unpack_fields(codes[:, :, j], 32, 1) << j
    return q.view(n, c * 32)


def planes_to_packed(codes: Tensor, bits: int) -> Tensor:
    """Exact conversion of format 1-2 int codes (bit planes) to this layout (same shape and dtype)."""
    return pack_codes(unpack_bit_planes(codes, bits), bits).to(codes.device)


def packed_to_planes(codes: Tensor, bits: int) -> Tensor:
    """Exact conversion of this layout to format 1-2 bit planes (for readers of older lowbit)."""
    return pack_bit_planes(unpack_codes(codes, bits), bits).to(codes.device)


def _quantize_groups(wg: Tensor, mn: Tensor, mx: Tensor, qmax: int):
    """Asymmetric rtn of wg [N, G, L] for the range [mn, mx] [N, G]: (Q int64, s fp32, z int64)."""
    mn = torch.minimum(mn, torch.zeros_like(mn))
    mx = torch.maximum(mx, torch.zeros_like(mx))
    # mn <= 0 <= mx: zero is representable exactly and a constant group is exact.
    # the range in float64: weights near +-3e38 span more than float32 holds (an inf scale decoded
    # every weight of its group to NaN); the scale itself, range / qmax, fits again
    rng = mx.double() - mn.double()
    s = torch.where(rng > 0, rng / qmax, torch.ones_like(rng)).float()
    z = torch.clamp(torch.round(-mn / s), 0, qmax)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, qmax)
    return q.to(torch.int64), s, z.to(torch.int64)


def _group_sq_err(wg: Tensor, q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    # Exactly the dequantization of `dequantize_int` (fp32 product), errors summed in float64.
    deq = (q - z[..., None]).float() * s[..., None]
    return ((wg.double() - deq.double()) ** 2).sum(-1)


def _check_decodes_finite(q: Tensor, s: Tensor, z: Tensor, group_size: Optional[int]) -> None:
    """Refuse weights whose group range float32 cannot decode: with few levels a code can sit a whole
    step past the range (int2 on +-3e38: (0 - 2) * 2e38 = -inf). Never return a tensor that decodes to inf."""
    ok = torch.isfinite((q - z[..., None]).abs().amax(-1).float() * s)
    if not bool(ok.all()):
        row, group = (int(i) for i in (~ok).nonzero()[0])
        where = f"row {row}" + ("" if group_size is None else f", group {group}")
        raise ValueError(f"w: {where} spans a range float32 cannot decode at this bit width (scale {float(s[row, group]):g}); "
                         "int quantization needs |decoded values| < 3.4e38: scale the weight down, or use more bits")


def quantize_int(w: Tensor, bits: int = 3, group_size: Optional[int] = None, method: str = "rtn") -> QuantInt:
    """Quantize a 2-D float weight [out, in] to `bits`-bit integers with scale and zero point.

    group_size: None (one scale/zero per row) or a positive multiple of 32; when it does not divide
    in_features the row's last group is ragged (ceil(in_features / group_size) groups per row).
    method: "rtn" (min-max range, round to nearest) or "mse" (per group, the best of a few
    clipping shrink factors of the range by squared error; shrink 1.0 is rtn, so never worse).
    """
    check_float_tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    bits = check_bits(bits)
    n, k = w.shape
    check_in_features(k)
    group_size = check_group_size(group_size, k)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    check_choice("method", method, METHODS)
    check_finite("w", w)

    qmax = 2**bits - 1
    length = k if group_size is None else group_size
    g = n_groups(k, length)
    # A ragged last group is zero-padded to a whole group: the range always includes 0 (mn <= 0 <= mx),
    # so the padding changes neither its min/max nor (a 0 quantizes to z exactly) its squared error;
    # its codes are cut off again below. Group-dividing shapes are not padded at all.
    wg = _pad_cols(w.detach().float(), g * length).reshape(n, g, length)
    mn, mx = wg.amin(-1), wg.amax(-1)
    q, s, z = _quantize_groups(wg, mn, mx, qmax)
    if method == "mse":
        best = _group_sq_err(wg, q, s, z)
        for p in MSE_SHRINKS[1:]:
            q2, s2, z2 = _quantize_groups(wg, mn * p, mx * p, qmax)
            err = _group_sq_err(wg, q2, s2, z2)
            better = err < best
            best = torch.where(better, err, best)
            q = torch.where(better[..., None], q2, q)
            s = torch.where(better, s2, s)
            z = torch.where(better, z2, z)
    _check_decodes_finite(q, s, z, group_size)
    if group_size is None:
        s, z = s.view(n), z.view(n)
    return QuantInt(
        codes=pack_codes(q.reshape(n, g * length)[:, :k].contiguous(), bits),
        scale=s.contiguous(),
        zeros=z.to(torch.uint8).contiguous(),
        shape=torch.Size((n, k)),
        dtype=w.dtype,
        bits=bits,
        group_size=group_size,
    )


# ----------------------------------------------------------------------------------------------
# Reference implementations (any device; the spec the kernels are checked against)
# ----------------------------------------------------------------------------------------------


def _int_groups(codes: Tensor, zeros: Tensor, bits: int, group_len: int, n: int, k: int) -> Tensor:
    """(Q - z) as fp32 [N, G, group_len], a ragged last group padded with zeros past column K."""
    g = n_groups(k, group_len)
    q = _pad_cols(unpack_codes(codes.view(n, k // 32, bits), bits), g * group_len)
    z = zeros.reshape(n, g).to(torch.int32)
    return (q.view(n, g, group_len) - z[..., None]).float()


def _cut(t: Tensor, n: int, k: int) -> Tensor:
    """[N, G, L] -> [N, K]: the real columns (all of them when L divides K)."""
    t = t.reshape(n, -1)
    return t if t.shape[1] == k else t[:, :k].contiguous()


def reference_int_weight(codes: Tensor, zeros: Tensor, bits: int, group_len: int, n: int, k: int) -> Tensor:
    """(Q - z) as fp32 [N, K] (small integers: exact in fp32); column k takes group k // group_len."""
    return _cut(_int_groups(codes, zeros, bits, group_len, n, k), n, k)


def reference_weight(codes, scale, zeros, bits, group_len, n, k) -> Tensor:
    """W = s * (Q - z) as fp32 [N, K]."""
    qz = _int_groups(codes, zeros, bits, group_len, n, k)
    return _cut(qz * scale.float().reshape(n, qz.shape[1], 1), n, k)


def reference_grad_scale(g: Tensor, x: Tensor, codes, zeros, bits, group_len, n, k, chunk: int = 1024) -> Tensor:
    """dL/ds [N, G] fp32 = sum_{k in g} (Q - z)[n, k] * (g^T x)[n, k], in row chunks of `chunk` (a ragged
    last group sums its real columns only)."""
    ng = n_groups(k, group_len)
    out = torch.empty((n, ng), dtype=torch.float32, device=g.device)
    gf, xf = g.float(), x.float()
    words_per_row = codes.view(n, -1)
    zr = zeros.reshape(n, -1)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        qz = _int_groups(words_per_row[r0:r1], zr[r0:r1], bits, group_len, r1 - r0, k)
        d = _pad_cols(gf[:, r0:r1].t() @ xf, ng * group_len)  # [rows, G * L]: g^T x, zero past K
        out[r0:r1] = (qz * d.view(r1 - r0, ng, group_len)).sum(-1)
    return out


def reference_matmul(x: Tensor, codes, scale, zeros, bits, group_len, n, bias) -> Tensor:
    """y = x @ W^T + bias with fp32 accumulation, in x's dtype."""
    k = x.shape[1]
    y = x.float() @ reference_weight(codes, scale, zeros, bits, group_len, n, k).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
