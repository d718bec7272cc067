"""Triton kernels: blockwise 4-bit quantize and dequantize (bitsandbytes' byte layout).

Both are bit-identical to `lowbit.reference`: the quantizer multiplies by a correctly rounded
reciprocal (div_rn) and the dequantizer is launched with fp-fusion off, so `code * scale + offset`
rounds twice exactly as torch does. Launchers take tensors on CUDA, or on CPU under
TRITON_INTERPRET=1 (then bf16 results are produced in fp32 and rounded by torch, because the
interpreter truncates fp32->bf16 casts).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import alloc_output


@triton.jit
def quantize_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    bounds_ptr,
    order_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    nblocks = tl.cdiv(n, BLOCKSIZE)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)
    # As the reference (bnb): whole blocks multiply by a correctly rounded 1/absmax, the short
    # last block divides; a zero block scales to 0 (its values take the code of 0).
    denom = tl.maximum(absmax, 1e-38)
    recip = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), denom), 0.0)
    tail = (blk[:, None] + 1) * BLOCKSIZE > n
    quot = tl.math.div_rn(x, tl.broadcast_to(denom[:, None], x.shape))
    scaled = tl.where(tail & (absmax[:, None] > 0), quot, x * recip[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    # Nearest table value = number of decision bounds strictly below the value (bucketize).
    idx = tl.zeros(scaled.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        idx += (tl.load(bounds_ptr + i) < scaled).to(tl.int32)
    q = tl.load(order_ptr + idx).to(tl.uint8)
    hi, lo = tl.split(tl.reshape(q, (BLOCKS_PER_PROG, BLOCKSIZE // 2, 2)))
    packed = (hi << 4) | lo
    poffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + poffs, packed, mask=poffs < (n + 1) // 2)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of 4-bit block `blk`, decoding the 8-bit nested scale when DOUBLE_QUANT."""
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        s = s + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    boffs = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    byte = tl.load(packed_ptr + boffs, mask=boffs < (n + 1) // 2, other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK,))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, offs // BLOCKSIZE, mask,
                     DOUBLE_QUANT, NESTED_BLOCKSIZE)
    v = tl.load(code_ptr + q) * s
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def quantize_4bit(
    flat: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = alloc_output((n + 1) // 2, torch.uint8, flat.device)
    absmax = alloc_output(nblocks, torch.float32, flat.device)
    per_prog = max(1, 2048 // blocksize)
    grid = (triton.cdiv(nblocks, per_prog),)
    quantize_4bit_kernel[grid](
        flat, packed, absmax, bounds.float().contiguous(), order.to(torch.int32).contiguous(), n,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=per_prog, num_warps=4,
    )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    double_quant = nested_absmax is not None
    store_dtype = torch.float32 if (_interpreting(packed) and dtype == torch.bfloat16) else dtype
    out = alloc_output(numel, store_dtype, packed.device)
    dummy = absmax  # never read when DOUBLE_QUANT is False
    block = 1024
    dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code,
        nested_absmax if double_quant else dummy,
        nested_code if double_quant else dummy,
        offset if double_quant else dummy,
        out, numel,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return out.to(dtype)


def aot_specs() -> list[dict]:
    """Kernel variants for the ahead-of-time compile tier (lowbit._aot)."""
    specs = []
    for xt in ("fp32", "fp16", "bf16"):
        for bs in (64, 4096):
            specs.append({
                "name": f"quantize_4bit[{xt},bs={bs}]", "fn": quantize_4bit_kernel,
                "signature": {"x_ptr": f"*{xt}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "bounds_ptr": "*fp32",
                              "order_ptr": "*i32", "n": "i32"},
                "constexprs": {"BLOCKSIZE": bs, "BLOCKS_PER_PROG": max(1, 2048 // bs)},
            })
    for ot in ("fp32", "fp16", "bf16"):
        for dq in (False, True):
            specs.append({
                "name": f"dequantize_4bit[{ot},dq={dq}]", "fn": dequantize_4bit_kernel,
                "signature": {"packed_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "code_ptr": "*fp32",
                              "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
                              "out_ptr": f"*{ot}", "n": "i32"},
                "constexprs": {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": dq, "BLOCK": 1024},
                "options": {"enable_fp_fusion": False},
            })
    return specs
