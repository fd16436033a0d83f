"""Block layout of DFlash / D2 (variable-prefix) drafter training, in plain torch.

Everything here works on tiny integer tensors on any device; the kernels read the
results (anchors, keep, prefix_lens) directly, so no mask tensor is ever built.
Shapes: batch ``Bt``, sequence ``S``, anchors per sample ``N``, block size ``B``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import check_block_size, check_int_tensor, check_range, check_same_device

__all__ = [
    "sample_anchors",
    "sample_prefix_lengths",
    "prefix_length_probs",
    "draft_token_ids",
    "draft_positions",
    "draft_targets",
    "decay_weights",
]

IGNORE_INDEX = -100


def _rand(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    # Draw on the generator's device so a seeded generator reproduces on any device.
    gen_device = generator.device if generator is not None else device
    r = torch.rand(shape, generator=generator, device=gen_device)
    if r.device.type == "cpu" and torch.device(device).type == "cuda":
        # A pageable host->device copy waits for the GPU to drain; a pinned one is queued.
        return r.pin_memory().to(device, non_blocking=True)
    return r.to(device)


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``num_anchors`` distinct anchor positions per sample.

    A candidate is a position ``a`` in ``[0, S-2]`` with ``loss_mask[a]`` and ``loss_mask[a+1]``
    both set. Candidates are drawn uniformly without replacement and sorted ascending; missing
    slots are dummies (``keep=False``, ``anchor=0``) placed after the real anchors.

    Args:
        loss_mask: ``[Bt, S]`` bool or 0/1 integer tensor.
        num_anchors: ``N >= 1``.
    Returns:
        ``anchors [Bt, N]`` long and ``keep [Bt, N]`` bool.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [Bt, S], got shape {tuple(loss_mask.shape)}")
    if int(num_anchors) < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    Bt, S = loss_mask.shape
    N = int(num_anchors)
    device = loss_mask.device
    lm = loss_mask.bool()
    anchors = torch.zeros(Bt, N, dtype=torch.long, device=device)
    keep = torch.zeros(Bt, N, dtype=torch.bool, device=device)
    if S < 2:
        return anchors, keep
    cand = lm[:, :-1] & lm[:, 1:]  # [Bt, S-1]
    # Uniform keys in [0, 1) for candidates, 2 for the rest: the N smallest keys are a uniform
    # draw without replacement among candidates.
    keys = _rand((Bt, S - 1), generator, device)
    keys = torch.where(cand, keys, torch.full_like(keys, 2.0))
    k = min(N, S - 1)
    top_keys, top_idx = torch.topk(keys, k, dim=1, largest=False)
    picked = top_keys < 2.0  # [Bt, k]
    # Sort the real anchors ascending, dummies last.
    sort_key = torch.where(picked, top_idx, torch.full_like(top_idx, S))
    sort_key, _ = torch.sort(sort_key, dim=1)
    picked = sort_key < S
    anchors[:, :k] = torch.where(picked, sort_key, torch.zeros_like(sort_key))
    keep[:, :k] = picked
    return anchors, keep


def prefix_length_probs(block_size: int, base: float = 0.9) -> tuple[int, torch.Tensor]:
    """Support start ``p_min`` and probabilities of the D2 prefix length ``p``.

    ``p`` ranges over ``{p_min, ..., B-1}`` with ``P(p) ∝ base**p`` and ``p_min = min(2, B-1)``;
    when ``B-1 <= p_min`` the support is the single value ``p_min``.
    Returns ``(p_min, probs [n] float64)``.
    """
    B = check_block_size(block_size)
    if not float(base) > 0:
        raise ValueError(f"d2_prefix_weight_base must be > 0, got {base}")
    p_min = min(2, B - 1)
    if B - 1 <= p_min:
        return p_min, torch.ones(1, dtype=torch.float64)
    p = torch.arange(p_min, B, dtype=torch.float64)
    w = torch.exp(p * torch.log(torch.tensor(float(base), dtype=torch.float64)))
    return p_min, w / w.sum()


def sample_prefix_lengths(
    keep: torch.Tensor,
    block_size: int,
    base: float = 0.9,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw the D2 visible-prefix length ``p`` (anchor included) per block.

    ``keep [Bt, N]`` gives shape and device (a length is drawn for dummy blocks too, so the
    random stream does not depend on how many anchors were found). Returns ``[Bt, N]`` long.
    """
    if keep.dim() != 2:
        raise ValueError(f"keep must be [Bt, N], got shape {tuple(keep.shape)}")
    p_min, probs = prefix_length_probs(block_size, base)
    Bt, N = keep.shape
    if probs.numel() == 1:
        return torch.full((Bt, N), p_min, dtype=torch.long, device=keep.device)
    # Inverse-CDF sampling with one uniform per block: exact, vectorized, generator-friendly.
    cdf = torch.cumsum(probs, 0)[:-1].to(keep.device, torch.float64)
    u = _rand((Bt, N), generator, keep.device).to(torch.float64)
    return p_min + torch.searchsorted(cdf, u, right=True).to(torch.long)


def draft_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """Position id (RoPE) of every draft slot: ``anchor + k``. Returns ``[Bt, N*B]`` long."""
    B = check_block_size(block_size)
    k = torch.arange(B, device=anchors.device)
    return (anchors[..., None].long() + k).reshape(anchors.shape[0], -1)


def _check_blocks(input_ids, anchors, keep, prefix_lens=None):
    """Shapes, dtypes, devices (no sync), then kept anchors in ``[0, S)`` (one host sync; see set_validation)."""
    check_int_tensor("input_ids", input_ids, dim=2)
    check_int_tensor("anchors", anchors, dim=2)
    if keep.dim() != 2 or keep.shape != anchors.shape:
        raise ValueError(f"keep must match anchors {tuple(anchors.shape)}, got {tuple(keep.shape)}")
    if input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one position, got shape {tuple(input_ids.shape)}")
    if anchors.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"batch mismatch: input_ids has {input_ids.shape[0]} rows, anchors {anchors.shape[0]}"
        )
    tensors = {"input_ids": input_ids, "anchors": anchors, "keep": keep}
    if prefix_lens is not None:
        check_int_tensor("prefix_lens", prefix_lens, dim=2)
        if prefix_lens.shape != anchors.shape:
            raise ValueError(
                f"prefix_lens must match anchors {tuple(anchors.shape)}, got {tuple(prefix_lens.shape)}"
            )
        tensors["prefix_lens"] = prefix_lens
    check_same_device(**tensors)
    check_range("anchors", anchors, 0, input_ids.shape[1], where=keep.bool())


def draft_token_ids(
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> torch.Tensor:
    """Input token of every draft slot.

    Slot ``k`` of block ``n`` holds ``input_ids[anchor_n + k]`` when ``k < p_n`` and ``keep_n``
    and ``anchor_n + k < S``, else ``mask_token_id``. Returns ``[Bt, N*B]`` long.
    """
    _check_blocks(input_ids, anchors, keep, prefix_lens)
    B = check_block_size(block_size)
    Bt, S = input_ids.shape
    k = torch.arange(B, device=input_ids.device)
    pos = anchors[..., None].long() + k  # [Bt, N, B]
    vis = (k < prefix_lens[..., None]) & keep[..., None].bool() & (pos < S)
    tok = torch.gather(input_ids.long(), 1, pos.clamp(0, S - 1).reshape(Bt, -1)).view_as(pos)
    ids = torch.where(vis, tok, torch.full_like(tok, int(mask_token_id)))
    return ids.reshape(Bt, -1)


def draft_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: Optional[torch.Tensor],
    block_size: int,
    same_position: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, supervision mask and decay offsets of every draft slot.

    ``same_position=True`` (D2 mode, z-lab/SpecForge convention): slot ``k`` predicts
    ``input_ids[anchor+k]``; only ``k >= p`` is supervised, prefix slots pass through the
    contiguous run, and the decay offset ``max(k-p, 0)`` restarts at the first masked slot.
    ``same_position=False`` (DeepSpec DFlash mode): slot ``k`` predicts ``input_ids[anchor+k+1]``,
    the run starts at slot 0, offset ``k``; ``prefix_lens`` is ignored.

    Returns ``labels [Bt, N, B]`` long (``-100`` where the label position is past the sequence or
    the block is a dummy), ``eval_mask [Bt, N, B]`` bool and ``decay_offsets [Bt, N, B]`` long.
    """
    if same_position and prefix_lens is None:
        raise ValueError("draft_targets(same_position=True) needs prefix_lens")
    _check_blocks(input_ids, anchors, keep, prefix_lens if same_position else None)
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    B = check_block_size(block_size)
    Bt, S = input_ids.shape
    N = anchors.shape[1]
    k = torch.arange(B, device=input_ids.device)
    t = anchors[..., None].long() + k + (0 if same_position else 1)  # [Bt, N, B]
    in_seq = t < S
    t_c = t.clamp(0, S - 1).reshape(Bt, N * B)
    kept = keep[..., None].bool()
    tok = torch.gather(input_ids.long(), 1, t_c).view(Bt, N, B)
    lm = torch.gather(loss_mask.bool(), 1, t_c).view(Bt, N, B)
    valid = kept & in_seq & lm
    labels = torch.where(kept & in_seq, tok, torch.full_like(tok, IGNORE_INDEX))
    if same_position:
        p = prefix_lens[..., None].long()
        prefix = k < p
        run = torch.cumprod((valid | prefix).to(torch.int32), dim=-1).bool()
        eval_mask = run & ~prefix
        offsets = (k - p).clamp_min(0)
    else:
        eval_mask = torch.cumprod(valid.to(torch.int32), dim=-1).bool()
        offsets = k.expand(Bt, N, B).clone()
    return labels, eval_mask, offsets


def decay_weights(
    eval_mask: torch.Tensor, decay_offsets: torch.Tensor, gamma: Optional[float]
) -> torch.Tensor:
    """Per-slot loss weight ``eval * exp(-offset / gamma)`` (no decay when ``gamma`` is None or <= 0).

    ``eval_mask`` bool, ``decay_offsets`` integer ``>= 0`` where supervised (one host sync; see
    set_validation). Returns float32 of the broadcast shape.
    """
    if not isinstance(eval_mask, torch.Tensor) or eval_mask.dtype != torch.bool:
        raise TypeError(f"eval_mask must be a bool tensor, got {getattr(eval_mask, 'dtype', type(eval_mask).__name__)}")
    check_int_tensor("decay_offsets", decay_offsets)
    if gamma is not None and (isinstance(gamma, bool) or math.isnan(float(gamma))):
        raise ValueError(f"gamma must be a number (<= 0: no decay) or None, got {gamma!r}")
    check_range("decay_offsets", decay_offsets, 0, 2**62, where=eval_mask if eval_mask.shape == decay_offsets.shape else None)
    w = eval_mask.to(torch.float32)
    if gamma is not None and float(gamma) > 0:
        w = w * torch.exp(-decay_offsets.to(torch.float32) / float(gamma))
    return w
