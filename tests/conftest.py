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


@pytest.fixture(scope="session")
def target_cache(tmp_path_factory):
    """A 6-sample target cache of the tiny target (layers 0 and 2); copy it before damaging it."""
    from d2sd.assets import tiny_target_path
    from d2sd.cache import write_cache
    from d2sd.data import builtin_records, tokenize_chat
    from d2sd.target import load_target

    model, tok = load_target(tiny_target_path())
    samples = [tokenize_chat(r, tok, 96) for r in builtin_records(6, seed=4)]
    out = tmp_path_factory.mktemp("cache") / "c"
    write_cache(out, model, tok, samples, layer_ids=[0, 2], progress=False)
    return out


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
