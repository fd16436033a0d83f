"""``nn.Module`` faces of the three ops, for trainers that are built from modules.

They replace, one for one, what a DFlash drafter step does today (``examples/swap_modules.py`` is
the recipe, on a DeepSpec-style model):

- ``NoiseEmbedding(embed_tokens, block_size, mask_token_id)``: ``embed(noise_ids)`` without the
  ``[Bt, N*B]`` id tensor; shares (never copies) the embedding's weight.
- ``VarPrefixAttention(block_size)``: ``flex_attention(q, k, v, block_mask)`` over ``[ctx ; draft]``
  keys without a BlockMask: the anchors are the mask. ``forward`` takes the split keys,
  ``forward_concat`` takes flex's heads-first concatenated layout.
- ``DecayedCrossEntropy(lm_head, gamma)``: ``lm_head`` logits + ``F.cross_entropy`` times the decay
  weights, without the ``[tokens, vocab]`` logits; holds the ``lm_head`` module (its weight).

``VarPrefixMask`` carries the anchors where a model passes its attention mask, and
``hf_attention_forward`` has the signature of transformers' attention interface, so a model that
picks its attention through ``config._attn_implementation`` switches with one registration:
``AttentionInterface.register("d2kernels", d2kernels.modules.hf_attention_forward)`` (this module
imports neither transformers nor d2sd).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .attention import varprefix_attention
from .cross_entropy import decayed_cross_entropy
from .embedding import noise_embedding

__all__ = [
    "NoiseEmbedding",
    "VarPrefixAttention",
    "DecayedCrossEntropy",
    "VarPrefixMask",
    "hf_attention_forward",
]


def _hold(wrapper: nn.Module, source) -> None:
    # Outside the module tree: a wrapper installed on a model must not add state_dict keys.
    wrapper.__dict__["_source"] = source


def _held(wrapper: nn.Module):
    return wrapper.__dict__["_source"]


class VarPrefixMask(NamedTuple):
    """What a BlockMask held, as the kernels read it: ``anchors, keep [Bt, N]``, the block size."""

    anchors: torch.Tensor
    keep: torch.Tensor
    block_size: int


class NoiseEmbedding(nn.Module):
    """``x [Bt, N*B, H]`` = embedding of (anchor, visible prefix, [MASK]...) per block.

    Args:
        embedding: the drafter's ``nn.Embedding`` (its weight is used as is, frozen or not). Held by
            reference, not as a child module: the model's ``state_dict`` and ``.to()`` are unchanged.
        block_size, mask_token_id: ``B`` and the [MASK] id.
    ``forward(input_ids, anchors, keep, prefix_lens=None)``; ``prefix_lens`` None = 1 (DFlash).
    """

    def __init__(self, embedding: nn.Embedding, block_size: int, mask_token_id: int, backend: str = "auto"):
        super().__init__()
        _hold(self, embedding)
        self.block_size, self.mask_token_id, self.backend = int(block_size), int(mask_token_id), backend

    def forward(self, input_ids, anchors, keep, prefix_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if prefix_lens is None:
            prefix_lens = torch.ones_like(anchors)
        return noise_embedding(
            _held(self).weight, input_ids, anchors, keep, prefix_lens,
            block_size=self.block_size, mask_token_id=self.mask_token_id, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, mask_token_id={self.mask_token_id}, backend={self.backend!r}"


class VarPrefixAttention(nn.Module):
    """Block ``n`` of ``B`` draft slots sees context ``j < anchors[:, n]`` and its own slots (GQA native).

    ``forward(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep)``: ``q [Bt, N*B, Hq, D]``,
    ``k_ctx/v_ctx [Bt, S, Hkv, D]``, ``k_draft/v_draft [Bt, N*B, Hkv, D]`` -> ``[Bt, N*B, Hq, D]``.
    """

    def __init__(self, block_size: int, scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.block_size, self.scale, self.backend = int(block_size), scale, backend

    def forward(self, q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep) -> torch.Tensor:
        return varprefix_attention(
            q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep,
            block_size=self.block_size, scale=self.scale, backend=self.backend,
        )

    def forward_concat(self, q, k, v, anchors, keep, scale: Optional[float] = None) -> torch.Tensor:
        """flex/SDPA layout: ``q [Bt, Hq, N*B, D]``, ``k, v [Bt, Hkv, S+N*B, D]`` (context first)
        -> ``[Bt, Hq, N*B, D]``. K/V are read through views (no repeat for GQA)."""
        NB = q.shape[2]
        S = k.shape[2] - NB
        if S < 0:
            raise ValueError(f"k has {k.shape[2]} positions, fewer than the {NB} draft queries")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [Bt, T, heads, D]
        o = varprefix_attention(
            q, k[:, :S], v[:, :S], k[:, S:], v[:, S:], anchors, keep,
            block_size=self.block_size, scale=self.scale if scale is None else scale, backend=self.backend,
        )
        return o.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, scale={self.scale}, backend={self.backend!r}"


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' ``AttentionInterface`` signature over ``varprefix_attention``.

    ``query [Bt, Hq, N*B, D]``, ``key/value [Bt, Hkv, S+N*B, D]`` (context first, as DFlash drafters
    concatenate them); ``attention_mask`` is a ``VarPrefixMask``. Returns ``([Bt, N*B, Hq, D], None)``
    like the interface's other functions. The op has no dropout: ``dropout`` must be 0.
    """
    if not isinstance(attention_mask, VarPrefixMask):
        raise TypeError(
            f"the d2kernels attention takes a d2kernels.modules.VarPrefixMask as attention_mask "
            f"(anchors, keep, block_size), got {type(attention_mask).__name__}"
        )
    if dropout:
        raise ValueError(f"varprefix_attention has no dropout; got dropout={dropout}")
    backend = getattr(module, "d2kernels_backend", "auto")
    attn = VarPrefixAttention(attention_mask.block_size, scale=scaling, backend=backend)
    o = attn.forward_concat(query, key, value, attention_mask.anchors, attention_mask.keep)
    return o.transpose(1, 2), None


class DecayedCrossEntropy(nn.Module):
    """``Σ w·CE(lm_head(hidden), labels) / (Σ w + 1e-6)``, ``w = eval_mask * exp(-offset / gamma)``.

    Args:
        lm_head: the drafter's output ``nn.Linear`` (no bias) or its ``[V, H]`` weight, held by
            reference like ``NoiseEmbedding``'s embedding.
        gamma: decay (None or <= 0: none). softcap: Gemma-style logit softcapping.
        reduction: ``"mean"`` (the weighted mean above) or ``"sum"`` (returns ``(num, den)``: under
            data parallelism divide by the all-reduced ``den``).
    ``forward(hidden [..., H], labels, eval_mask, decay_offsets [...])``.
    """

    def __init__(self, lm_head: Union[nn.Linear, torch.Tensor], gamma: Optional[float], softcap: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(lm_head, nn.Linear) and lm_head.bias is not None:
            raise ValueError("decayed_cross_entropy fuses a bias-free lm_head; this nn.Linear has a bias")
        _hold(self, lm_head)
        self.gamma, self.softcap, self.reduction, self.backend = gamma, softcap, reduction, backend

    def forward(self, hidden, labels, eval_mask, decay_offsets):
        w = _held(self)
        w = w.weight if isinstance(w, nn.Module) else w
        num, den = decayed_cross_entropy(
            hidden, w, labels, eval_mask, decay_offsets, gamma=self.gamma, softcap=self.softcap, backend=self.backend,
        )
        return num / (den + 1e-6) if self.reduction == "mean" else (num, den)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, softcap={self.softcap}, reduction={self.reduction!r}, backend={self.backend!r}"
