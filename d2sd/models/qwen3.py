"""Qwen3 drafter: transformers' Qwen3RMSNorm, Qwen3MLP and rotary frequencies around the d2kernels ops."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from ..config import DrafterConfig
from .base import DraftAttention, Drafter
from .families import qwen3_config_of, register_family

__all__ = ["Qwen3Drafter", "Qwen3DraftAttention", "Qwen3DraftLayer", "qwen3_config_of"]


class Qwen3DraftAttention(DraftAttention):
    """q from the draft states, k/v from [context ; draft states], per-head q/k RMSNorm, RoPE."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__(cfg, Qwen3RMSNorm)


class Qwen3DraftLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x), ctx)``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DrafterConfig, hf_config: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3DraftAttention(cfg)
        self.mlp = Qwen3MLP(hf_config)
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, ctx, rope_draft, rope_ctx, anchors, keep, block_size, layout=None):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_draft, rope_ctx, anchors, keep, block_size, layout)
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


register_family("qwen3", Qwen3Drafter)
