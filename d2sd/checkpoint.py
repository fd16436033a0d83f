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

import errno
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
    "CheckpointWriteError",
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


class CheckpointWriteError(RuntimeError):
    """A save that could not finish (disk full, permissions): its temp dir is gone, older checkpoints intact."""


# Temp dirs being written by this process (a background save must not be cleaned as a leftover).
_WRITING: set[str] = set()


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
    clean_leftovers(root)
    _WRITING.add(str(tmp))
    try:
        _write_tmp(tmp, step, write_drafter, trainer_state)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise CheckpointWriteError(
                f"cannot write checkpoint {final}: no space left on {root} ({e}); the partial save was removed, "
                "older checkpoints are intact; free space and --resume"
            ) from None
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"cannot write checkpoint {final}: {e}; older checkpoints are intact") from None
        raise
    finally:
        _WRITING.discard(str(tmp))
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


def _write_tmp(tmp: Path, step: int, write_drafter: Callable[[Path], None], trainer_state: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_drafter(tmp / DRAFTER_DIR)
    # Through a Python file: a failed write raises OSError (ENOSPC), not the zip writer's "unexpected pos".
    with open(tmp / TRAINER_STATE, "wb") as f:
        torch.save(trainer_state, f)
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


def readable_by_all(path) -> None:
    """Mode 0666 & ~umask, as a plain open() would give (some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer and safetensors report a failed write as their own error type.
    text = str(e).lower()
    return "no space left" in text or "unexpected pos" in text or "file write failed" in text


def clean_leftovers(root: Path) -> None:
    """Remove temp / stale dirs of interrupted saves (a SIGKILL or a full disk mid-save)."""
    for p in list(Path(root).glob(".tmp-*")) + list(Path(root).glob(".stale-*")):
        if str(p) not in _WRITING:
            shutil.rmtree(p, ignore_errors=True)


def output_path_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` (existing or to be created) cannot hold output, or None: checked before any work."""
    for parent in (Path(folder), *Path(folder).parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            return None
    return None


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
    """Remove all but the newest ``keep_last`` valid checkpoints; corrupt ones are left for inspection.

    Only valid checkpoints are counted and removed, so the newest valid one always survives.
    """
    if keep_last <= 0:
        return
    valid = [p for p in list_checkpoints(root) if _is_valid(p)]
    for p in valid[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    clean_leftovers(root)


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest and every file's size and sha256. Returns the manifest; raises CorruptCheckpoint.

    Any malformed manifest (not JSON, not an object, missing or mistyped keys, a file outside the
    checkpoint, a step that disagrees with the dir name) is corrupt, never a KeyError / TypeError.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint(f"{path}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
        files = _check_manifest(manifest, path)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST}: {e}") from None
    for rel, meta in files.items():
        p = path / rel
        try:
            if not p.is_file():
                raise CorruptCheckpoint(f"{path}: missing file {rel}")
            if p.stat().st_size != meta["size"]:
                raise CorruptCheckpoint(f"{path}: {rel} has {p.stat().st_size} bytes, manifest says {meta['size']}")
            if _sha256(p) != meta["sha256"]:
                raise CorruptCheckpoint(f"{path}: {rel} does not match its sha256 (corrupt file)")
        except OSError as e:
            raise CorruptCheckpoint(f"{path}: cannot read {rel}: {e}") from None
    return manifest


def _check_manifest(m: Any, path: Path) -> dict:
    """The manifest's ``files`` table after checking every key and type; ValueError otherwise."""
    if not isinstance(m, dict):
        raise ValueError(f"not a JSON object but {type(m).__name__}")
    step, files = m.get("step"), m.get("files")
    if type(step) is not int or step < 0:
        raise ValueError(f"'step' must be an integer >= 0, got {step!r}")
    if path.name.startswith(PREFIX) and path.name != step_dir_name(step):
        raise ValueError(f"'step' {step} does not match the directory name")
    if not isinstance(files, dict):
        raise ValueError(f"'files' must be an object, got {type(files).__name__}")
    if TRAINER_STATE not in files:
        raise ValueError(f"lists no {TRAINER_STATE}")
    for rel, meta in files.items():
        if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise ValueError(f"file name {rel!r} points outside the checkpoint")
        if not isinstance(meta, dict) or type(meta.get("size")) is not int or not isinstance(meta.get("sha256"), str):
            raise ValueError(f"entry of {rel!r} needs an integer 'size' and a string 'sha256', got {meta!r}")
    return files


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
            log(f"refusing corrupt checkpoint: {e}; it is kept on disk, trying an older one")
            continue
        if refused:
            log(f"resuming from the older valid checkpoint {p}")
        return p
    raise CorruptCheckpoint(f"--resume: every checkpoint is corrupt in {root} ({len(refused)} refused, reasons above)")


def load_trainer_state(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Trainer state of a verified checkpoint (call ``verify_checkpoint`` first); CorruptCheckpoint if unreadable."""
    try:
        state = torch.load(Path(path) / TRAINER_STATE, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CorruptCheckpoint(f"{path}: cannot read {TRAINER_STATE}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{path}: {TRAINER_STATE} is not a d2sd trainer state")
    return state


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
