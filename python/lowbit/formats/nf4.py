"""The 4-bit LUT family (QLoRA): NF4, FP4 and a per-tensor fitted "optimal" 16-level table.

This file is the family's spec: the format object (`Quant4bit`), its byte layout, the pure-torch
reference of every op (any device; favours clarity over speed) and the bitsandbytes key layout.
The Triton kernels in lowbit.kernels.nf4 are checked against these functions.
Byte layout (identical to bitsandbytes' `quantize_4bit`, so checkpoints move both ways):

* `codes`   uint8 [ceil(numel / 2)]: the tensor flattened in row-major order, element 2i in the
  high nibble of byte i and element 2i+1 in the low nibble; an odd tail is padded with the code
  of 0. For a weight [out, in] with `in % blocksize == 0` this is also `codes.view(out, in // 2)`:
  one row of bytes per output row, which is what the matmul kernels and row sharding rely on.
* `absmax`  the scale of each block of `blocksize` consecutive elements (the last may be short,
  and then stores max(its absmax, 1e-38) as bitsandbytes does):
  fp32 [ceil(numel / blocksize)] without double quantization; with it, uint8 codes into the
  signed 8-bit dynamic map, decoded as `nested_code[absmax] * nested_absmax[i // 256] + offset`.
* `nested_absmax` fp32 [ceil(nblocks / 256)], `nested_code` fp32 [256], `offset` fp32 scalar
  (the mean of the fp32 absmax values, subtracted before the 8-bit quantization).
* `code`    fp32 [16]: the value of each 4-bit code (bnb's tables for nf4/fp4, the fitted table
  for "optimal").

A value w in block b is stored as the code whose table value is nearest to w / absmax[b]
(computed as w * (1 / absmax[b]) in fp32; a value on a midpoint takes the lower code). The
reference follows bitsandbytes' arithmetic step by step (fp32 throughout, multiply by the
reciprocal of the block absmax, round to nearest with ties going down) so that its bytes equal
bitsandbytes' bytes.

bitsandbytes saves a `Linear4bit` as weight (uint8 [numel/2, 1]), weight.absmax,
weight.quant_map, and with double quantization weight.nested_absmax, weight.nested_quant_map,
plus weight.quant_state.bitsandbytes__<type>: a uint8 tensor holding UTF-8 JSON {quant_type,
blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset}. Our bytes are bnb's
bytes, so conversion (`from_bnb_entries`, `to_bnb_entries`) only renames keys and reshapes views.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .._validate import FLOAT_DTYPES, check_choice, check_power_of_two

QUANT_TYPES = ("nf4", "fp4", "optimal")
NESTED_BLOCKSIZE = 256
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NAMED_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class Quant4bit:
    """A tensor quantized to 4 bits per element with blockwise scales (see the module docstring)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Exact storage: codes, scales (and nested scales, map and offset), code table."""
        tensors = [self.codes, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block (decoded if double-quantized)."""
        return block_scales(*self.scale_tensors(), self.nested_blocksize)

    def scale_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ops take them."""
        return self.absmax, self.nested_absmax, self.nested_code, self.offset

    def to(self, device: torch.device | str) -> "Quant4bit":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            codes=self.codes.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
            offset=mv(self.offset),
        )

    def validate(self) -> None:
        """Check that the stored tensors fit the declared shape (raises ValueError)."""
        n = self.numel
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_power_of_two("blocksize", self.blocksize, 32, 4096)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != (n + 1) // 2:
            raise ValueError(
                f"codes must be uint8 with ceil(numel/2) = {(n + 1) // 2} elements for shape {tuple(self.shape)}, "
                f"got {self.codes.dtype} with {self.codes.numel()}"
            )
        want_absmax = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want_absmax or self.absmax.numel() != self.nblocks:
            raise ValueError(
                f"absmax must be {want_absmax} with {self.nblocks} elements (one per block of {self.blocksize}), "
                f"got {self.absmax.dtype} with {self.absmax.numel()}"
            )
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"code must be a float32 table of 16 values, got {self.code.dtype} with {self.code.numel()}")
        if self.double_quant:
            nn = -(-self.nblocks // self.nested_blocksize)
            if self.nested_absmax is None or self.nested_absmax.numel() != nn:
                raise ValueError(f"nested_absmax must have {nn} elements")
            if self.nested_code is None or self.nested_code.numel() != 256:
                raise ValueError("nested_code must have 256 elements")
            if self.offset is None or self.offset.numel() != 1:
                raise ValueError("offset must be a single fp32 value")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")


# ----------------------------------------------------------------------------------------------
# Reference implementations (the spec every kernel is checked against)
# ----------------------------------------------------------------------------------------------


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 max |x| of each block of `blocksize` consecutive elements (the last block may be short)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat.float(), (0, nblocks * blocksize - n))
    return padded.view(nblocks, blocksize).abs().amax(dim=1)


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """w / absmax_b clamped to [-1, 1], rounded exactly as bitsandbytes does it.

    Whole blocks: w * (1 / absmax) (two roundings); a short last block: w / absmax (one). The
    two differ in the last bit, which decides the code for a value on a midpoint; bnb does each.
    """
    n = flat.numel()
    nblocks = absmax.numel()
    denom = absmax.clamp(min=1e-38)
    padded = torch.nn.functional.pad(flat.float(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    scaled = padded * (1.0 / denom)[:, None]
    if n % blocksize:
        scaled[-1] = padded[-1] / denom[-1]
    return torch.clamp(scaled, -1, 1).reshape(-1)[:n]


def quantize_flat(
    flat: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of a flat tensor.

    Returns (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]). Byte i holds element 2i
    in its high nibble and element 2i+1 in its low nibble (the tail is padded with the code of 0).
    scales: fitted fp32 block scales to use instead of the absmax (the activation-aware fit; a value
    beyond its block's scale is clamped to the table's end), returned as given.
    """
    absmax = blockwise_absmax(flat, blocksize) if scales is None else scales.float().clone()
    scaled = _scale_blocks(flat, absmax, blocksize)
    if flat.numel() % blocksize:
        # bitsandbytes stores a short last block's scale as max(absmax, 1e-38) (the divisor it used),
        # whole blocks' as they are: an all-zero short block is 1e-38 in its files, not 0
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, bounds.to(scaled.device), out_int32=True)
    q = order.to(scaled.device).long()[idx.long()].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """The grid -> code index table of `code` (cached: building it takes ~10 ms, as long as
    quantizing a small layer, and the code is always the same 256-value dynamic map)."""
    return _lut_8bit_cached(tuple(code.float().cpu().tolist()))


@functools.lru_cache(maxsize=4)
def _lut_8bit_cached(code_values: tuple) -> torch.Tensor:
    """65536-entry table: grid point i of [-1, 1] -> index of the nearest code value.

    bitsandbytes' CPU quantizer rounds through this grid rather than to the exact nearest code;
    we reproduce it so that double-quantized scales are byte-identical to bnb's.
    """
    c = torch.tensor(code_values, dtype=torch.float32)
    mid = 0.5 * (c[:-1] + c[1:])
    i = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(mid, val, side="left").to(torch.uint8)


def quantize_blockwise_8bit(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 8-bit quantization against a sorted 256-value code (the nested scales).

    Each value is normalised by its block absmax, mapped to the nearest of 65536 grid points on
    [-1, 1] and then to that grid point's nearest code (bitsandbytes' CPU rule; within one grid
    step of a midpoint it can pick the farther code). A block whose absmax is 0 gets code 0.
    """
    flat = flat.float()
    absmax = blockwise_absmax(flat, blocksize)
    nblocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize)
    recip = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = torch.clamp(padded * recip[:, None], -1, 1)
    grid = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # truncation, as C's cast
    q = _lut_8bit(code).to(flat.device)[grid]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[: flat.numel()], absmax


def decode_scales(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    nested_blocksize: int,
) -> torch.Tensor:
    """Double-quantized scales back to fp32: code[q] * absmax2[block], then + offset (bnb's order)."""
    n = qabsmax.numel()
    v = nested_code.to(qabsmax.device)[qabsmax.long()]
    return (_times_blockwise(v, nested_absmax, nested_blocksize) + offset.to(v.device))[:n]


def block_scales(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """fp32 scale per block: `absmax` itself, or its double-quantized codes decoded."""
    if nested_absmax is None:
        return absmax
    assert nested_code is not None and offset is not None
    return decode_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize)


def _times_blockwise(v: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """v[i] * scale[i // blocksize] for flat v (the last block may be short)."""
    n = v.numel()
    nblocks = scale.numel()
    if n == nblocks * blocksize:
        return (v.view(nblocks, blocksize) * scale.float()[:, None]).view(n)
    return v * scale.float()[torch.arange(n, device=v.device) // blocksize]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> int64 codes, high nibble first."""
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)
    return q[:numel].long()


def dequantize_flat(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat dequantized tensor: code[q] * absmax[block] in fp32, then rounded to `dtype`."""
    # One gather per byte from a 256-entry table of (high-nibble value, low-nibble value) pairs,
    # each pair viewed as one int64 so the gather is a 1-D index_select (~2.5x faster on CPU).
    code = code.to(packed.device).float()
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).view(torch.int64).view(256)
    values = torch.index_select(pairs, 0, packed.int()).view(torch.float32)[:numel]
    return _times_blockwise(values, absmax, blocksize).to(dtype)


def matmul_dequantized(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w^T + bias with fp32 accumulation, returned in x's dtype (the matmul spec)."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _dp_levels(s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, edges: np.ndarray, levels: int = 16) -> np.ndarray:
    """The `levels` sorted centres of the exact weighted k-means of a histogram (s0, s1, s2: the sums of
    weight, weight * u and weight * u^2 per bin), by dynamic programming over the bin boundaries."""
    bins = s0.size
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(s)]) for s in (s0, s1, s2))
    i = np.arange(bins + 1)[:, None]
    j = np.arange(bins + 1)[None, :]
    w_ij = p0[j] - p0[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (p2[j] - p2[i]) - np.where(w_ij > 0, (p1[j] - p1[i]) ** 2 / w_ij, 0.0)
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)
    dp = cost[0].copy()  # dp[j]: best cost of bins [0, j) in 1 cluster
    back = np.zeros((levels, bins + 1), dtype=np.int64)
    for k in range(1, levels):
        total = dp[:, None] + cost  # split at i
        back[k] = np.argmin(total, axis=0)
        dp = total[back[k], np.arange(bins + 1)]
    cuts = [bins]
    for k in range(levels - 1, 0, -1):
        cuts.append(back[k][cuts[-1]])
    cuts = cuts[::-1]
    starts = [0] + cuts[:-1]
    centers = []
    for s, e in zip(starts, cuts):
        w_sum = p0[e] - p0[s]
        centers.append((p1[e] - p1[s]) / w_sum if w_sum > 0 else (edges[s] + edges[min(e, bins)]) / 2)
    return np.sort(np.asarray(centers))


def element_weights(weights: torch.Tensor, numel: int) -> torch.Tensor:
    """fp32 [numel] importance per element from `weights` given per element (numel values) or per input
    channel (K values, K dividing numel: element i of the row-major tensor is in channel i % K)."""
    w = weights.detach().reshape(-1).float()
    if w.numel() == numel:
        return w
    if w.numel() == 0 or numel % w.numel():
        raise ValueError(f"weights must have one value per element ({numel}) or per input channel (a divisor "
                         f"of {numel}), got {w.numel()}")
    return w.repeat(numel // w.numel())


def fit_optimal_table(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, bins: int = 1024,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """16 levels minimising sum over elements of weight * absmax_b^2 * (w / absmax_b - level)^2.

    Exact k-means by dynamic programming over a fine histogram of the normalised values (weights
    absmax^2, so the error is measured on w itself, not on w / absmax), refined by a few Lloyd
    steps on the raw values. The caller keeps NF4 when that is no worse.
    weights: None (every element counts the same: the plain RMSE fit) or a non-negative importance
    per element, given per input channel ([K] for a weight [N, K], repeated over the rows) or
    per element (numel values) - the activation-aware fit passes h (formats/nf4_aware.py).
    """
    n = flat.numel()
    block = torch.arange(n, device=flat.device) // blocksize
    a = absmax[block]
    u = (flat.float() / a.clamp(min=1e-38)).clamp(-1, 1).double().cpu().numpy()
    wt = (a.double() ** 2).cpu().numpy()
    if weights is not None:
        wt = wt * element_weights(weights, n).double().cpu().numpy()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, bins - 1)
    s0 = np.bincount(b, weights=wt, minlength=bins)
    s1 = np.bincount(b, weights=wt * u, minlength=bins)
    s2 = np.bincount(b, weights=wt * u * u, minlength=bins)
    c = _dp_levels(s0, s1, s2, edges)
    for _ in range(4):  # Lloyd on the exact values with the same nearest rule as the quantizer
        mids = (c[:-1] + c[1:]) / 2
        lab = np.searchsorted(mids, u, side="left")
        wsum = np.bincount(lab, weights=wt, minlength=16)
        usum = np.bincount(lab, weights=wt * u, minlength=16)
        c = np.where(wsum > 0, usum / np.maximum(wsum, 1e-300), c)
        c = np.sort(c)
    return torch.tensor(c, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# bitsandbytes' key layout
# ----------------------------------------------------------------------------------------------

BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def read_bnb_quant_state(sd: dict, prefix: str) -> dict:
    """The JSON quant_state of the bnb 4-bit weight at `prefix`weight (ValueError if absent or bad)."""
    keys = [k for k in sd if k.startswith(prefix + "weight.quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ValueError(f"bitsandbytes checkpoint at '{prefix}weight' must have one quant_state entry, found {keys}")
    try:
        meta = json.loads(bytes(sd[keys[0]].tolist()).decode("utf-8"))
        meta["quant_type"], meta["blocksize"], meta["shape"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"bitsandbytes quant_state '{keys[0]}' is not valid: {e}") from None
    return meta


def to_bnb_entries(q: Quant4bit, prefix: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' state-dict entries for a 2-D Quant4bit stored at `prefix`weight."""
    if q.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {q.quant_type!r} at '{prefix}weight': bitsandbytes reads only nf4/fp4")
    sd = {prefix + "weight": q.codes.reshape(-1, 1), prefix + "weight.absmax": q.absmax,
          prefix + "weight.quant_map": q.code}
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": DTYPE_NAMES[q.dtype],
            "shape": list(q.shape)}
    if q.double_quant:
        sd[prefix + "weight.nested_absmax"] = q.nested_absmax
        sd[prefix + "weight.nested_quant_map"] = q.nested_code.clone()
        meta.update({"nested_blocksize": q.nested_blocksize, "nested_dtype": "float32",
                     "nested_offset": float(q.offset)})
    sd[prefix + f"weight.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


def from_bnb_entries(sd: dict, prefix: str) -> Quant4bit:
    """The Quant4bit held by bitsandbytes' entries for `prefix`weight (validated)."""
    meta = read_bnb_quant_state(sd, prefix)
    dq = prefix + "weight.nested_absmax" in sd
    q = Quant4bit(
        codes=sd[prefix + "weight"].reshape(-1),
        absmax=sd[prefix + "weight.absmax"].reshape(-1),
        shape=torch.Size(meta["shape"]),
        dtype=NAMED_DTYPES.get(meta.get("dtype", "float32"), torch.float32),
        blocksize=int(meta["blocksize"]),
        quant_type=meta["quant_type"],
        code=sd[prefix + "weight.quant_map"].float(),
        nested_absmax=sd[prefix + "weight.nested_absmax"] if dq else None,
        nested_code=sd[prefix + "weight.nested_quant_map"].float() if dq else None,
        offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32) if dq else None,
        nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
    )
    q.validate()
    return q
