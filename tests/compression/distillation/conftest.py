import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny-model training is dominated by per-op threading overhead on a busy 2-core box: one
    thread is an order of magnitude faster here. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
