"""Triton kernel: decode lowbit.formats.sz's chunked canonical-Huffman stream straight to fp32/fp16/bf16.

Each program decodes LANES chunks, one chunk per lane: a per-lane bit reader peeks MAX_LEN bits
(three byte loads, MSB first), looks the window up in the 2**MAX_LEN-entry decode table
(entry = symbol << 4 | code length), writes `float32(symbol - radius) * step` in the output
dtype and advances by the code length. Outliers are scattered afterwards by the launcher with
torch (`out[idx] = values`), exactly as the reference decoder does, so every path is
bit-identical to `lowbit.formats.sz.decode_reference`.

Launchers take tensors on CUDA, or on CPU under TRITON_INTERPRET=1 (then bf16 is produced in
fp32 and rounded by torch, because the interpreter truncates fp32->bf16 casts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import alloc_output, count_launch, interpreting


@triton.jit
def sz_decode_kernel(
    payload_ptr,
    offsets_ptr,
    table_ptr,
    step_ptr,
    out_ptr,
    n,
    n_chunks,
    payload_len,
    radius,
    CHUNK: tl.constexpr,
    MAX_LEN: tl.constexpr,
    LANES: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid * LANES + tl.arange(0, LANES)
    cmask = c < n_chunks
    bitpos = tl.load(offsets_ptr + c, mask=cmask, other=0).to(tl.int64) * 8
    step = tl.load(step_ptr)
    base = c.to(tl.int64) * CHUNK
    for i in range(CHUNK):
        byte = bitpos >> 3
        b0 = tl.load(payload_ptr + byte, mask=cmask & (byte < payload_len), other=0).to(tl.int32)
        b1 = tl.load(payload_ptr + byte + 1, mask=cmask & (byte + 1 < payload_len), other=0).to(tl.int32)
        b2 = tl.load(payload_ptr + byte + 2, mask=cmask & (byte + 2 < payload_len), other=0).to(tl.int32)
        window = (b0 << 16) | (b1 << 8) | b2
        sh = (24 - MAX_LEN - (bitpos & 7)).to(tl.int32)
        peek = (window >> sh) & ((1 << MAX_LEN) - 1)
        entry = tl.load(table_ptr + peek, mask=cmask, other=1)
        code = (entry >> 4) - radius
        v = code.to(tl.float32) * step
        idx = base + i
        tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=cmask & (idx < n))
        bitpos += (entry & 15).to(tl.int64)


def sz_decode(
    payload: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor,
    outlier_idx: torch.Tensor,
    outlier_val: torch.Tensor,
    numel: int,
    chunk_size: int,
    max_len: int,
    radius: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat decoded tensor of `numel` values in `dtype` (payload uint8, offsets int64 of n_chunks+1,
    table int32 of 2**max_len, step fp32 of 1 element, outliers int64 / any float)."""
    store_dtype = torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype
    out = alloc_output(numel, store_dtype, payload.device)
    n_chunks = offsets.numel() - 1
    lanes = 32
    if payload.numel() == 0:  # the kernel needs a real pointer; every load is masked anyway
        payload = torch.zeros(1, dtype=torch.uint8, device=payload.device)
    count_launch("sz.decode")
    sz_decode_kernel[(triton.cdiv(n_chunks, lanes),)](
        payload, offsets, table, step, out, numel, n_chunks, payload.numel(), radius,
        CHUNK=chunk_size, MAX_LEN=max_len, LANES=lanes, num_warps=1,
    )
    out = out.to(dtype)
    if outlier_idx.numel():
        out[outlier_idx] = outlier_val.to(dtype)
    return out


def aot_specs() -> list:
    """The decoder as sz_decode launches it (kernels/_compile.py) for a 4096 x 4096 tensor at about
    4 bits per symbol: fp32/fp16/bf16 outputs x chunks of 1024/4096 symbols."""
    from ._compile import launch_spec, meta

    numel, max_len, radius = 4096 * 4096, 12, 511
    specs = []
    for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for chunk in (1024, 4096):
            n_chunks = numel // chunk
            args = (meta(numel // 2, dtype=torch.uint8), meta(n_chunks + 1, dtype=torch.int64),
                    meta(1 << max_len, dtype=torch.int32), meta(1), meta(0, dtype=torch.int64), meta(0),
                    numel, chunk, max_len, radius, dt)
            # one symbol per lane per iteration; bytes per symbol: the output element + ~4 payload bits
            cost = {"kernel": "sz.decode", "format": "sz", "m_bucket": None, "config": {"out": name, "chunk": chunk, "lanes": 32},
                    "weights_per_iter": 32, "bytes_per_weight": torch.finfo(dt).bits / 8 + 0.5}
            specs.append(launch_spec(f"sz_decode[{name},chunk={chunk}]", lambda: sz_decode(*args), cost))
    return specs
