"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The test models are tiny: a second intra-op thread only adds synchronisation (measured 4-25x
    slower on a 2-core machine with other work on it), so every test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no CUDA device"))])
def device(request) -> str:
    """The device a test runs on: the CPU always, CUDA too where there is one (scripts/gpu_check.sh runs the
    CUDA cases: `pytest -k cuda`)."""
    return request.param
