"""Shared test helpers: one relative-error measure, float64 upcasts, NaN poisoning."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives inf, so it never passes)."""
    out = out.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    diff = (out - ref).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def f64(*ts):
    """Detached float64 leaf copies that require grad (for reference gradients)."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def grads(ts):
    return [None if t.grad is None else t.grad.detach() for t in ts]
