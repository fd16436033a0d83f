"""Benchmarks time GPU kernels: without a CUDA device every benchmark is skipped (the Triton
interpreter's timings mean nothing)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks time GPU kernels)")
    for item in items:
        item.add_marker(skip)
