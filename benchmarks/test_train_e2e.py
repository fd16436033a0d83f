"""``python -m d2sd.train`` end to end on the GPU at the Qwen3-4B shape (pytest-benchmark).

One round per mode: the harness in ``train_e2e.py`` builds the random-weight Qwen3-4B-shaped
target and 3-4k-token chat records once (reused across modes under ``$D2SD_E2E_WORK`` or a temp
dir), runs the real entry point in a subprocess and puts tokens/s, ms per step, the first step's
seconds, the save stall and peak memory in ``extra_info``. The timed value is the whole command.
"""
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.train_e2e import Setup, run_mode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = os.environ.get("D2SD_E2E_WORK")
    return Setup(Path(work) if work else tmp_path_factory.mktemp("e2e"), steps=24, save_every=8)


@pytest.mark.parametrize("mode", ["online", "cache"])
def test_train_e2e(benchmark, setup, mode):
    setup.prepare()  # target + records once, outside the timed round
    result = {}

    def run():
        result["r"] = run_mode(setup, mode)

    benchmark.group = "python -m d2sd.train, qwen3-4b preset, Qwen3-4B-shaped target, S 3-4k, gbs 2"
    benchmark.pedantic(run, rounds=1, iterations=1)
    r = result["r"]
    benchmark.extra_info.update({k: v for k, v in asdict(r).items() if k != "extra"})
    assert r.final_loss == r.final_loss  # finite losses, the run completed
    assert r.tokens_per_s > 0
