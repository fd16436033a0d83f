"""Experiment trackers of ``python -m d2sd.train --report-to``: TensorBoard and Weights & Biases.

``open_trackers(names, out, config, resume_step)`` -> trackers with ``log(row)`` (``row["step"]`` is
the x axis; numbers are logged, lists as ``key/i``) and ``close()``. metrics.jsonl is always written
by the trainer itself. wandb is optional (``pip install wandb``); ``WANDB_MODE=offline`` works with
no network (``wandb sync`` uploads later); the run id is kept in ``<out>/wandb_run_id`` so a
resumed run continues the same wandb run. ``WANDB_PROJECT`` / ``WANDB_ENTITY`` pick where it goes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["TRACKERS", "parse_report_to", "check_report_to", "open_trackers", "Tracker"]

TRACKERS = ("tensorboard", "wandb")


class Tracker:
    """``scalar(name, value, step)`` per number; subclasses add the backend."""

    def log(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, (list, tuple)):
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)):
                        self.scalar(f"{k}/{i}", x, step)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self.scalar(k, v, step)
        self.flush(step)

    def scalar(self, name: str, value: float, step: int) -> None:
        raise NotImplementedError

    def flush(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def scalar(self, name, value, step):
        self.writer.add_scalar(name, value, step)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: Optional[dict] = None, resume_step: Optional[int] = None):
        import os
        import uuid

        import wandb

        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "d2sd"), name=out.name, id=run_id, resume="allow",
            dir=str(out), config=config or {},
        )
        self.pending: dict[str, float] = {}

    def scalar(self, name, value, step):
        self.pending[name] = value

    def flush(self, step):
        self.run.log(self.pending, step=step)
        self.pending = {}

    def close(self):
        self.run.finish()


BACKENDS: dict[str, Callable[..., Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` -> ``[]``."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"--report-to: unknown tracker(s) {bad}; choose from {', '.join(TRACKERS)} or none")
    return list(dict.fromkeys(names))


def check_report_to(value: str) -> list[str]:
    """``parse_report_to``, plus ``ImportError`` when an explicitly named tracker is not installed."""
    import importlib.util

    names = parse_report_to(value)
    for name in names:
        module = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"--report-to {name}: {module} is not installed ({INSTALL[name]})")
    return names


def open_trackers(names: Sequence[str], out: Path, config: Optional[dict[str, Any]] = None,
                  resume_step: Optional[int] = None, required: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> list[Tracker]:
    """Start the named trackers. A missing package raises ``ImportError`` for names in ``required``
    (asked for explicitly) and is logged and skipped for the others (the TensorBoard default)."""
    trackers = []
    for name in names:
        try:
            trackers.append(BACKENDS[name](out, config=config, resume_step=resume_step))
        except ImportError as e:
            if name in required:
                raise ImportError(f"--report-to {name}: {e} ({INSTALL[name]})") from None
            log(f"{name} is not installed: metrics go to metrics.jsonl only ({INSTALL[name]})")
    return trackers
