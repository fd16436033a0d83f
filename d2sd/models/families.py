"""The drafter families (qwen3, gemma4): their configs from a target's config, their classes by ``model_type``.

Plain config code (no ``nn.Module``): the checkpoint readers and writers use it as well as
``build_drafter``. The families register their classes when ``d2sd.models`` imports them.
"""
from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, Qwen3Config

from ..config import QWEN3_MASK_TOKEN_ID, DrafterConfig, default_target_layer_ids

__all__ = [
    "FAMILIES",
    "register_family",
    "drafter_class",
    "text_config",
    "family_of",
    "drafter_config_from_target",
    "qwen3_config_of",
    "gemma4_dims",
]

# model_type ("qwen3", "gemma4") -> drafter class
FAMILIES: dict[str, type] = {}

# build_drafter's documented keywords; any other DrafterConfig field is accepted as an override.
DRAFT_ARGS = (
    "num_draft_layers", "target_layer_ids", "block_size", "mask_token_id", "num_anchors",
    "enable_d2_feature", "d2_prefix_weight_base", "loss_decay_gamma", "dflash_labels", "backend",
)

NONE_IS_A_VALUE = ("loss_decay_gamma", "final_logit_softcapping", "attn_scale")


def register_family(model_type: str, cls: type) -> None:
    """Called by each family's module (qwen3.py, gemma4.py) for its drafter class."""
    FAMILIES[model_type] = cls


def drafter_class(model_type: str) -> type:
    """The drafter class of a ``DrafterConfig.model_type``."""
    if model_type not in FAMILIES:
        raise ValueError(f"unknown drafter model_type {model_type!r} (expected 'qwen3' or 'gemma4')")
    return FAMILIES[model_type]


def text_config(target_config: Any) -> Any:
    """The language-model config of a target config (a transformers config, a dict, or a model):
    multimodal targets (Gemma4) keep those fields in a sub-config."""
    target_config = getattr(target_config, "config", target_config)
    if isinstance(target_config, dict):
        d = dict(target_config)
        target_config = AutoConfig.for_model(d.pop("model_type"), **d)
    get_text = getattr(target_config, "get_text_config", None)
    return get_text() if callable(get_text) else target_config


def family_of(text_config: Any) -> str:
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
    tc = text_config(target_config)
    family = family_of(tc)
    if family == "gemma4":
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


def qwen3_config_of(cfg: DrafterConfig) -> Qwen3Config:
    """The transformers ``Qwen3Config`` of the draft layers (also the dflash export's config.json body)."""
    return Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_draft_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=cfg.attention_bias,
        tie_word_embeddings=False,
    )


def _full_attention_geometry(tc: Any) -> tuple[int, int]:
    """``(head_dim, num_key_value_heads)`` of the target's full-attention layers."""
    types = list(getattr(tc, "layer_types", None) or [])
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    per_layer = getattr(tc, "per_layer_config", None)
    if full and per_layer is not None:
        # Newer transformers: per-layer overrides (flat head_dim is ambiguous there and raises).
        lc = per_layer[full[0]]
        return int(lc.head_dim), int(lc.num_key_value_heads)
    head_dim, kv = tc.head_dim, tc.num_key_value_heads
    # Older transformers keep the global-layer geometry in flat fields.
    if getattr(tc, "global_head_dim", None):
        head_dim = tc.global_head_dim
        if getattr(tc, "attention_k_eq_v", False) and getattr(tc, "num_global_key_value_heads", None):
            kv = tc.num_global_key_value_heads
    return int(head_dim), int(kv)


def gemma4_dims(tc: Any) -> dict:
    """DrafterConfig dims of a drafter for the Gemma4 text config ``tc``."""
    head_dim, kv = _full_attention_geometry(tc)
    rope = getattr(tc, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    rope = dict(rope or {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0})
    return dict(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_act=getattr(tc, "hidden_activation", None) or getattr(tc, "hidden_act", "gelu_pytorch_tanh"),
        rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        rope_parameters=rope,
        max_position_embeddings=getattr(tc, "max_position_embeddings", 131072),
        attention_bias=bool(getattr(tc, "attention_bias", False)),
        attn_scale=1.0,
        embed_scale=float(tc.hidden_size) ** 0.5,
        final_logit_softcapping=getattr(tc, "final_logit_softcapping", None),
    )
