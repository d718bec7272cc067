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
