"""Backend lookup for the custom ops: each fast backend is a module of host launchers."""
from __future__ import annotations

import importlib
from types import ModuleType


def fast_impl(impl: str, op: str) -> ModuleType:
    """Module holding op ``op``'s launchers for backend ``impl`` ("triton" or "cuda")."""
    if impl == "triton":
        return importlib.import_module(f"d2kernels.{op}.triton")
    if impl == "cuda":
        from . import cuda

        cuda.load_library()  # raises with the build commands when the library is missing
        return cuda
    raise ValueError(f"unknown fast backend {impl!r}")
