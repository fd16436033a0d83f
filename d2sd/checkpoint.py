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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from .models.checkpoint import CONFIG_NAME, WEIGHTS_INDEX_NAME, readable_by_all, shard_name, write_json

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
    "AsyncCheckpointer",
    "HostSnapshot",
]

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
TRAINER_TENSORS = "trainer_state.safetensors"  # the trainer state's tensors, by reference from TRAINER_STATE
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
    write_drafter: Callable[[Path], Optional[dict[str, str]]],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXXX`` atomically and prune all but the newest ``keep_last``.

    ``write_drafter(dir)`` writes the drafter's save_pretrained layout into ``dir``; it may return
    ``{path relative to dir: sha256}`` for files whose hash it already knows (a hard-linked frozen
    shard), which are then not read again. Returns the final path. Call on one rank only.
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
    prune(root, keep_last, newest_good=final)
    return final


def _write_tmp(tmp: Path, step: int, write_drafter: Callable[[Path], Optional[dict[str, str]]],
               trainer_state: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    known = write_drafter(tmp / DRAFTER_DIR) or {}
    known = {str(Path(DRAFTER_DIR) / k): v for k, v in known.items()}
    # The state's tensors (AdamW moments: gigabytes) go to a safetensors file written by plain file
    # writes, which release the GIL; torch.save keeps the small rest. torch.save and safetensors'
    # save_file hold the GIL for much of their work, which a background save must not do to the
    # training thread. Through a Python file: a failed write raises OSError (ENOSPC), not the zip
    # writer's "unexpected pos".
    skeleton, tensors = split_tensors(trainer_state)
    if tensors:
        write_safetensors(tmp / TRAINER_TENSORS, tensors)
    with open(tmp / TRAINER_STATE, "wb") as f:
        torch.save(skeleton, f)
    files = {}
    for p in _files(tmp):
        rel = str(p.relative_to(tmp))
        _fsync_file(p)
        files[rel] = {"size": p.stat().st_size, "sha256": known.get(rel) or _sha256(p)}
    manifest = {"format": 1, "step": int(step), "time": time.time(), "files": files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


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


def prune(root: Path, keep_last: int, newest_good: Optional[Path] = None) -> None:
    """Remove all but the newest ``keep_last`` valid checkpoints; corrupt ones are left for inspection.

    Only valid checkpoints are counted and removed, so the newest valid one always survives.
    ``newest_good``: the checkpoint this process has just written (good by construction, the newest).
    With it, the others are checked the cheap way (manifest well formed, files present with their
    sizes), not re-hashed: re-reading every kept checkpoint at every save would read gigabytes, and
    whatever is removed is older than a good one. Without it every checkpoint is fully verified.
    """
    if keep_last <= 0:
        return
    cheap = newest_good is not None
    valid = [p for p in list_checkpoints(root) if _is_valid(p, hashes=not cheap)]
    if cheap and (not valid or valid[-1] != Path(newest_good)):
        valid = [p for p in list_checkpoints(root) if _is_valid(p)]  # not the newest after all: be thorough
    for p in valid[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    clean_leftovers(root)


def verify_checkpoint(path: Path, hashes: bool = True) -> dict:
    """Check the manifest and every file's size and sha256 (``hashes=False``: sizes only).

    Returns the manifest; raises CorruptCheckpoint.

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
            if hashes and _sha256(p) != meta["sha256"]:
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


def _is_valid(path: Path, hashes: bool = True) -> bool:
    try:
        verify_checkpoint(path, hashes=hashes)
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
        if (Path(path) / TRAINER_TENSORS).is_file():
            state = join_tensors(state, load_file(str(Path(path) / TRAINER_TENSORS), device=str(map_location)))
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as e:
        raise CorruptCheckpoint(f"{path}: cannot read {TRAINER_STATE}: {e}") from None
    except Exception as e:  # safetensors' SafetensorError has no narrower public base
        if type(e).__name__ != "SafetensorError":
            raise
        raise CorruptCheckpoint(f"{path}: cannot read {TRAINER_TENSORS}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{path}: {TRAINER_STATE} is not a d2sd trainer state")
    return state


_TENSOR_REF = "__d2sd_tensor__"
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def split_tensors(tree: Any, key: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(tree with each tensor replaced by a reference, {reference: tensor})``; ``join_tensors`` inverts it."""
    if isinstance(tree, torch.Tensor):
        return {_TENSOR_REF: key}, {key: tree}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out[k], t = split_tensors(v, f"{key}/{k}")
            tensors.update(t)
        return out, tensors
    if isinstance(tree, (list, tuple)):
        parts = [split_tensors(v, f"{key}/{i}") for i, v in enumerate(tree)]
        for _, t in parts:
            tensors.update(t)
        return type(tree)(p for p, _ in parts), tensors
    return tree, tensors


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_REF}:
            return tensors[tree[_TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(join_tensors(v, tensors) for v in tree)
    return tree


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data), written with
    plain ``file.write`` of each tensor's memory: the GIL is released for the bytes, so a background
    writer does not stall the training thread (``safetensors.torch.save_file`` holds it)."""
    header: dict[str, Any] = {}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{k}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    readable_by_all(path)


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


# ----------------------------------------------------------------------------- background saves


class HostSnapshot:
    """Copies the tensors of a nested state (dicts, lists, tuples) to host memory it keeps.

    On CUDA the buffers are pinned and reused from one save to the next, so a snapshot costs one
    queued device->host copy per tensor (no allocation, no page faults after the first save) and
    ``event`` marks when they are done. CPU tensors are cloned (training mutates them in place).
    """

    def __init__(self):
        self._pool: dict[str, torch.Tensor] = {}
        self.event: Optional[torch.cuda.Event] = None

    def _copy(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cuda":
            return t.clone()
        buf = self._pool.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._pool[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    def reserve(self, tree: Any, key: str = "") -> None:
        """Allocate (without copying) the host buffers ``take(tree, key)`` will use: page-locking
        gigabytes takes seconds, better spent before the first save than inside it."""
        if isinstance(tree, torch.Tensor):
            if tree.device.type == "cuda" and key not in self._pool:
                self._pool[key] = torch.empty(tree.shape, dtype=tree.dtype, pin_memory=True)
        elif isinstance(tree, dict):
            for k, v in tree.items():
                self.reserve(v, f"{key}/{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                self.reserve(v, f"{key}/{i}")

    def drop(self, prefix: str) -> None:
        """Free the buffers of keys under ``prefix``."""
        for k in [k for k in self._pool if k.startswith(prefix)]:
            del self._pool[k]

    def take(self, tree: Any, key: str = "") -> Any:
        if isinstance(tree, torch.Tensor):
            return self._copy(tree, key)
        if isinstance(tree, dict):
            return {k: self.take(v, f"{key}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.take(v, f"{key}/{i}") for i, v in enumerate(tree))
        return tree

    def record(self) -> None:
        """Mark the end of the copies queued so far (no-op without CUDA)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.event = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass
class _FrozenShard:
    path: Path  # the shard inside the newest checkpoint written by this process
    sha256: str
    size: int


class AsyncCheckpointer:
    """Checkpoints written by a background thread: the training loop pays for the device->host copy only.

    A training checkpoint's ``drafter/`` is a Hugging Face sharded folder (``load_drafter`` reads it):
    shard 1 holds the trainable weights, shard 2 the frozen target parts (``frozen``, e.g.
    embed_tokens / lm_head). Shard 2 is written once per process and hard-linked into every later
    checkpoint (its hash is known), so a save writes only what training changed. One save runs at a
    time: ``save`` first waits for the previous one. Errors of the background write surface at the
    next ``save`` or ``wait``.
    """

    def __init__(self, root: Path, keep_last: int, frozen: tuple[str, ...]):
        self.root, self.keep_last, self.frozen = Path(root), keep_last, tuple(frozen)
        self._snap = HostSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._frozen_shard: Optional[_FrozenShard] = None
        self._reserving: Optional[threading.Thread] = None
        self.last_path: Optional[Path] = None
        self.write_seconds: Optional[float] = None  # of the last finished background write
        self.wait_seconds = 0.0  # how long the last save() waited for the write before it

    def reserve(self, model_sd: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> None:
        """Allocate the host buffers of a save of these tensors in the background (call once training
        runs, e.g. after the first optimizer step has created its state)."""
        if self._reserving is None and torch.cuda.is_available():
            self._reserving = threading.Thread(
                target=lambda: (self._snap.reserve(model_sd, "model"), self._snap.reserve(trainer_state, "state")),
                name="d2sd-save-reserve", daemon=True,
            )
            self._reserving.start()

    def _frozen_reusable(self) -> bool:
        f = self._frozen_shard
        return f is not None and f.path.is_file() and f.path.stat().st_size == f.size

    def save(self, step: int, drafter_config: dict, model_sd: dict[str, torch.Tensor],
             trainer_state: dict[str, Any]) -> Path:
        """Snapshot ``model_sd`` and ``trainer_state`` to host and write checkpoint ``step`` in the background."""
        t0 = time.time()
        self.wait()
        if self._reserving is not None:
            self._reserving.join()
        self.wait_seconds = time.time() - t0
        reuse = self._frozen_reusable()
        sd = {k: v for k, v in model_sd.items() if not (reuse and k in self.frozen)}
        host_sd = self._snap.take(sd, "model")
        host_state = self._snap.take(trainer_state, "state")
        self._snap.record()
        final = self.root / step_dir_name(step)
        frozen_keys = [k for k in model_sd if k in self.frozen]
        self._thread = threading.Thread(
            target=self._write, args=(step, drafter_config, host_sd, frozen_keys, host_state, reuse),
            name=f"d2sd-save-{step}", daemon=True,
        )
        self._thread.start()
        return final

    def wait(self) -> Optional[Path]:
        """Block until the save in flight is on disk; re-raise its error. Returns its path."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self.last_path

    def _write(self, step, drafter_config, host_sd, frozen_keys, host_state, reuse_frozen: bool) -> None:
        t0 = time.time()
        try:
            self._snap.wait()
            frozen_name = None

            def write_drafter(d: Path) -> dict[str, str]:
                nonlocal frozen_name
                d.mkdir(parents=True, exist_ok=True)
                write_json(drafter_config, str(d / CONFIG_NAME))
                trainable = {k: v for k, v in host_sd.items() if k not in self.frozen}
                files = [shard_name(1, 2), shard_name(2, 2)]
                meta = {"format": "pt", "d2sd_format": "deepspec"}
                write_safetensors(d / files[0], trainable, metadata=meta)
                known = {}
                frozen_name = files[1]
                if reuse_frozen:
                    try:
                        os.link(self._frozen_shard.path, d / files[1])
                    except OSError:  # a file system without hard links: copy once more
                        shutil.copyfile(self._frozen_shard.path, d / files[1])
                    known[files[1]] = self._frozen_shard.sha256
                else:
                    write_safetensors(d / files[1], {k: host_sd[k] for k in frozen_keys}, metadata=meta)
                weight_map = {k: files[0] for k in trainable} | {k: files[1] for k in frozen_keys}
                write_json({"metadata": {"format": "pt"}, "weight_map": weight_map}, str(d / WEIGHTS_INDEX_NAME))
                return known

            path = save_checkpoint(self.root, step, write_drafter, host_state, self.keep_last)
            manifest = json.loads((path / MANIFEST).read_text())
            rel = str(Path(DRAFTER_DIR) / frozen_name)
            shard = path / rel
            self._frozen_shard = _FrozenShard(shard, manifest["files"][rel]["sha256"], shard.stat().st_size)
            for k in self.frozen:  # later saves link the shard: its host buffers are not needed again
                self._snap.drop(f"model/{k}")
            self.last_path = path
        except BaseException as e:  # re-raised in the training thread by the next save / wait
            self._error = e
        finally:
            self.write_seconds = time.time() - t0
