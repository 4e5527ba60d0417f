"""Test set-up: `gpu` tests skip without CUDA (cnndsl.kernels itself switches Triton to
its interpreter there); every test starts from the same seed; under pytest-xdist each worker
computes on one thread (the workers already fill the cores: more threads only contend)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(10)
