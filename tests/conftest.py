import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so thresholds are deterministic."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one thread avoids OpenMP spinning and is bitwise stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
