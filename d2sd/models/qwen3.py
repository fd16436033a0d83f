"""Qwen3 drafter: transformers' Qwen3RMSNorm, Qwen3MLP and rotary frequencies around the d2kernels ops."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

import d2kernels

from ..config import DrafterConfig
from .base import Drafter, apply_rope, kernel_dtype

__all__ = ["Qwen3Drafter", "Qwen3DraftAttention", "Qwen3DraftLayer", "qwen3_config_of"]


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


class Qwen3DraftAttention(nn.Module):
    """q from the draft states, k/v from [context ; draft states], per-head q/k RMSNorm, RoPE."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else D**-0.5
        self.backend = cfg.backend
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = Qwen3RMSNorm(D, eps=cfg.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(D, eps=cfg.rms_norm_eps)

    def forward(self, x, ctx, rope_draft, rope_ctx, anchors, keep, block_size):
        """``x [Bt, NB, H]`` draft states, ``ctx [Bt, S, H]`` context -> ``[Bt, NB, H]``."""
        Bt, NB, _ = x.shape
        S = ctx.shape[1]
        D = self.head_dim
        q = self.q_norm(self.q_proj(x).view(Bt, NB, self.num_heads, D))  # [Bt, NB, Hq, D]
        k_draft = self.k_norm(self.k_proj(x).view(Bt, NB, self.num_kv_heads, D))  # [Bt, NB, Hkv, D]
        v_draft = self.v_proj(x).view(Bt, NB, self.num_kv_heads, D)
        k_ctx = self.k_norm(self.k_proj(ctx).view(Bt, S, self.num_kv_heads, D))  # [Bt, S, Hkv, D]
        v_ctx = self.v_proj(ctx).view(Bt, S, self.num_kv_heads, D)
        q = apply_rope(q, *rope_draft)
        k_draft = apply_rope(k_draft, *rope_draft)
        k_ctx = apply_rope(k_ctx, *rope_ctx)
        q, k_ctx, v_ctx, k_draft, v_draft = kernel_dtype(q, k_ctx, v_ctx, k_draft, v_draft)
        o = d2kernels.varprefix_attention(
            q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep,
            block_size=block_size, scale=self.scale, backend=self.backend,
        )  # [Bt, NB, Hq, D]
        return self.o_proj(o.reshape(Bt, NB, self.num_heads * D))


class Qwen3DraftLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x), ctx)``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DrafterConfig, hf_config: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3DraftAttention(cfg)
        self.mlp = Qwen3MLP(hf_config)
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, ctx, rope_draft, rope_ctx, anchors, keep, block_size):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_draft, rope_ctx, anchors, keep, block_size)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Drafter(Drafter):
    """DFlash / D2SD drafter with Qwen3 decoder layers (the DeepSpec layout)."""

    def __init__(self, config: DrafterConfig):
        self._hf_config = qwen3_config_of(config)
        super().__init__(config)

    def make_norm(self, dim: int) -> nn.Module:
        return Qwen3RMSNorm(dim, eps=self.config.rms_norm_eps)

    def make_layer(self, idx: int) -> nn.Module:
        return Qwen3DraftLayer(self.config, self._hf_config)

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        # transformers computes the frequencies (any rope_type it knows); we keep them in fp32 outside
        # the module tree so .to(bfloat16) never rounds them.
        rope = Qwen3RotaryEmbedding(self._hf_config)
        return rope.inv_freq.detach().float().clone(), float(rope.attention_scaling)
