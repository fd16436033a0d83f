"""Input validation shared by every op: one place for the error messages."""
from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_block_size(block_size) -> int:
    B = int(block_size)
    if B < 1 or B != block_size:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size}")
    return B


def check_int_tensor(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_float_tensor(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {listing}")
    return first


_VALIDATION_MODES = ("sync", "async", "off")
_validation = os.environ.get("D2KERNELS_VALIDATE", "sync")
if _validation not in _VALIDATION_MODES:
    raise ValueError(f"D2KERNELS_VALIDATE must be one of {_VALIDATION_MODES}, got {_validation!r}")


def set_validation(mode: str) -> str:
    """How data-dependent checks (ids, labels, anchors in range) run; returns the previous mode.

    ``"sync"`` (default): a ValueError naming the bad values (one host sync per check).
    ``"async"``: on CUDA a device-side assert that never stalls the host; a failure surfaces at
    the next sync and leaves the CUDA context unusable, so use it only on data you trust.
    ``"off"``: no check (callers that validated their inputs once, e.g. a model's forward).
    """
    global _validation
    if mode not in _VALIDATION_MODES:
        raise ValueError(f"validation mode must be one of {_VALIDATION_MODES}, got {mode!r}")
    prev, _validation = _validation, mode
    return prev


@contextlib.contextmanager
def validation(mode: str):
    """``with d2kernels.validation("off"): ...`` sets the mode for a block (see ``set_validation``)."""
    prev = set_validation(mode)
    try:
        yield
    finally:
        set_validation(prev)


def _out_of_range(t: torch.Tensor, low: int, high: int, where: torch.Tensor | None) -> torch.Tensor:
    bad = (t < low) | (t >= high)
    return bad if where is None else bad & where


def validation_mode() -> str:
    """The current mode of the data-dependent checks (see ``set_validation``)."""
    return _validation


def raise_range_error(name: str, t: torch.Tensor, low: int, high: int, where: torch.Tensor | None = None) -> None:
    """The ValueError of a failed range check, naming the count and a few bad values."""
    vals = t[_out_of_range(t, low, high, where)]
    raise ValueError(f"{name} out of range [{low}, {high}): {vals.numel()} bad value(s), e.g. {vals[:4].tolist()}")


def check_range(name: str, t: torch.Tensor, low: int, high: int, where: torch.Tensor | None = None) -> None:
    """Check that every (selected) value lies in ``[low, high)`` (see ``set_validation``).

    Skipped while ``torch.compile`` traces, where a data-dependent branch would break the graph.
    """
    if t.numel() == 0 or _validation == "off" or torch.compiler.is_compiling():
        return
    bad = _out_of_range(t, low, high, where)
    if t.device.type == "cuda" and _validation == "async":
        torch._assert_async(~bad.any(), f"{name} out of range [{low}, {high})")
    elif bool(bad.any()):
        raise_range_error(name, t, low, high, where)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'cuda', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend
