"""What the command-line entry points (train, eval) share: the bad-input error and the console log."""
from __future__ import annotations

import os

__all__ = ["UsageError", "log"]


class UsageError(Exception):
    """Bad input found before the command does any work: printed as one line without a traceback
    (exit status 2), nothing is lost."""


def log(msg: str, prefix: str = "d2sd") -> None:
    """One line on stdout, flushed; under torchrun only rank 0 prints (one copy of each message)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[{prefix}] {msg}", flush=True)
