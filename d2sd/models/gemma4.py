"""Gemma4 drafter: Gemma4 text-layer conventions around the d2kernels ops.

What follows the target (transformers' Gemma4 text model): RMSNorm ``x * w`` in fp32
(``Gemma4RMSNorm``), per-head q/k RMSNorm and a scale-free v RMSNorm, softmax scale 1.0 (q and k
are normalized), sandwich norms around attention and MLP, ``gelu_pytorch_tanh`` MLP, input
embeddings times ``sqrt(hidden)``, final logit softcapping. The draft layers attend over the whole
context, so they take the geometry of the target's *global* (full-attention) layers: their head
dim, kv heads and (proportional, partial) RoPE.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..config import DrafterConfig
from .base import DraftAttention, Drafter
from .families import gemma4_dims, register_family

try:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
except ImportError:  # transformers without Gemma4: the same norm, spelled out
    class Gemma4RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
            super().__init__()
            self.eps, self.with_scale = eps, with_scale
            if with_scale:
                self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
            if self.with_scale:
                y = y * self.weight.float()
            return y.type_as(x)


__all__ = ["Gemma4Drafter", "Gemma4DraftAttention", "Gemma4DraftLayer", "gemma4_dims"]


def gemma4_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim/2]``: "default" or Gemma4's "proportional" (partial rotary).

    Proportional: the first ``partial_rotary_factor * head_dim / 2`` angles rotate with exponents
    over the *full* head dim; the rest get frequency 0 (cos 1, sin 0: not rotated).
    """
    kind = rope.get("rope_type", "default")
    base = float(rope["rope_theta"])
    if kind == "default":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if kind == "proportional":
        n_rot = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
        rot = 1.0 / (base ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float32) / head_dim))
        inv = torch.cat([rot, torch.zeros(head_dim // 2 - n_rot)])
        return inv / float(rope.get("factor", 1.0))
    raise NotImplementedError(f"Gemma4 drafter: rope_type {kind!r} is not supported (default, proportional)")


class Gemma4DraftAttention(DraftAttention):
    """q from draft states, k/v from [context ; draft states]; q/k RMSNorm, scale-free v RMSNorm."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__(cfg, Gemma4RMSNorm, v_norm=Gemma4RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, with_scale=False))


class Gemma4DraftMLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma4DraftLayer(nn.Module):
    """Sandwich-norm layer: ``x + post(attn(pre(x)))``, then ``x + post_ff(mlp(pre_ff(x)))``."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma4DraftAttention(cfg)
        self.mlp = Gemma4DraftMLP(cfg)
        self.input_layernorm = Gemma4RMSNorm(H, eps=eps)
        self.post_attention_layernorm = Gemma4RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(H, eps=eps)

    def forward(self, x, ctx, rope_draft, rope_ctx, anchors, keep, block_size, layout=None):
        a = self.self_attn(self.input_layernorm(x), ctx, rope_draft, rope_ctx, anchors, keep, block_size, layout)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma4Drafter(Drafter):
    """DFlash / D2SD drafter with Gemma4-style decoder layers."""

    def make_norm(self, dim: int) -> nn.Module:
        return Gemma4RMSNorm(dim, eps=self.config.rms_norm_eps)

    def make_layer(self, idx: int) -> nn.Module:
        return Gemma4DraftLayer(self.config)

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        return gemma4_inv_freq(self.config.head_dim, self.config.rope_parameters), 1.0


register_family("gemma4", Gemma4Drafter)
