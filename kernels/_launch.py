"""Launch helpers shared by the matmul families (kernels/nf4.py, kernels/intq.py).

The two families differ in how a tile of W is decoded (a 16-entry table and block scales for
nf4, packed integer fields with a scale and a zero point for intq) and in nothing else that a
launcher does. Each launcher does three things in order, as in Triton's matmul tutorial: check
the shapes and pick a config, allocate the output, launch. The last two are the same for both
families, so they live here once, and a family file keeps only what is its own: the kernels, the
config tables, the `_fits_*` rules and the argument lists of its weights.

The calling convention all of them rely on
-----------------------------------------

Every matmul kernel of a family takes its arguments in the same order, so one launch helper
serves both families::

    forward   kernel(x, *weights, bias, y, M, N, K, extra, stride_xm, stride_xk, stride_ys, stride_ym, stride_yn, ...)
    grad_x    kernel(g, *weights, gx, M, N, K, extra, stride_gm, stride_gn, stride_s, stride_om, stride_ok, ...)
    words     kernel(x, *weights, bias, y, ws, count, *sizes, ...)

`weights` are the family's weight tensors (nf4: codes, the four scale arguments, the code
table; intq: codes, scale, zeros), `extra` is the one family-specific size between K and the
strides (nf4: the row stride of the codes, K / 2; intq: the number of scale groups per row), and
`...` are the family's constexprs, which the helper passes on unchanged next to the tile
constexprs it sets itself (BLOCK_*, SPLIT_*, GROUP_M, DOT_DTYPE, PRECISION, HAS_BIAS, M, PAIRS).
The bias argument is `x` when there is no bias: the kernel never reads it (HAS_BIAS is False),
and a real tensor keeps the JIT's specialization (a 16-byte-aligned pointer) the same either way.

What each helper does
---------------------

* `tiled_matmul`: one launch of a family's "gemv" (no tensor cores, M <= BLOCK_M) or "dot"
  (tl.dot tiles in grouped order) forward kernel. Split-K writes fp32 partials [SPLIT_K, M, N]
  that `reduce_split` sums in split order (deterministic, unlike atomics) before adding the bias
  and casting; unsplit fp16/bf16 calls store the result directly.
* `grad_x_matmul`: one launch of a family's gx = g @ W kernel, split over N the same way.
* `words_gemv`: one launch of a family's "words" GEMV (M <= 4): int32 code words, x as int32
  pairs when it is bf16, and split-K reduced inside the launch by the last program of each row
  tile through a cached workspace (kernels._common.words_workspace), so a CUDA graph can
  capture it. `words_codes` gives the 16-byte-aligned int32 view its 128-bit loads need.
* `GROUP_M`: how many row tiles share a column tile of W in the grouped order of the "dot" and
  grad_x kernels (kernels._common.grouped_tile): one name for the one value.
* `sm_count`: the device's streaming multiprocessors, read once per device, for launchers that
  size a split from the number of waves (intq's grad_scale). Meta tensors (the AOT compile and
  the cost report, no GPU) get `DEFAULT_SMS`, an H100 SXM's 132, so that `launch_spec` compiles
  exactly the launch the JIT makes on that card.
* `cpu_operand`: the interpreter has no bf16 arithmetic, so a bf16 CPU tensor is read as fp32
  (torch rounds the result back); CUDA and meta tensors pass unchanged.
* `buckets` and `SIG_DT`: what the families' `aot_specs()` need to list every config once
  (under the largest M bucket that lists it) and to name its activation dtype.

Like everything in kernels/, this module imports nothing from lowbit.
"""

from __future__ import annotations

import torch
import triton

from ._common import (
    alloc_output,
    count_launch,
    precision,
    reduce_split,
    words_out_dtype,
    words_workspace,
    words_x,
)

# Row tiles per group in the grouped tile order of every "dot" and grad_x kernel: GROUP_M row
# tiles in a row share each column tile of the weight while it is hot in L2.
GROUP_M = 8

# The SM count a launch is sized for when there is no device to ask: an H100 SXM (132 SMs), the
# card the shipped configs and the cost report's bandwidth model are measured on.
DEFAULT_SMS = 132
_SMS: dict[int, int] = {}

# Short activation-dtype names used in compile-spec names ("bf16" in words_4bit[bf16,...]).
SIG_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CUDA: read once per device and cached);
    DEFAULT_SMS for meta tensors (the AOT compile, the cost report) and the CPU interpreter."""
    if device.type != "cuda":
        return DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def cpu_operand(t: torch.Tensor) -> torch.Tensor:
    """`t`, upcast to fp32 when it is a bf16 CPU tensor (the interpreter has no bf16 arithmetic)."""
    return t.float() if (t.device.type == "cpu" and t.dtype == torch.bfloat16) else t


def buckets(table: dict) -> dict:
    """{config: the largest M bucket of `table` that lists it}, in table order."""
    return {c: b for b in sorted(table) for c in table[b]}


def tiled_matmul(family: str, gemv_kernel, dot_kernel, x: torch.Tensor, weights: tuple, extra: int, n: int,
                 bias: torch.Tensor | None, cfg, out_dtype: torch.dtype, dot_dt, **constexprs) -> torch.Tensor:
    """y[M, n] = x @ W^T (+ bias) in out_dtype: one launch of `gemv_kernel` (cfg.kind "gemv") or
    `dot_kernel` ("dot"), counted as "<family>.<kind>"."""
    m, k = x.shape
    split = cfg.split_k
    store_dtype = torch.float32 if (split > 1 or x.dtype == torch.float32) else x.dtype
    y = alloc_output((split, m, n), store_dtype, x.device)
    gemv = cfg.kind == "gemv"
    kern = gemv_kernel if gemv else dot_kernel
    tiles = triton.cdiv(n, cfg.block_n) * (1 if gemv else triton.cdiv(m, cfg.block_m))
    count_launch(f"{family}.{cfg.kind}")
    kern[(tiles, split)](
        x, *weights, bias if bias is not None else x, y,
        m, n, k, extra, x.stride(0), x.stride(1), y.stride(0), y.stride(1), y.stride(2),
        **constexprs, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, GROUP_M=GROUP_M,
        DOT_DTYPE=dot_dt, PRECISION=precision(dot_dt), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return reduce_split(y, bias, out_dtype)


def grad_x_matmul(family: str, kernel, g: torch.Tensor, weights: tuple, extra: int, k: int, cfg,
                  out_dtype: torch.dtype, dot_dt, **constexprs) -> torch.Tensor:
    """gx[M, k] = g @ W in out_dtype: one launch of `kernel`, counted as "<family>.grad_x"."""
    m, n = g.shape
    store_dtype = torch.float32 if (cfg.split_n > 1 or g.dtype == torch.float32) else g.dtype
    gx = alloc_output((cfg.split_n, m, k), store_dtype, g.device)
    grid = (triton.cdiv(m, cfg.block_m) * (k // cfg.block_k), cfg.split_n)
    count_launch(f"{family}.grad_x")
    kernel[grid](
        g, *weights, gx,
        m, n, k, extra, g.stride(0), g.stride(1), gx.stride(0), gx.stride(1), gx.stride(2),
        **constexprs,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SPLIT_N=cfg.split_n, GROUP_M=GROUP_M,
        DOT_DTYPE=dot_dt, PRECISION=precision(dot_dt), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return reduce_split(gx, None, out_dtype)


def words_codes(codes: torch.Tensor) -> torch.Tensor:
    """The codes as int32 words whose start is 16-byte aligned (the words GEMVs load 128 bits at a
    time); a misaligned view is copied."""
    if codes.storage_offset() % 4 or codes.data_ptr() % 16:
        codes = codes.clone()
    return codes.view(torch.int32)


def words_gemv(family: str, kernel, x: torch.Tensor, weights: tuple, sizes: tuple, n: int,
               bias: torch.Tensor | None, cfg, out_dtype: torch.dtype, **constexprs) -> torch.Tensor:
    """y[M, n] = x @ W^T (+ bias) in out_dtype for M <= 4: one launch of a words GEMV `kernel`,
    counted as "<family>.words". x must be contiguous; bf16 x is passed as int32 pairs (integer
    work only, so it stays bf16 under the interpreter too), and the interpreter stores bf16
    results as fp32 (it truncates casts), which torch rounds here."""
    m = x.shape[0]
    tiles = triton.cdiv(n, cfg.block_n)
    ws, count = words_workspace(x.device, cfg.split_k, n, tiles)
    y = alloc_output((m, n), words_out_dtype(x.dtype), x.device)
    xw, pairs = words_x(x)
    count_launch(f"{family}.words")
    kernel[(tiles, cfg.split_k)](
        xw, *weights, bias if bias is not None else x, y, ws, count, *sizes,
        **constexprs, HAS_BIAS=bias is not None,
        M=m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, PAIRS=pairs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y if y.dtype == out_dtype else y.to(out_dtype)
