"""Test setup: without a CUDA device, run Triton kernels through the interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, so this runs at collection
start. Tests marked ``gpu`` are skipped without a CUDA device; on a GPU machine the same suite
runs every case natively.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU-only case; CPU runs the interpreter at small shapes)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
