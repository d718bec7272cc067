"""CPU micro-benchmarks (`make bench`): one torch thread, fixed seed, small shapes."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_fixed_seed():
    # One thread: stable numbers on a shared 2-core machine (multi-threaded tiny ops stall there).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(old)
