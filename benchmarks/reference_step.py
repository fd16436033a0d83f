"""The drafter training step as DFlash trainers run it today, for side-by-side benchmarks.

Same model and weights as ``Qwen3Drafter``; only the three places d2kernels replaces differ:
- draft inputs: a ``[Bt, N*B]`` id tensor, then ``nn.Embedding``;
- attention: K/V of ``cat([ctx, draft])``, a ``create_block_mask`` BlockMask rebuilt every step
  from the anchors, ``flex_attention`` (torch.compile'd, as DeepSpec / SpecForge run it);
- loss: ``lm_head`` logits of every slot ``[Bt*N*B, V]`` materialized, then ``F.cross_entropy``
  (torch.compile'd) times the decay weights.
On CPU, flex_attention has no backward: ``attn_impl="dense"`` runs SDPA with the dense mask made
by the same ``mask_mod`` (for correctness runs at tiny sizes).

Also the harness shared by ``benchmarks/test_train_step.py`` and ``scripts/gpu_train_step.py``, and the
small target configs the tests build drafters from. Not part of the installed package: import it as
``benchmarks.reference_step`` from the repository root (pytest's ``pythonpath`` puts it there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from d2kernels import layout
from d2sd.models.base import Drafter, apply_rope, rope_cos_sin

__all__ = [
    "varprefix_mask_mod",
    "reference_loss",
    "ReferenceOps",
    "qwen3_4b_target_config",
    "tiny_target_config",
    "make_batch",
    "TrainStep",
    "PROVIDERS",
    "measure",
    "largest_batch",
]


def varprefix_mask_mod(anchors: torch.Tensor, keep: torch.Tensor, S: int, block_size: int):
    """flex ``mask_mod`` of the attention mask rule (docs/semantics.md) over keys ``[ctx 0..S-1 ; draft slots]``."""
    B = block_size

    def mask_mod(b, h, q_idx, kv_idx):
        n = q_idx // B
        ctx_ok = kv_idx < anchors[b, n]
        own_ok = (kv_idx >= S) & ((kv_idx - S) // B == n)
        return keep[b, n] & (ctx_ok | own_ok)

    return mask_mod


def _ce_sum(h: torch.Tensor, w_head: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Materialized logits ``[T, V]`` + CE, the usual way; returns ``Σ w·CE``."""
    logits = (h @ w_head.t()).float()  # [T, V]
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    return (ce * weights).sum()


class ReferenceOps:
    """The three replaced ops, the way trainers run them (built once so compiles are cached)."""

    def __init__(self, attn_impl: str = "flex", compile: bool = True):
        if attn_impl not in ("flex", "dense"):
            raise ValueError(f"attn_impl must be 'flex' or 'dense', got {attn_impl!r}")
        self.attn_impl, self.compile = attn_impl, compile
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.flex = torch.compile(flex_attention) if compile else flex_attention
        self.ce = torch.compile(_ce_sum) if compile else _ce_sum

    def block_mask(self, anchors, keep, S, NB, block_size):
        mm = varprefix_mask_mod(anchors, keep, S, block_size)
        if self.attn_impl == "flex":
            return self.create_block_mask(mm, anchors.shape[0], None, NB, S + NB, device=anchors.device, _compile=self.compile)
        from torch.nn.attention.flex_attention import create_mask

        return create_mask(mm, anchors.shape[0], None, NB, S + NB, device=anchors.device)  # [Bt, 1, NB, S+NB]

    def attention(self, q, k, v, mask, scale):
        """``q [Bt, Hq, NB, D]``, ``k/v [Bt, Hkv, S+NB, D]`` -> ``[Bt, Hq, NB, D]``."""
        if self.attn_impl == "flex":
            return self.flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        # Dense SDPA: give empty rows one key to stay NaN-free, then zero them.
        empty = ~mask.any(-1, keepdim=True)
        safe = mask | (empty & (torch.arange(mask.shape[-1], device=mask.device) == 0))
        G = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=safe, scale=scale
        )
        return o.masked_fill(empty, 0.0)


def reference_loss(
    drafter: Drafter,
    ops: ReferenceOps,
    input_ids: torch.Tensor,
    target_hidden: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w·CE, Σ w)`` of a Qwen3 drafter computed the usual way (see module doc)."""
    cfg = drafter.config
    if cfg.model_type != "qwen3":
        raise NotImplementedError("the reference path is written for the Qwen3 drafter")
    B = cfg.block_size
    Bt, S = input_ids.shape
    N = anchors.shape[1]
    NB = N * B
    ids = layout.draft_token_ids(input_ids, anchors, keep, prefix_lens, B, cfg.mask_token_id)  # [Bt, NB]
    x = drafter.embed_tokens(ids)  # [Bt, NB, H]
    ctx = drafter._context(target_hidden)  # [Bt, S, H]
    mask = ops.block_mask(anchors, keep, S, NB, B)
    pos = torch.cat([torch.arange(S, device=x.device).expand(Bt, S), layout.draft_positions(anchors, B)], 1)  # [Bt, S+NB]
    cos, sin = rope_cos_sin(drafter._inv_freq_on(x.device), drafter.rope_scaling, pos, x.dtype)  # [Bt, S+NB, D]
    cos_q, sin_q = cos[:, S:], sin[:, S:]
    for layer in drafter.layers:
        att = layer.self_attn
        hn = layer.input_layernorm(x)
        kv_in = torch.cat([ctx, hn], dim=1)  # [Bt, S+NB, H]
        D, Hq, Hkv = att.head_dim, att.num_heads, att.num_kv_heads
        q = apply_rope(att.q_norm(att.q_proj(hn).view(Bt, NB, Hq, D)), cos_q, sin_q)
        k = apply_rope(att.k_norm(att.k_proj(kv_in).view(Bt, S + NB, Hkv, D)), cos, sin)
        v = att.v_proj(kv_in).view(Bt, S + NB, Hkv, D)
        o = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, att.scale)  # [Bt, Hq, NB, D]
        x = x + att.o_proj(o.transpose(1, 2).reshape(Bt, NB, Hq * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = drafter.norm(x)
    labels, eval_mask, offsets = layout.draft_targets(
        input_ids, loss_mask, anchors, keep, prefix_lens, B, same_position=cfg.same_position_labels
    )
    w = layout.decay_weights(eval_mask, offsets, cfg.loss_decay_gamma)  # [Bt, N, B]
    labels = torch.where(eval_mask, labels, torch.full_like(labels, -100))
    num = ops.ce(h.reshape(Bt * NB, -1), drafter.lm_head.weight, labels.reshape(-1), w.reshape(-1))
    return num, w.sum()


# ----------------------------------------------------------------------------- train-step harness


def qwen3_4b_target_config():
    """Qwen3-4B's shape (hidden 2560, 36 layers, 32/8 heads, head_dim 128, intermediate 9728, vocab 151936)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )


def tiny_target_config():
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=160, vocab_size=503, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )


def make_batch(cfg, Bt: int, S: int, device, dtype, seed: int = 0):
    """Random chat-like batch: 10% prompt (loss_mask 0), response after; anchors and prefix lengths drawn."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (Bt, S), generator=g, device=device)
    lm = torch.ones(Bt, S, dtype=torch.bool, device=device)
    lm[:, : max(1, S // 10)] = False
    th = torch.randn(Bt, S, cfg.num_target_features * cfg.hidden_size, generator=g, device=device).to(dtype)
    anchors, keep = layout.sample_anchors(lm, cfg.num_anchors, generator=g)
    if cfg.enable_d2_feature:
        prefix = layout.sample_prefix_lengths(keep, cfg.block_size, cfg.d2_prefix_weight_base, generator=g)
    else:
        prefix = torch.ones_like(anchors)
    return ids, th, lm, anchors, keep, prefix


PROVIDERS = ("d2kernels", "d2kernels-compiled", "reference")


@dataclass
class TrainStep:
    """One full optimizer step (fwd, bwd, AdamW) of ``provider``.

    ``d2kernels``: the drafter as is. ``d2kernels-compiled``: each decoder layer ``torch.compile``'d
    (fuses the norms, RoPE and the MLP gate; the d2kernels ops stay opaque custom ops).
    ``reference``: ``reference_loss`` with ``ops``.
    """

    drafter: Drafter
    provider: str
    ops: Optional[ReferenceOps] = None
    lr: float = 1e-4

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.provider == "d2kernels-compiled":
            for layer in self.drafter.layers:
                layer.compile()
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        fused = params[0].is_cuda
        self.opt = torch.optim.AdamW(params, lr=self.lr, fused=fused)

    def loss(self, batch) -> torch.Tensor:
        ids, th, lm, anchors, keep, prefix = batch
        if self.provider != "reference":
            out = self.drafter(ids, th, lm, anchors=anchors, keep=keep, prefix_lens=prefix)
            num, den = out.loss_num, out.loss_den
        else:
            num, den = reference_loss(self.drafter, self.ops, ids, th, lm, anchors, keep, prefix)
        return num / (den + 1e-6)

    def __call__(self, batch) -> torch.Tensor:
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable, batch, device, warmup: int = 3, iters: int = 10) -> dict:
    """Median ms/step and peak memory of ``step(batch)`` (peak: total and above the pre-step level)."""
    for _ in range(warmup):
        step(batch)
    _sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(batch)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    res = {"ms": times[len(times) // 2], "ms_min": times[0]}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        res.update(peak_gib=peak / 2**30, extra_gib=(peak - base) / 2**30)
    return res


def largest_batch(try_step: Callable[[int], None], limit: int = 64) -> int:
    """Largest power-of-two local batch (<= limit) for which ``try_step(Bt)`` does not run out of memory."""
    best, bt = 0, 1
    while bt <= limit:
        try:
            try_step(bt)
        except RuntimeError as e:  # OutOfMemoryError, or OOM wrapped by a compiled region
            if "out of memory" not in str(e).lower():
                raise
            break
        finally:
            torch.cuda.empty_cache()
        best, bt = bt, bt * 2
    return best
