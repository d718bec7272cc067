"""Test tiers (see README): reference vs float64, Triton interpreter on CPU, AOT compile, GPU.

TRITON_INTERPRET must be set before anything imports triton.language.jit decorators, so it is
set here, at collection time, for the whole session; the compile tier runs in a subprocess with
it unset (lowbit._aot).
"""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("LOWBIT_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SESSION_SEED = int(os.environ.get("LOWBIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"lowbit test seed: LOWBIT_TEST_SEED={SESSION_SEED} (set it to replay a run)"


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs every run; a failing run is replayed with the printed LOWBIT_TEST_SEED.
    torch.manual_seed((SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The header is hidden under -q (make test): repeat the seed where a failure report is read.
    terminalreporter.write_line(f"lowbit test seed: LOWBIT_TEST_SEED={SESSION_SEED}")
