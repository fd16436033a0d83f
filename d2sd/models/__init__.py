"""Drafter models: ``build_drafter`` from a target config, ``load_drafter`` from a folder.

``drafter(input_ids, target_hidden, loss_mask)`` -> ``DrafterOutput`` (training, no logits tensor);
``drafter.draft_logits(target_hidden, anchors, block_ids)`` -> logits (inference).
``D2SDDrafterModel`` (``d2sd.models.hf``): the same drafter as a ``transformers.PreTrainedModel``.
"""
from __future__ import annotations

from typing import Any

from ..config import DrafterConfig
from . import gemma4, qwen3  # noqa: F401  (each registers its drafter family)
from .base import Drafter, DrafterOutput
from .checkpoint import load_drafter
from .families import drafter_class, drafter_config_from_target

__all__ = [
    "build_drafter",
    "load_drafter",
    "drafter_class",
    "drafter_config_from_target",
    "Drafter",
    "DrafterOutput",
    "DrafterConfig",
    "D2SDDrafterModel",
    "D2SDDrafterConfig",
]


def __getattr__(name: str):
    if name in ("D2SDDrafterModel", "D2SDDrafterConfig"):  # lazily: importing PreTrainedModel is slow
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def build_drafter(target_config: Any, **draft_args) -> Drafter:
    """A freshly initialized drafter for ``target_config`` (a transformers config or its dict).

    Keywords (all optional): ``num_draft_layers`` (5), ``target_layer_ids`` (strictly increasing, in
    ``[-1, num_hidden_layers)``; default evenly spaced from layer 1 to L-3, the DFlash rule),
    ``block_size`` (7), ``mask_token_id`` (target's, else 151669 for Qwen3, else vocab-1),
    ``num_anchors`` (512), ``enable_d2_feature`` (True), ``d2_prefix_weight_base`` (0.9),
    ``loss_decay_gamma`` (4.0), ``dflash_labels`` ('shifted'|'same'), ``backend`` ('auto').
    Any other ``DrafterConfig`` field (e.g. ``intermediate_size``) overrides the target's value.
    Call ``drafter.init_from_target(target_model)`` to copy and freeze embed_tokens / lm_head.
    """
    cfg = drafter_config_from_target(target_config, **draft_args)
    return drafter_class(cfg.model_type)(cfg)
