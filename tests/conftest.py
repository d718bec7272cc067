"""Test tiers (docs/testing.md): reference vs float64, Triton interpreter on CPU (marked interp),
AOT compile, GPU (marked gpu).

Triton reads TRITON_INTERPRET when a kernel is decorated, so the choice is made here, before
anything imports lowbit.kernels, once for the session:

* no CUDA device: TRITON_INTERPRET=1 (unless set otherwise); the interp tier runs, gpu is skipped;
* a CUDA device: the interpreter stays off (unless TRITON_INTERPRET=1 is set explicitly); the gpu
  tier runs compiled kernels and the interp tier is skipped. `CUDA_VISIBLE_DEVICES= pytest`
  runs the interp tier on such a machine.

A gpu test fails (never silently passes) if it finds the interpreter on. The compile tier runs in
a subprocess with the interpreter off (lowbit._aot).
"""

import os
import zlib

import pytest
import torch  # does not import triton

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("LOWBIT_POISON", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "interp: Triton kernels on CPU tensors under TRITON_INTERPRET=1 "
                                       "(skipped where the interpreter is off, e.g. on a CUDA machine)")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="gpu tier: no CUDA device")
    no_interp = pytest.mark.skip(reason="interp tier: TRITON_INTERPRET is not 1 in this session (a CUDA device is "
                                        "present); run `CUDA_VISIBLE_DEVICES= python -m pytest -m interp`")
    for item in items:
        if item.get_closest_marker("gpu") and not CUDA:
            item.add_marker(no_cuda)
        if item.get_closest_marker("interp") and not INTERPRETER:
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _tier_guard(request):
    if request.node.get_closest_marker("gpu"):
        # The interpreter would run "GPU" tests through numpy on the host and pass without ever
        # compiling a kernel.
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.fail("gpu tier under TRITON_INTERPRET=1: these tests must run compiled kernels; unset "
                        "TRITON_INTERPRET (conftest leaves it off when CUDA is present)", pytrace=False)
        from tests.helpers import kernels_interpreted

        if kernels_interpreted():
            pytest.fail("gpu tier: lowbit.kernels was decorated under the Triton interpreter", pytrace=False)
    yield


SESSION_SEED = int(os.environ.get("LOWBIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    tiers = "gpu (compiled kernels)" if CUDA and not INTERPRETER else "interp (Triton interpreter)"
    if CUDA and INTERPRETER:
        tiers = "interp; the gpu tier will fail (TRITON_INTERPRET=1 with a CUDA device)"
    return [f"lowbit test seed: LOWBIT_TEST_SEED={SESSION_SEED} (set it to replay a run)",
            f"lowbit kernel tier: {tiers}"]


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs every run; a failing run is replayed with the printed LOWBIT_TEST_SEED.
    torch.manual_seed((SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The header is hidden under -q (make test): repeat the seed where a failure report is read.
    terminalreporter.write_line(f"lowbit test seed: LOWBIT_TEST_SEED={SESSION_SEED}")
