"""Drafter models: ``build_drafter`` from a target config, ``load_drafter`` from a folder.

``drafter(input_ids, target_hidden, loss_mask)`` -> ``DrafterOutput`` (training, no logits tensor);
``drafter.draft_logits(target_hidden, anchors, block_ids)`` -> logits (inference).
``D2SDDrafterModel`` (``d2sd.models.hf``): the same drafter as a ``transformers.PreTrainedModel``.
"""
from __future__ import annotations

import math
from typing import Any

from ..config import QWEN3_MASK_TOKEN_ID, DrafterConfig, default_target_layer_ids
from .base import Drafter, DrafterOutput
from .checkpoint import load_drafter

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

# build_drafter's documented keywords; any other DrafterConfig field is accepted as an override.
DRAFT_ARGS = (
    "num_draft_layers", "target_layer_ids", "block_size", "mask_token_id", "num_anchors",
    "enable_d2_feature", "d2_prefix_weight_base", "loss_decay_gamma", "dflash_labels", "backend",
)

NONE_IS_A_VALUE = ("loss_decay_gamma", "final_logit_softcapping", "attn_scale")


def drafter_class(model_type: str) -> type[Drafter]:
    if model_type == "qwen3":
        from .qwen3 import Qwen3Drafter

        return Qwen3Drafter
    if model_type == "gemma4":
        from .gemma4 import Gemma4Drafter

        return Gemma4Drafter
    raise ValueError(f"unknown drafter model_type {model_type!r} (expected 'qwen3' or 'gemma4')")


def _text_config(target_config: Any) -> Any:
    if isinstance(target_config, dict):
        from transformers import AutoConfig

        d = dict(target_config)
        target_config = AutoConfig.for_model(d.pop("model_type"), **d)
    get_text = getattr(target_config, "get_text_config", None)
    return get_text() if callable(get_text) else target_config


def _family(text_config: Any) -> str:
    mt = str(getattr(text_config, "model_type", ""))
    if mt.startswith("gemma4"):
        return "gemma4"
    if mt.startswith(("qwen3", "qwen2", "llama", "mistral")) or mt == "":
        return "qwen3"
    raise ValueError(
        f"no drafter family for target model_type {mt!r}: supported targets are Qwen3-like "
        "(qwen3, qwen2, llama, mistral) and gemma4"
    )


def drafter_config_from_target(target_config: Any, **draft_args) -> DrafterConfig:
    """The DrafterConfig of a drafter for ``target_config`` (HF config or dict); see ``build_drafter``."""
    tc = _text_config(target_config)
    family = _family(tc)
    if family == "gemma4":
        from .gemma4 import gemma4_dims

        dims = gemma4_dims(tc)
    else:
        H = tc.hidden_size
        dims = dict(
            hidden_size=H,
            intermediate_size=tc.intermediate_size,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            head_dim=getattr(tc, "head_dim", None) or H // tc.num_attention_heads,
            hidden_act=getattr(tc, "hidden_act", "silu"),
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
            rope_parameters=dict(getattr(tc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(tc, "rope_theta", 1e6)}),
            max_position_embeddings=getattr(tc, "max_position_embeddings", 40960),
            attention_bias=bool(getattr(tc, "attention_bias", False)),
        )
    dims.update(model_type=family, vocab_size=tc.vocab_size, num_target_layers=tc.num_hidden_layers)
    unknown = set(draft_args) - {f for f in DrafterConfig.__dataclass_fields__}
    if unknown:
        raise TypeError(f"build_drafter got unknown argument(s) {sorted(unknown)}; known: {list(DRAFT_ARGS)}")
    # None means "the default" except where None is itself a setting (no decay, no softcap, default scale).
    args = {k: v for k, v in draft_args.items() if v is not None or k in NONE_IS_A_VALUE}
    args.setdefault("num_draft_layers", 5)
    n_layers = args["num_draft_layers"]
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"num_draft_layers must be an integer >= 1, got {n_layers!r}")
    if "target_layer_ids" not in args:
        args["target_layer_ids"] = default_target_layer_ids(tc.num_hidden_layers, n_layers)
    else:
        args["target_layer_ids"] = list(args["target_layer_ids"])
    if "mask_token_id" not in args:
        args["mask_token_id"] = _default_mask_token_id(tc, family)
    base = args.get("d2_prefix_weight_base", 0.9)
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"d2_prefix_weight_base must be a finite number > 0, got {base!r}")
    dims.update(args)
    return DrafterConfig(**dims).validate()


def _default_mask_token_id(tc: Any, family: str) -> int:
    mid = getattr(tc, "mask_token_id", None)
    if isinstance(mid, int):
        return mid
    if family == "qwen3" and tc.vocab_size > QWEN3_MASK_TOKEN_ID:
        return QWEN3_MASK_TOKEN_ID
    # Any fixed id can serve as [MASK]: its frozen embedding is just the constant input of masked slots.
    return tc.vocab_size - 1


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
