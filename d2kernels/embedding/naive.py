"""Naive torch reference of ``noise_embedding`` (also the ``backend="torch"`` path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import draft_token_ids


def noise_embedding_naive(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> torch.Tensor:
    """``weight [V, H]`` -> ``[Bt, N*B, H]``: the embedding of every draft slot's input token."""
    ids = draft_token_ids(input_ids, anchors, keep, prefix_lens, block_size, mask_token_id)
    return F.embedding(ids, weight)
