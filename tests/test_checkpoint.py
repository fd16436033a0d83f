"""d2sd.checkpoint: atomic checksummed checkpoints, pruning, corrupt-checkpoint refusal, RNG round trips."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from d2sd import checkpoint as ckpt


def _writer(weight: torch.Tensor):
    def write(d):
        d.mkdir(parents=True)
        save_file({"w": weight.contiguous()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"n": weight.numel()}))

    return write


def _save(root, step, keep_last=3, value=None):
    w = torch.full((5, 3), float(step if value is None else value))
    state = {"step": step, "optimizer": {"state": {}, "param_groups": []}, "rng": ckpt.capture_rng_state()}
    return ckpt.save_checkpoint(root, step, _writer(w), state, keep_last)


def test_save_writes_layout_and_manifest(tmp_path):
    path = _save(tmp_path, 7)
    assert path.name == "step_00000007"
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["step"] == 7
    # the state's tensors (here the RNG states) sit in trainer_state.safetensors, the rest in trainer_state.pt
    assert set(manifest["files"]) == {"drafter/model.safetensors", "drafter/config.json", "trainer_state.pt",
                                      "trainer_state.safetensors"}
    assert torch.equal(load_file(str(path / "drafter" / "model.safetensors"))["w"], torch.full((5, 3), 7.0))
    assert ckpt.load_trainer_state(path)["step"] == 7
    assert not list(tmp_path.glob(".tmp-*")), "temp dir left behind"


def test_keep_last_prunes_oldest(tmp_path):
    for s in (2, 4, 6, 8, 10):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000008", "step_00000010"]


def test_same_step_is_replaced(tmp_path):
    _save(tmp_path, 3, value=1.0)
    path = _save(tmp_path, 3, value=2.0)
    ckpt.verify_checkpoint(path)
    assert torch.equal(load_file(str(path / "drafter" / "model.safetensors"))["w"], torch.full((5, 3), 2.0))
    assert not list(tmp_path.glob(".stale-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "no-manifest", "bad-manifest", "missing-file"])
def test_corrupt_newest_is_refused_and_older_used(tmp_path, damage):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _save(root, 2)
    newest = _save(root, 4)
    f = newest / "drafter" / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "flip-byte":
        b = bytearray(f.read_bytes())
        b[-1] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "no-manifest":
        (newest / ckpt.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (newest / ckpt.MANIFEST).write_text("{not json")
    else:
        (newest / ckpt.TRAINER_STATE).unlink()
    with pytest.raises(ckpt.CorruptCheckpoint):
        ckpt.verify_checkpoint(newest)
    messages = []
    for where in (run, root, newest):
        messages.clear()
        assert ckpt.resolve_resume(where, log=messages.append) == root / "step_00000002"
        assert any("refusing corrupt checkpoint" in m and "step_00000004" in m for m in messages)
        assert any("older valid checkpoint" in m for m in messages)
    assert newest.exists(), "a corrupt checkpoint must be kept for inspection"


def test_everything_corrupt_raises(tmp_path):
    p = _save(tmp_path, 1)
    (p / ckpt.TRAINER_STATE).write_bytes(b"garbage")
    with pytest.raises(ckpt.CorruptCheckpoint, match="every checkpoint is corrupt"):
        ckpt.resolve_resume(tmp_path, log=lambda m: None)


def test_resume_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_resume(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve_resume(tmp_path)


def test_interrupted_save_leftovers_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 1)
    # What a SIGKILL in the middle of a save leaves: a half-written temp dir.
    junk = tmp_path / ".tmp-step_00000002-999999"
    junk.mkdir()
    (junk / "trainer_state.pt").write_bytes(b"half")
    assert ckpt.resolve_resume(tmp_path) == tmp_path / "step_00000001"
    _save(tmp_path, 3)
    assert not junk.exists()


def test_rng_round_trip():
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    gen.manual_seed(4)
    torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state(gen)
    want = (torch.rand(4), random.random(), np.random.randn(2), torch.rand(3, generator=gen))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    gen.manual_seed(99)
    ckpt.restore_rng_state(state, gen)
    got = (torch.rand(4), random.random(), np.random.randn(2), torch.rand(3, generator=gen))
    assert torch.equal(want[0], got[0])
    assert want[1] == got[1]
    assert np.array_equal(want[2], got[2])
    assert torch.equal(want[3], got[3])


def test_rng_state_survives_weights_only_load(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.save({"rng": ckpt.capture_rng_state(gen)}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["rng"]
    ckpt.restore_rng_state(state, gen)
    a = (np.random.rand(3), torch.rand(3, generator=gen))
    ckpt.restore_rng_state(state, gen)
    assert np.array_equal(a[0], np.random.rand(3))
    assert torch.equal(a[1], torch.rand(3, generator=gen))
