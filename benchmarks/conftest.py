"""CPU micro-benchmarks (`make bench` = `pytest benchmarks -q --benchmark-only`): one torch thread,
fixed seed, small shapes, bounded rounds; the whole suite takes about 20 s on 2 CPU cores.

The files are named after the family they time (bench_nf4.py, bench_intq.py, bench_sz.py); the
repo's pytest.ini keeps pytest's default `test_*.py` pattern, so the hook below collects
`bench_*.py` here. Their functions keep the `test_` prefix that pytest looks for."""

import pytest
import torch

K, N = 1024, 512  # weight [N, K]


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _one_thread_fixed_seed():
    # One thread: stable numbers on a shared 2-core machine (multi-threaded tiny ops stall there).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def w():
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.fixture(scope="session")
def x():
    return torch.randn(16, K, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def rounds():
    """pedantic() arguments: 10 timed rounds of one call after one warm-up round."""
    return dict(rounds=10, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="session")
def close():
    """close(y, ref, tol): assert the relative Frobenius error of y against ref is below tol, so a
    broken op fails instead of timing garbage."""

    def check(y, ref, tol):
        err = float((y.double() - ref.double()).norm() / ref.double().norm())
        assert err < tol, f"relative error {err:.3e} >= {tol}"

    return check
