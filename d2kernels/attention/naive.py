"""Naive torch reference of ``varprefix_attention`` (also the ``backend="torch"`` path).

Builds the dense ``[NB, S + NB]`` mask from the mask rule of docs/semantics.md and runs masked softmax attention.
Obviously correct, differentiable through autograd, O(NB * (S + NB)) memory.
"""
from __future__ import annotations

import torch


def varprefix_mask(anchors: torch.Tensor, keep: torch.Tensor, S: int, block_size: int) -> torch.Tensor:
    """Dense visibility mask ``[Bt, N*B, S + N*B]`` (True = query may see key).

    Block ``n`` (slots ``n*B .. n*B+B-1``) sees context keys ``j < anchor_n`` and the ``B`` draft
    slots of block ``n``; a dummy block (``keep=False``) sees nothing. For B=2, S=4, anchors=[2, 1]::

                 ctx 0 1 2 3 | draft 0 1 2 3
        slot 0       1 1 0 0 |       1 1 0 0
        slot 1       1 1 0 0 |       1 1 0 0
        slot 2       1 0 0 0 |       0 0 1 1
        slot 3       1 0 0 0 |       0 0 1 1
    """
    Bt, N = anchors.shape
    B = int(block_size)
    dev = anchors.device
    blk = torch.arange(N * B, device=dev) // B  # [NB] block of each slot
    anc = anchors.long().repeat_interleave(B, dim=1)  # [Bt, NB]
    kp = keep.bool().repeat_interleave(B, dim=1)  # [Bt, NB]
    ctx = torch.arange(S, device=dev)[None, None, :] < anc[:, :, None]  # [Bt, NB, S]
    own = (blk[:, None] == blk[None, :])[None].expand(Bt, -1, -1)  # [Bt, NB, NB]
    return torch.cat([ctx, own], dim=2) & kp[:, :, None]


def varprefix_attention_naive(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """``q [Bt, NB, Hq, D]``, ``k/v_ctx [Bt, S, Hkv, D]``, ``k/v_draft [Bt, NB, Hkv, D]`` -> ``o [Bt, NB, Hq, D]``.

    Computes in float32 (float64 for float64 inputs) and returns ``q.dtype``. Rows with no
    visible key (dummy blocks) are exactly 0 and pass no gradient, without NaN.
    """
    Bt, NB, Hq, D = q.shape
    S, Hkv = k_ctx.shape[1], k_ctx.shape[2]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = torch.cat([k_ctx, k_draft], dim=1).to(cdt).repeat_interleave(G, dim=2)  # [Bt, S+NB, Hq, D]
    v = torch.cat([v_ctx, v_draft], dim=1).to(cdt).repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(cdt), k) * scale  # [Bt, Hq, NB, S+NB]
    mask = varprefix_mask(anchors, keep, S, block_size)[:, None]  # [Bt, 1, NB, S+NB]
    # A finite fill keeps all-masked rows NaN-free; the row factor below zeroes them.
    s = s.masked_fill(~mask, torch.finfo(cdt).min)
    p = torch.softmax(s, dim=-1) * mask.any(dim=-1, keepdim=True)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return o.to(q.dtype)
