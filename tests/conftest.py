import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """The tests' tensors are tiny: a second intra-op thread only adds contention (4x slower measured here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
