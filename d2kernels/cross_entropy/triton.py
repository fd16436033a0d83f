"""Triton kernels and host launchers (not available yet)."""
from __future__ import annotations


def __getattr__(name):
    raise NotImplementedError(f"backend='triton' is not available yet for this op ({name})")
