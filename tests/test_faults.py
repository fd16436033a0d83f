"""Fault injection (issue #24): kill -9 at random points of a save, manifest bit flips, a real full disk.

Each case is seconds on 2 cores: the kills hit a child process that only saves checkpoints, the
full disk is a 1 MiB tmpfs (skipped where mounting is not allowed).
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from d2sd import checkpoint as ckpt
from d2sd import train

REPO = Path(__file__).resolve().parents[1]

SAVER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from d2sd import checkpoint as ckpt

    root = sys.argv[1]
    w = torch.randn(512, 512)

    def write(d):
        d.mkdir(parents=True)
        save_file({"w": w}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")

    step = int(sys.argv[2])
    while True:
        step += 1
        ckpt.save_checkpoint(root, step, write, {"step": step, "opt": torch.randn(256, 512)}, keep_last=2)
        print(step, flush=True)
""")


def _writer(nbytes):
    """A write_drafter that writes one file of ``nbytes``."""
    def write(d):
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(b"w" * nbytes)

    return write


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def test_kill_9_at_random_points_of_a_save_never_loses_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    rng = random.Random(24)
    for trial in range(4):
        start = 1000 * trial
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(root), str(start)], env=_env(),
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip(), "the saver did not start"  # at least one save finished
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        best = ckpt.resolve_resume(tmp_path, log=lambda m: None)
        manifest = ckpt.verify_checkpoint(best)
        assert ckpt.load_trainer_state(best)["step"] == manifest["step"]
        # The next save (as a resumed run makes) cleans what the killed one left and keeps going.
        step = start + 999
        ckpt.save_checkpoint(root, step, _writer(1), {"step": step}, keep_last=2)
        assert not [q for q in root.iterdir() if q.name.startswith(".")]


def test_every_1_bit_flip_of_a_manifest_is_valid_or_corrupt_never_a_crash(tmp_path):
    """Issue #24 item 3: 5% of 1-bit variants crashed verify / resume / prune."""
    root = tmp_path / "checkpoints"
    older = ckpt.save_checkpoint(root, 1, _writer(32), {"step": 1}, keep_last=5)
    newest = ckpt.save_checkpoint(root, 2, _writer(32), {"step": 2}, keep_last=5)
    m = newest / ckpt.MANIFEST
    good = m.read_bytes()
    outcomes = {"valid": 0, "corrupt": 0}
    for bit in range(len(good) * 8):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        m.write_bytes(bytes(flipped))
        try:
            ckpt.verify_checkpoint(newest)
            outcomes["valid"] += 1
        except ckpt.CorruptCheckpoint:
            outcomes["corrupt"] += 1
            assert ckpt.resolve_resume(tmp_path, log=lambda s: None) == older
        # Never raises; with the newest corrupt, the older one is the newest valid and stays.
        ckpt.prune(root, keep_last=1 if outcomes["corrupt"] and not ckpt._is_valid(newest) else 5)
        assert older.exists() and newest.exists()
    assert outcomes["corrupt"] > outcomes["valid"] > 0  # flips in "time" digits stay valid


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk_fails_one_save_cleanly(tiny_disk):
    root = tiny_disk / "checkpoints"
    small = _writer(1000)
    first = ckpt.save_checkpoint(root, 1, small, {"step": 1}, keep_last=2)
    with pytest.raises(ckpt.CheckpointWriteError, match="no space left"):
        ckpt.save_checkpoint(root, 2, small, {"step": 2, "big": torch.zeros(400_000)}, keep_last=2)
    assert [p.name for p in root.iterdir()] == [first.name]
    ckpt.verify_checkpoint(first)
    ckpt.save_checkpoint(root, 3, small, {"step": 3}, keep_last=2)  # space came back: saves work again


def test_training_onto_a_full_disk_exits_with_one_line(tiny_disk, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    answer = "Tom starts with 12 apples . 12 + 7 = 19 . The answer is 19 ."
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Tom has 12 apples ."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    out = tiny_disk / "run"
    rc = train.main(["--data", str(data), "--out", str(out), "--max-steps", "1", "--global-batch-size", "1",
                     "--micro-batch-size", "1", "--num-anchors", "4", "--max-length", "64"])
    err = capsys.readouterr().err
    assert rc == train.EXIT_STOPPED and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("python -m d2sd.train")]
    assert "no space left" in line and "older checkpoints are intact" in line
    assert not [p for p in (out / "checkpoints").iterdir()]
