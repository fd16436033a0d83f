"""Checkpoints that lose nothing: atomic, checksummed, last K kept.

Layout of one checkpoint ``OUT/checkpoints/step_00000100/``::

    drafter/            drafter.save_pretrained(...) (config.json + model.safetensors)
    trainer_state.pt    optimizer, scheduler, step, data position, RNG states, run arguments
    manifest.json       written last: step and the size + sha256 of every other file

A checkpoint is written into a hidden temp dir next to its final place, every file is fsynced,
then the dir is renamed (atomic on POSIX) and the parent fsynced. A directory without a valid
manifest, or whose files do not match it, is corrupt and never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = [
    "CorruptCheckpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "load_trainer_state",
    "capture_rng_state",
    "restore_rng_state",
]

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
DRAFTER_DIR = "drafter"
PREFIX = "step_"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory that is incomplete or does not match its manifest."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def save_checkpoint(
    root: Path,
    step: int,
    write_drafter: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXXX`` atomically and prune all but the newest ``keep_last``.

    ``write_drafter(dir)`` writes the drafter's save_pretrained layout into ``dir``.
    Returns the final path. Call on one rank only.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_drafter(tmp / DRAFTER_DIR)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    files = {}
    for p in _files(tmp):
        _fsync_file(p)
        files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": 1, "step": int(step), "time": time.time(), "files": files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
    # A checkpoint of the same step (e.g. a corrupt one from a killed run) is moved aside
    # first so the rename below never lands inside it.
    stale = None
    if final.exists():
        stale = root / f".stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
    os.replace(tmp, final)
    _fsync_dir(root)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    prune(root, keep_last)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs under ``root`` (valid or not), oldest first by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` valid checkpoints; corrupt ones are left for inspection."""
    if keep_last <= 0:
        return
    valid = [p for p in list_checkpoints(root) if _is_valid(p)]
    for p in valid[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".tmp-*"):
        # Temp dirs of dead writers (a SIGKILL mid-save) are garbage; ours was renamed already.
        shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest and every file's size and sha256. Returns the manifest; raises CorruptCheckpoint."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint(f"{path}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST}: {e}") from None
    if TRAINER_STATE not in files:
        raise CorruptCheckpoint(f"{path}: manifest lists no {TRAINER_STATE}")
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            raise CorruptCheckpoint(f"{path}: missing file {rel}")
        if p.stat().st_size != meta["size"]:
            raise CorruptCheckpoint(f"{path}: {rel} has {p.stat().st_size} bytes, manifest says {meta['size']}")
        if _sha256(p) != meta["sha256"]:
            raise CorruptCheckpoint(f"{path}: {rel} does not match its sha256 (corrupt file)")
    return manifest


def _is_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CorruptCheckpoint:
        return False


def resolve_resume(target: Path, log: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from, given a run dir, its ``checkpoints/`` dir or one checkpoint.

    A run dir resumes from its newest valid checkpoint. A corrupt checkpoint is refused (kept on
    disk, untouched) and the newest valid older one is used instead, with a message saying so.
    Raises FileNotFoundError / CorruptCheckpoint when nothing valid is there.
    """
    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"--resume: {target} does not exist")
    if (target / MANIFEST).exists() or target.name.startswith(PREFIX):
        root, newest_allowed = target.parent, target
    else:
        root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        newest_allowed = None
    cands = list_checkpoints(root)
    if newest_allowed is not None:
        cands = [p for p in cands if int(p.name[len(PREFIX):]) <= int(newest_allowed.name[len(PREFIX):])]
    if not cands:
        raise FileNotFoundError(f"--resume: no checkpoint ({PREFIX}*) found in {root}")
    refused = []
    for p in reversed(cands):
        try:
            verify_checkpoint(p)
        except CorruptCheckpoint as e:
            refused.append(str(e))
            log(f"[d2sd] refusing corrupt checkpoint: {e}; it is kept on disk, trying an older one")
            continue
        if refused:
            log(f"[d2sd] resuming from the older valid checkpoint {p}")
        return p
    raise CorruptCheckpoint("--resume: every checkpoint is corrupt:\n  " + "\n  ".join(refused))


def load_trainer_state(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Trainer state of a verified checkpoint (call ``verify_checkpoint`` first)."""
    return torch.load(Path(path) / TRAINER_STATE, map_location=map_location, weights_only=True)


def capture_rng_state(anchor_generator: Optional[torch.Generator] = None) -> dict:
    """torch / cuda / python / numpy RNG states (+ the anchor generator), in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if anchor_generator is not None:
        state["anchor_generator"] = anchor_generator.get_state()
    return state


def restore_rng_state(state: dict, anchor_generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if anchor_generator is not None and "anchor_generator" in state:
        anchor_generator.set_state(state["anchor_generator"])
