"""Property test of the SZ codec's promise: the error bound holds element by element.

For arbitrary finite float32 tensors (huge dynamic range, subnormals, constants included) and
bounds from tiny to larger than the value range: decompressed to fp32 the error never exceeds the
bound; decompressed to fp16/bf16 it does not either whenever `bound_holds(dtype)` says so, and an
element that no fp16/bf16 value can represent within the bound comes out as the original value
rounded to that dtype (the documented exception).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from lowbit import sz_compress, sz_decompress  # noqa: E402

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate = st.floats(-100.0, 100.0, width=32)
values = st.one_of(
    arrays(np.float32, st.integers(1, 400), elements=moderate),
    arrays(np.float32, st.integers(1, 200), elements=finite32),
    arrays(np.float32, st.integers(1, 50), elements=st.sampled_from([0.0, 1e-45, -3e-39, 1.5, 65504.0, 7e4])),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=values, rel=st.floats(1e-7, 0.999), mode=st.sampled_from(["abs", "rel"]))
def test_error_bound_holds_for_every_output_dtype(data, rel, mode):
    w = torch.from_numpy(data.copy())
    span = float(np.float64(data.max()) - np.float64(data.min()))
    if mode == "rel":
        if span == 0.0 or not np.isfinite(span):
            return  # a relative bound of a zero or unrepresentable range is rejected (tested in test_sz)
        eb = rel * span
        c = sz_compress(w, rel, mode="rel")
    else:
        eb = rel * (span if span > 0 and np.isfinite(span) else 1.0)
        c = sz_compress(w, eb, mode="abs")
    bound = c.bound  # the absolute bound in force (eb, or rel * range)
    assert bound <= eb * (1 + 1e-6) or mode == "rel"
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        out = sz_decompress(c, dtype=dt, allow_unbounded=True)
        assert out.dtype == dt and out.shape == w.shape
        err = (out.double() - w.double()).abs()
        assert not torch.isnan(out.double()).any()
        if dt == torch.float32 or c.bound_holds(dt):
            assert float(err.max()) <= bound, (dt, float(err.max()), bound)
        else:
            bad = err > bound
            assert torch.equal(out[bad], w[bad].to(dt))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=values, rel=st.floats(1e-7, 0.999), mode=st.sampled_from(["abs", "rel"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_c_encoder_writes_the_reference_bytes(data, rel, mode, dtype):
    """The encoder's C kernels (lowbit/_cpu_sz_encode.c) against the numpy/torch reference: same bytes."""
    import collections
    import os
    import warnings

    from lowbit import _cpu

    w = torch.from_numpy(data.copy()).to(dtype)
    if not bool(torch.isfinite(w).all()):
        return  # fp16 / bf16 overflow: not a valid input (tested in test_sz)
    span = float(w.double().max() - w.double().min())
    if mode == "rel" and span == 0.0:
        return
    eb = rel if mode == "rel" else rel * (span if span > 0 and np.isfinite(span) else 1.0)
    old = os.environ.get("LOWBIT_CPU_BACKEND")
    blobs = {}
    try:
        for backend in ("fast", "reference"):
            os.environ["LOWBIT_CPU_BACKEND"] = backend
            before = collections.Counter(_cpu.CALLS)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "larger than the input" for tight bounds
                blobs[backend] = sz_compress(w, eb, mode=mode).to_bytes()
            ran = _cpu.CALLS - before
            assert bool(ran["sz.encode_pack"]) == (backend == "fast"), (backend, dict(ran))
    finally:
        if old is None:
            os.environ.pop("LOWBIT_CPU_BACKEND", None)
        else:
            os.environ["LOWBIT_CPU_BACKEND"] = old
    assert blobs["fast"] == blobs["reference"]


# ----------------------------------------------------------------------------- parser fuzz (stream v2)

from lowbit.formats import sz as szf  # noqa: E402


def _streams():
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(24, 64, generator=g) * 0.05
    w1[3, 5] = 40.0  # an outlier
    w2 = torch.randn(700, generator=g) * 0.2  # flat layout, a short last chunk
    out = []
    for w, eb in ((w1, 2e-3), (w2, 1e-2)):
        c = szf.sz_compress(w, eb, chunk_size=16)  # many short lanes
        blob = c.to_bytes()
        head = 9 + 8 * len(c.shape)
        n_words = len(c.payload)
        index = (c.n_lanes * szf.lane_index(c)[1] + 7) // 8
        # structural fields: layout (chunk, lanes, payload bits), lane index header and bytes
        layout = list(range(head + 25, head + 45))
        idx_at = len(blob) - 4 - 4 * n_words - index
        structural = layout + list(range(idx_at - 5, idx_at + index))
        out.append((blob, structural, sz_decompress(c)))
    return out


STREAMS = _streams()
stream = st.integers(0, len(STREAMS) - 1)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _with_crc(body: bytes) -> bytes:
    import zlib

    return body + zlib.crc32(body).to_bytes(4, "little")


@FUZZ
@given(which=stream, cut=st.integers(0, 1 << 20))
def test_truncated_stream_raises(which, cut):
    blob = STREAMS[which][0]
    with pytest.raises(ValueError):
        szf.SZTensor.from_bytes(blob[:cut % len(blob)])


@FUZZ
@given(which=stream, flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1, max_size=3))
def test_flipped_bits_raise(which, flips):
    bad = bytearray(STREAMS[which][0])
    for pos, bit in flips:
        bad[pos % len(bad)] ^= 1 << bit
    if bytes(bad) == STREAMS[which][0]:
        return  # the flips cancelled out
    with pytest.raises(ValueError):
        szf.SZTensor.from_bytes(bytes(bad))


@FUZZ
@given(which=stream, edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=3))
def test_lane_index_and_layout_edits_with_a_valid_crc_never_decode_wrong(which, edits):
    """Layout fields (chunk, lanes, payload bits) and lane lengths rewritten, the CRC recomputed:
    parsing or decoding raises ValueError, or the stream still decodes to exactly the same values;
    never other values, never an IndexError (an out-of-bounds read)."""
    blob, structural, ref = STREAMS[which]
    bad = bytearray(blob[:-4])
    for pos, x in edits:
        bad[structural[pos % len(structural)]] ^= x
    try:
        c = szf.SZTensor.from_bytes(_with_crc(bytes(bad)))
        out = sz_decompress(c)
    except ValueError:
        return
    assert out.shape == ref.shape and torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(szf.decode_reference(c)), _bits(ref))


@FUZZ
@given(which=stream, a=st.integers(0, 1 << 20), b=st.integers(0, 1 << 20), moved=st.integers(-40, 40))
def test_bits_moved_between_lanes_always_raise(which, a, b, moved):
    """The lane lengths are the stream's only offsets (their prefix sums). Moving bits from one lane
    to another keeps the total, so only the decoders can tell: the first lane whose length changed
    starts where it should and decodes to its true end, which is not where its length says."""
    import dataclasses

    c = szf.SZTensor.from_bytes(STREAMS[which][0])
    a, b = a % c.n_lanes, b % c.n_lanes
    if a == b or moved == 0:
        return
    lb = c.lane_bits.copy()
    lb[a] += moved
    lb[b] -= moved
    with pytest.raises(ValueError):
        c2 = szf.SZTensor.from_bytes(dataclasses.replace(c, lane_bits=lb).to_bytes())
        sz_decompress(c2)
