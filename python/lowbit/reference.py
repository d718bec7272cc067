"""Pure-torch reference implementations: the spec every kernel is checked against.

They run on any device, favour clarity over speed, and follow bitsandbytes' arithmetic step by
step (fp32 throughout, multiply by the reciprocal of the block absmax, round to nearest with
ties going down) so that their bytes equal bitsandbytes' bytes.
"""

from __future__ import annotations

import torch


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


def quantize_4bit(
    flat: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of a flat tensor.

    Returns (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]). Byte i holds element 2i
    in its high nibble and element 2i+1 in its low nibble (the tail is padded with the code of 0).
    """
    absmax = blockwise_absmax(flat, blocksize)
    scaled = _scale_blocks(flat, absmax, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, bounds.to(scaled.device), out_int32=True)
    q = order.to(scaled.device).long()[idx.long()].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """65536-entry table: grid point i of [-1, 1] -> index of the nearest code value.

    bitsandbytes' CPU quantizer rounds through this grid rather than to the exact nearest code;
    we reproduce it so that double-quantized scales are byte-identical to bnb's.
    """
    c = code.float().cpu()
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


def dequantize_4bit(
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
