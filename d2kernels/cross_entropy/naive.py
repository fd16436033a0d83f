"""Naive torch reference of ``decayed_cross_entropy`` (also the ``backend="torch"`` path).

Materializes logits of the supervised tokens only (unsupervised tokens cost nothing).
"""
from __future__ import annotations

from typing import Optional

import torch


def decayed_cross_entropy_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [T, H]``, ``weight [V, H]``, ``labels [T]``, ``token_weights [T]`` float32.

    Returns ``num = Σ w·CE`` (float32, float64 for float64 inputs), ``den = Σ w`` and per-token
    ``correct [T]`` bool (argmax == label; False where w == 0).
    """
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    sel = token_weights > 0
    h = hidden[sel].to(cdt)
    logits = h @ weight.to(cdt).t()  # [T_sup, V]
    if softcap is not None and softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    lab = labels[sel].long()
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(1, lab[:, None]).squeeze(1)
    w = token_weights[sel].to(cdt)
    num = (w * ce).sum()
    den = token_weights.to(cdt).sum()
    correct = torch.zeros_like(sel)
    correct[sel] = logits.argmax(dim=-1) == lab
    return num, den, correct
