"""The CPU backend's launchers: fused decode-matmul kernels in C for CPU tensors (the default on CPU).

The kernels are C, one file per family in lowbit/csrc/ (`nf4.c`: the 4-bit LUT family, `intq.c`: integer rows,
`sz_decode.c`: the SZ decoder; the SZ encoder's are called from formats/_sz_encode.py), built once per machine
into one library and loaded through ctypes by lowbit._clib, which also holds the bindings table: this module
declares the signatures of the kernels it calls (`_clib.bind` below) and launches them. The kernels take sizes at
run time, so nothing recompiles across batch sizes, layers or shapes. AVX-512 intrinsics where the compiler targets
them (a 16-entry table lookup is one `vpermps`; int codes are packed fields, one shift from a table index), plain C
elsewhere. With OpenMP they run on torch's own OpenMP workers. Why not torch.compile: inductor turns the 16-entry
table gather into a scalar loop and specialises on shapes (the 4096x4096 NF4 GEMV: 44 ms static, 520 ms dynamic,
2-10 s of compiling per shape, against 1.5-2 ms here).

Dispatch, per call, by M (the rows of x or of the output gradient; thresholds measured, docs/cpu.md):
* M small: fused decode-GEMV (`lb_mv4`, `lb_mvi`; grad_x `lb_mv4t`, `lb_mvit`), fp32 accumulation;
* M large: the weight dequantized CHUNK_BYTES at a time into a buffer, each chunk one BLAS call: a
  bf16 GEMM for bf16 activations (the weight rounded to bf16, as bitsandbytes and a bf16 model
  have it; fp32 accumulation), an fp32 GEMM otherwise (as the reference);
* quantize and dequantize: bit-identical to the reference in lowbit.formats.nf4 / intq;
* SZ decode (`lb_szd`): bit-identical to formats.sz.decode_reference, lanes in lockstep (AVX-512 gathers).

`LOWBIT_CPU_BACKEND`: "fast" (default) | "reference" (the pure-torch spec) | "triton" (the Triton
kernels under TRITON_INTERPRET=1, tests only). When the kernels can not be built (no compiler), one
warning, then every op takes the reference. `CALLS` counts the fast paths that ran (for tests). `CALLS`,
`backend`, `build` and `library` are lowbit._clib's, imported here for this module's callers: patch them (and
the loader's state) in lowbit._clib. An allocation failing in C raises MemoryError naming the kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _clib
from ._clib import CALLS, F32, I64, INT, P, backend, build, kernel, library  # noqa: F401 (CALLS, backend, build)

# Dispatch thresholds (rows of x or of the output gradient), measured on a 2-core Xeon (AVX-512,
# AMX); see docs/cpu.md and benchmarks/cpu_backend.py.
FUSED_M = {torch.bfloat16: 8, torch.float16: 16, torch.float32: 16}
FUSED_M_GRAD = {torch.bfloat16: 8, torch.float16: 16, torch.float32: 16}
CHUNK_BYTES = 16 << 20  # dequantized weight per BLAS call (a reused buffer; 8-24 MiB measure alike)
PARALLEL_MIN = 1 << 20  # weight elements below which one thread works (waking threads costs ~20-50 us)
SZ_PARALLEL_MIN = 1 << 16  # the same for the SZ decoder (~1 ns per element: 64k elements ~ 60 us)

# The kernels this module calls (csrc/nf4.c, csrc/intq.c, csrc/sz_decode.c), as C declares them; each returns a
# code (MemoryError on LB_ENOMEM; lb_szd's own codes are read below). tests/test_c_bindings.py checks them.
_SCALES = dict(absmax=P, qabs=P, ncode=P, nabs=P, offset=F32, nbs=I64)  # a 4-bit weight's block scales
_clib.bind(
    kernel("lb_dq4", codes=P, **_SCALES, table=P, bs=I64, K=I64, n0=I64, nr=I64, k0=I64, kc=I64, out=P, dt=INT,
           nt=INT),
    kernel("lb_q4", x=P, dt=INT, n=I64, bs=I64, bounds=P, nbounds=INT, order=P, packed=P, absmax=P, nt=INT),
    kernel("lb_mv4", x=P, M=I64, K=I64, codes=P, **_SCALES, table=P, bs=I64, N=I64, y=P, nt=INT),
    kernel("lb_mv4t", g=P, M=I64, N=I64, codes=P, **_SCALES, table=P, bs=I64, K=I64, gx=P, nt=INT),
    kernel("lb_dqi", codes=P, scale=P, zeros=P, bits=INT, L=I64, N=I64, K=I64, n0=I64, nr=I64, k0=I64, kc=I64,
           out=P, dt=INT, nt=INT),
    kernel("lb_mvi", x=P, M=I64, codes=P, scale=P, zeros=P, bits=INT, L=I64, N=I64, K=I64, y=P, nt=INT),
    kernel("lb_mvit", g=P, M=I64, codes=P, scale=P, zeros=P, bits=INT, L=I64, N=I64, K=I64, gx=P, nt=INT),
    kernel("lb_rdi", d=P, codes=P, zeros=P, bits=INT, L=I64, N=I64, K=I64, n0=I64, nr=I64, out=P, nt=INT),
    kernel("lb_szd", payload=P, nwords=I64, start=P, s64=INT, table=P, max_len=INT, step=F32, radius=I64,
           numel=I64, chunk=I64, lanes=I64, oidx=P, ovals=P, nout=I64, out=P, dt=INT, nt=INT, err=P),
)
_SZD_LANE_END, _SZD_LONG_CODE, _SZD_OUTLIER, _SZD_LANE_START = 1, 2, 3, 4  # lb_szd's own codes (sz_decode.c)


def enabled(t: Tensor) -> bool:
    """Whether this backend runs an op on `t`: a CPU tensor, LOWBIT_CPU_BACKEND=fast, the kernels built."""
    return t.device.type == "cpu" and backend() == "fast" and library() is not None


# ----------------------------------------------------------------------------------------------
# Launchers: check sizes (the kernels read raw pointers), pick the path by M, allocate, call
# ----------------------------------------------------------------------------------------------

_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _p(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads(work: int) -> int:
    return 1 if work < PARALLEL_MIN else torch.get_num_threads()


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"lowbit CPU backend: {what}")


def _gemm_dtype(t: Tensor) -> torch.dtype:
    # bf16 activations: a bf16 GEMM (fp32 accumulation; the weight rounded to bf16, as bitsandbytes
    # and a bf16 model do). Everything else: fp32, as the reference.
    return torch.bfloat16 if t.dtype == torch.bfloat16 else torch.float32


class _W4:
    """A 4-bit weight [n, k] (flat element i = row * k + col) as the kernels take it."""

    def __init__(self, codes, absmax, code, blocksize, n, k, nabs, ncode, offset, nbs):
        numel, nblocks = n * k, -(-n * k // blocksize)
        self.codes, self.table = codes.contiguous(), code.float().contiguous()
        _need(codes.dtype == torch.uint8 and codes.numel() >= (numel + 1) // 2, "codes must hold ceil(numel/2) bytes")
        _need(self.table.numel() == 16, "code must have 16 values")
        _need(absmax.numel() >= nblocks, f"absmax must have {nblocks} values")
        if nabs is None:
            self._keep = (absmax.float().contiguous(),)  # the tensors behind the pointers live as long as self
            self.scales = (_p(self._keep[0]), None, None, None, 0.0, nbs)
        else:
            _need(absmax.dtype == torch.uint8 and ncode.numel() == 256 and nabs.numel() >= -(-nblocks // nbs),
                  "double-quantized scales must be uint8 codes, 256 nested values, one nested scale per "
                  f"{nbs} blocks")
            self._keep = (absmax.contiguous(), ncode.float().contiguous(), nabs.float().contiguous())
            self.scales = (None, *(_p(t) for t in self._keep), float(offset), nbs)
        self.bs, self.n, self.k = blocksize, n, k

    def rect(self, n0: int, nr: int, k0: int, kc: int, out: Tensor) -> None:
        """out[nr, kc] = W[n0:n0+nr, k0:k0+kc] in out's dtype, bit-identical to the reference."""
        library().lb_dq4(_p(self.codes), *self.scales, _p(self.table), self.bs, self.k, n0, nr, k0, kc, _p(out),
                         _DT[out.dtype], _threads(nr * kc))


class _WI:
    """An integer weight [n, k] (packed codes of format version 3, scale and zero per group of group_len, the last
    group of a row ragged when group_len does not divide k) as the kernels take it."""

    def __init__(self, codes, scale, zeros, bits, group_len, n, k):
        _need(bits in (2, 3, 4) and k % 32 == 0 and group_len > 0 and group_len % 32 == 0,
              "bits in (2, 3, 4), K and group_len positive multiples of 32")
        g = n * -(-k // group_len)  # ceil(k / group_len) groups per row
        self.codes, self.zeros = codes.contiguous(), zeros.contiguous()
        self.scale = None if scale is None else scale.float().contiguous()  # None: grad_scale needs no scale
        _need(self.codes.dtype == torch.int32 and self.codes.numel() == n * k // 32 * bits,
              "codes: int32 words, K * bits / 32 per row (packed, format version 3)")
        _need(scale is None or self.scale.numel() == g, f"scale must have {g} values")
        _need(self.zeros.numel() == g and self.zeros.dtype == torch.uint8, f"zeros must be uint8 with {g} values")
        self.bits, self.L, self.n, self.k = bits, group_len, n, k

    def args(self):
        return _p(self.codes), _p(self.scale), _p(self.zeros), self.bits, self.L, self.n, self.k

    def rect(self, n0: int, nr: int, k0: int, kc: int, out: Tensor) -> None:
        library().lb_dqi(*self.args(), n0, nr, k0, kc, _p(out), _DT[out.dtype], _threads(nr * kc))


def _matmul_chunked(x: Tensor, w, bias: Optional[Tensor]) -> Tensor:
    """y = x @ W^T + bias with W dequantized CHUNK_BYTES of rows at a time, each chunk one BLAS call."""
    cdt, m, n, k = _gemm_dtype(x), x.shape[0], w.n, w.k
    xc = x.to(cdt)
    rows = max(1, min(n, CHUNK_BYTES // (k * cdt.itemsize)))
    buf = torch.empty(rows * k, dtype=cdt)
    if rows == n:
        # The whole weight in one chunk (every SmolLM2 / 7B-class attention projection in fp32 up to 4M
        # elements): y = x @ W^T straight into [m, n]. The chunked path's y^T -> y copy cost ~25% of a
        # 576x576 layer's time at M = 512.
        wc = buf.view(n, k)
        w.rect(0, n, 0, k, wc)
        y = torch.mm(xc, wc.t())
    else:
        yt = torch.empty((n, m), dtype=cdt)  # y^T: each chunk's rows are contiguous
        for n0 in range(0, n, rows):
            nr = min(rows, n - n0)
            wc = buf[: nr * k].view(nr, k)
            w.rect(n0, nr, 0, k, wc)
            torch.mm(wc, xc.t(), out=yt[n0:n0 + nr])
        y = yt.t()
    if bias is not None:  # in fp32: in place (no second [m, n] buffer); bf16: added in fp32, rounded once below
        y = y.add_(bias.float()) if cdt == torch.float32 else y.float() + bias.float()
    return y.to(x.dtype).contiguous()


def _grad_x_chunked(g: Tensor, w) -> Tensor:
    """gx = g @ W with W dequantized CHUNK_BYTES of columns at a time."""
    cdt, m, n, k = _gemm_dtype(g), g.shape[0], w.n, w.k
    gc = g.to(cdt)
    cols = max(32, min(k, CHUNK_BYTES // (n * cdt.itemsize)) // 32 * 32)
    buf = torch.empty(n * min(cols, k), dtype=cdt)
    gxt = torch.empty((k, m), dtype=cdt)
    for k0 in range(0, k, cols):
        kc = min(cols, k - k0)
        wc = buf[: n * kc].view(n, kc)
        w.rect(0, n, k0, kc, wc)
        torch.mm(wc.t(), gc.t(), out=gxt[k0:k0 + kc])
    return gxt.t().to(g.dtype).contiguous()


# 4-bit LUT family ------------------------------------------------------------------------------


def quantize_4bit(flat: Tensor, blocksize: int, bounds: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]): formats.nf4.quantize_flat, bit for bit."""
    x = flat.contiguous().reshape(-1)
    n = x.numel()
    b, o = bounds.float().contiguous(), order.to(torch.uint8).contiguous()
    _need(x.dtype in _DT and o.numel() == b.numel() + 1 <= 256, "flat must be fp32/bf16/fp16; order = bounds + 1")
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if n:
        library().lb_q4(_p(x), _DT[x.dtype], n, blocksize, _p(b), b.numel(), _p(o), _p(packed), _p(absmax),
                        _threads(n))
    CALLS["nf4.quantize"] += 1
    return packed, absmax


def dequantize_4bit(codes, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset,
                    nested_blocksize) -> Tensor:
    w = _W4(codes, absmax, code, blocksize, 1, numel, nested_absmax, nested_code, offset, nested_blocksize)
    out = torch.empty(numel, dtype=dtype)
    if numel:
        w.rect(0, 1, 0, numel, out)
    CALLS["nf4.dequantize"] += 1
    return out


def matmul_4bit(x, codes, absmax, code, blocksize, n, nested_absmax, nested_code, offset, nested_blocksize,
                bias) -> Tensor:
    m, k = x.shape
    w = _W4(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize)
    if m == 0 or n == 0:
        return x.new_zeros((m, n))
    if k % blocksize or m > FUSED_M[x.dtype]:  # blocks across rows, or enough rows for BLAS
        CALLS["nf4.dequant_gemm"] += 1
        return _matmul_chunked(x, w, bias)
    xf = x.float().contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    library().lb_mv4(_p(xf), m, k, _p(w.codes), *w.scales, _p(w.table), blocksize, n, _p(y), _threads(n * k))
    CALLS["nf4.gemv"] += 1
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def matmul_4bit_grad_x(g, codes, absmax, code, blocksize, k, nested_absmax, nested_code, offset,
                       nested_blocksize) -> Tensor:
    m, n = g.shape
    w = _W4(codes, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset, nested_blocksize)
    if m == 0 or n == 0:
        return g.new_zeros((m, k))
    if k % blocksize or m > FUSED_M_GRAD[g.dtype]:
        CALLS["nf4.grad_x_gemm"] += 1
        return _grad_x_chunked(g, w)
    gf = g.float().contiguous()
    gx = torch.empty((m, k), dtype=torch.float32)
    library().lb_mv4t(_p(gf), m, n, _p(w.codes), *w.scales, _p(w.table), blocksize, k, _p(gx), _threads(n * k))
    CALLS["nf4.grad_x"] += 1
    return gx.to(g.dtype)


# integer family --------------------------------------------------------------------------------


def int_dequantize(codes, scale, zeros, bits, group_len, n, k, dtype) -> Tensor:
    w = _WI(codes, scale, zeros, bits, group_len, n, k)
    out = torch.empty((n, k), dtype=dtype)
    if n * k:
        w.rect(0, n, 0, k, out)
    CALLS["int.dequantize"] += 1
    return out


def int_matmul(x, codes, scale, zeros, bits, group_len, n, bias) -> Tensor:
    m, k = x.shape
    w = _WI(codes, scale, zeros, bits, group_len, n, k)
    if m == 0 or n == 0:
        return x.new_zeros((m, n))
    if m > FUSED_M[x.dtype]:
        CALLS["int.dequant_gemm"] += 1
        return _matmul_chunked(x, w, bias)
    xf = x.float().contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    library().lb_mvi(_p(xf), m, *w.args(), _p(y), _threads(n * k))
    CALLS["int.gemv"] += 1
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def int_matmul_grad_x(g, codes, scale, zeros, bits, group_len, k) -> Tensor:
    m, n = g.shape
    w = _WI(codes, scale, zeros, bits, group_len, n, k)
    if m == 0 or n == 0:
        return g.new_zeros((m, k))
    if m > FUSED_M_GRAD[g.dtype]:
        CALLS["int.grad_x_gemm"] += 1
        return _grad_x_chunked(g, w)
    gf = g.float().contiguous()
    gx = torch.empty((m, k), dtype=torch.float32)
    library().lb_mvit(_p(gf), m, *w.args(), _p(gx), _threads(n * k))
    CALLS["int.grad_x"] += 1
    return gx.to(g.dtype)


def int_matmul_grad_scale(g, x, codes, zeros, bits, group_len) -> Tensor:
    """dL/ds [n, ceil(k / group_len)] fp32: d = g^T x by BLAS in row chunks, then sum (Q - z) * d per group in C."""
    m, n = g.shape
    k = x.shape[1]
    w = _WI(codes, None, zeros, bits, group_len, n, k)
    out = torch.empty((n, -(-k // group_len)), dtype=torch.float32)
    gf, xf = g.float(), x.float().contiguous()
    rows = max(1, min(n, CHUNK_BYTES // (4 * k)))
    d = torch.empty(rows * k, dtype=torch.float32)
    for r0 in range(0, n, rows):
        nr = min(rows, n - r0)
        dc = d[: nr * k].view(nr, k)
        torch.mm(gf[:, r0:r0 + nr].t(), xf, out=dc)
        library().lb_rdi(_p(dc), _p(w.codes), _p(w.zeros), bits, group_len, n, k, r0, nr, _p(out), _threads(nr * k))
    CALLS["int.grad_scale"] += 1
    return out


# SZ family ---------------------------------------------------------------------------------------


def sz_decode(payload, lane_start, table, step, outlier_idx, outlier_val, numel, chunk_size, max_len, radius, dtype,
              check=False) -> Optional[Tensor]:
    """An SZ stream (version 2, SZTensor.decoder_args) decoded to `numel` values in `dtype` by `lb_szd`,
    bit-identical to formats.sz.decode_reference / decode_vectorized. Like the numpy decoder, it always
    verifies every lane's length (it costs nothing here), whatever `check` says: a stream whose lane lengths
    lie raises the numpy decoder's ValueError. max_len must be 1..12 (the encoder's limit, _entropy.MAX_LEN).
    Returns None for what it does not decode - output dtypes other than fp32/fp16/bf16, and corrupt tables whose
    entries claim codes over 14 bits (the most that 4 code words per 64-bit read allow) - and the caller,
    lowbit._ops, takes the numpy decoder, as it does for every other device and backend."""
    if dtype not in _DT:
        return None
    _need(numel > 0 and chunk_size > 0 and 1 <= max_len <= 12, "SZ stream: numel, chunk_size > 0, max_len in [1, 12]")
    n_chunks = -(-numel // chunk_size)
    lanes = (lane_start.numel() - 1) // n_chunks
    words, start, tab = payload.contiguous(), lane_start.contiguous(), table.contiguous()
    _need(words.dtype == torch.int32 and tab.dtype == torch.int16 and tab.numel() == 1 << max_len,
          "SZ stream: payload int32 words, table int16 of 2**max_len entries")
    _need(start.dtype in (torch.int32, torch.int64) and lanes >= 1 and start.numel() == n_chunks * lanes + 1
          and chunk_size % lanes == 0, "SZ stream: lane_start int32/int64 of n_chunks * lanes + 1 offsets, lanes "
          "dividing chunk_size")
    idx = outlier_idx.contiguous()
    vals = outlier_val.to(dtype).contiguous()
    _need(idx.dtype == torch.int64 and idx.numel() == vals.numel(), "SZ stream: int64 outlier indices, one per value")
    out = torch.empty(numel, dtype=dtype)
    err = torch.zeros(2, dtype=torch.int64)
    nt = 1 if numel < SZ_PARALLEL_MIN else torch.get_num_threads()
    status = library().lb_szd(_p(words), words.numel(), _p(start), int(start.dtype == torch.int64), _p(tab), max_len,
                              float(step.reshape(-1)[0]), radius, numel, chunk_size, lanes, _p(idx), _p(vals),
                              idx.numel(), _p(out), _DT[dtype], nt, _p(err))
    a, b = err.tolist()
    if status == _SZD_LANE_END:  # the numpy decoder's message
        raise ValueError(f"invalid SZ stream: lane {a} ends at bit {b}, its length says {int(start[a + 1])}")
    if status == _SZD_LANE_START:
        raise ValueError(f"invalid SZ stream: lane {a} starts at bit {b}, outside the payload's {32 * words.numel()} "
                         "bits")
    if status == _SZD_OUTLIER:
        raise IndexError(f"invalid SZ stream: outlier index {a} is out of bounds for {numel} elements")
    if status == _SZD_LONG_CODE:
        return None
    CALLS["sz.decode"] += 1
    return out
