"""Recipe: put d2kernels' modules into an existing DFlash model's forward (DeepSpec-style).

``DFlashModel`` below is written the way DeepSpec's ``Qwen3DSparkModel`` is: transformers' Qwen3
pieces, attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, a noise-id
tensor, a mask over ``[ctx ; draft]`` keys, materialized logits and a decayed CE. The swap is:

  1. one registration, then the config picks it (the attention code does not change):
        AttentionInterface.register("d2kernels", d2kernels.modules.hf_attention_forward)
        model.config._attn_implementation = "d2kernels"
  2. three lines of ``forward`` (``D2KernelsDFlashModel.forward``):
        embed_tokens(noise_ids)            -> NoiseEmbedding(embed_tokens, B, mask)(ids, anchors, keep)
        create_block_mask(...)             -> VarPrefixMask(anchors, keep, B)
        lm_head(h) + cross_entropy * decay -> DecayedCrossEntropy(lm_head, gamma)(h, labels, eval, offsets)
The weights, state_dict and checkpoints are unchanged. Runs on CPU in a few seconds:
    python examples/swap_modules.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout, uninstalled

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface, Qwen3Config  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import (  # noqa: E402
    ALL_ATTENTION_FUNCTIONS,
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from d2kernels import layout  # noqa: E402
from d2kernels.modules import DecayedCrossEntropy, NoiseEmbedding, VarPrefixMask, hf_attention_forward  # noqa: E402


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config, self.head_dim, self.scaling = c, c.head_dim, c.head_dim**-0.5
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.nh * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.num_key_value_groups, self.is_causal, self.training = self.nh // self.nkv, False, False

    def forward(self, x, ctx, cos, sin, attention_mask):
        Bt, T, _ = x.shape
        kv_in = torch.cat([ctx, x], dim=1)  # keys/values: [context ; draft slots]
        q = self.q_norm(self.q_proj(x).view(Bt, T, self.nh, -1)).transpose(1, 2)
        k = self.k_norm(self.k_proj(kv_in).view(Bt, kv_in.shape[1], self.nkv, -1)).transpose(1, 2)
        v = self.v_proj(kv_in).view(Bt, kv_in.shape[1], self.nkv, -1).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -T:], sin[:, -T:])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        attn = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        o, _ = attn(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(o.reshape(Bt, T, -1))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), Qwen3MLP(c)
        self.input_layernorm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashModel(nn.Module):
    """A DFlash drafter as trainers write it (shifted labels: slot k predicts anchor + k + 1)."""

    def __init__(self, c, block_size=4, mask_token_id=0, target_layers=3, gamma=4.0):
        super().__init__()
        self.config, self.block_size, self.mask_token_id, self.gamma = c, block_size, mask_token_id, gamma
        H = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm, self.hidden_norm = Qwen3RMSNorm(H, eps=c.rms_norm_eps), Qwen3RMSNorm(H, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(c)
        self.fc = nn.Linear(target_layers * H, H, bias=False)
        self.lm_head = nn.Linear(H, c.vocab_size, bias=False)

    def backbone(self, x, target_hidden, anchors, mask):
        Bt, S = target_hidden.shape[:2]
        pos = torch.cat([torch.arange(S).expand(Bt, S), layout.draft_positions(anchors, self.block_size)], 1)
        cos, sin = self.rotary_emb(x, pos)
        ctx = self.hidden_norm(self.fc(target_hidden))
        for layer in self.layers:
            x = layer(x, ctx, cos, sin, mask)
        return self.norm(x)

    def forward(self, input_ids, target_hidden, loss_mask, anchors, keep):
        (Bt, S), B, N = input_ids.shape, self.block_size, anchors.shape[1]
        ids = torch.full((Bt, N, B), self.mask_token_id)
        ids[:, :, 0] = torch.where(keep, input_ids.gather(1, anchors), self.mask_token_id)
        x = self.embed_tokens(ids.view(Bt, N * B))
        blk = torch.arange(N * B) // B  # dense stand-in for create_block_mask's BlockMask (CPU: SDPA)
        mask = torch.cat([torch.arange(S)[None, None] < anchors[:, blk, None],
                          (blk[:, None] == blk[None, :]).expand(Bt, -1, -1)], -1) & keep[:, blk, None]
        h = self.backbone(x, target_hidden, anchors, mask[:, None])
        t = anchors[..., None] + torch.arange(B) + 1
        safe = t.clamp(max=S - 1).view(Bt, -1)
        ok = (t < S) & loss_mask.gather(1, safe).view(Bt, N, B) & keep[..., None]
        w = ok.int().cumprod(-1) * torch.exp(-torch.arange(B) / self.gamma)
        ce = F.cross_entropy(self.lm_head(h).float().view(-1, self.config.vocab_size), input_ids.gather(1, safe).view(-1),
                             reduction="none")
        return (ce * w.view(-1)).sum() / (w.sum() + 1e-6)


class D2KernelsDFlashModel(DFlashModel):
    """The same model, same weights; forward with the three d2kernels modules."""

    def use_d2kernels(self, backend="auto"):
        AttentionInterface.register("d2kernels", hf_attention_forward)
        self.config._attn_implementation = "d2kernels"
        for layer in self.layers:
            layer.self_attn.d2kernels_backend = backend
        self.noise_embed = NoiseEmbedding(self.embed_tokens, self.block_size, self.mask_token_id, backend=backend)
        self.loss_fn = DecayedCrossEntropy(self.lm_head, gamma=self.gamma, backend=backend)
        return self

    def forward(self, input_ids, target_hidden, loss_mask, anchors, keep):
        B = self.block_size
        x = self.noise_embed(input_ids, anchors, keep)
        h = self.backbone(x, target_hidden, anchors, VarPrefixMask(anchors, keep, B))
        prefix_lens = torch.ones_like(anchors)  # DFlash; a VP drafter passes sample_prefix_lengths(...)
        labels, eval_mask, offsets = layout.draft_targets(input_ids, loss_mask, anchors, keep, prefix_lens, B, same_position=False)
        return self.loss_fn(h.view(*anchors.shape, B, -1), labels, eval_mask, offsets)


def main(seed=0):
    torch.manual_seed(seed)
    c = Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    intermediate_size=48, vocab_size=97, attn_implementation="sdpa")
    before = DFlashModel(c, mask_token_id=96)
    after = D2KernelsDFlashModel(Qwen3Config(**c.to_dict()), mask_token_id=96)
    after.load_state_dict(before.state_dict())
    after.use_d2kernels(backend="torch")
    assert set(after.state_dict()) == set(before.state_dict())  # checkpoints unchanged

    Bt, S, N = 2, 40, 6
    input_ids = torch.randint(0, 96, (Bt, S))
    loss_mask = torch.ones(Bt, S, dtype=torch.bool)
    loss_mask[:, :8] = False
    target_hidden = torch.randn(Bt, S, 3 * 32)
    anchors, keep = layout.sample_anchors(loss_mask, N, generator=torch.Generator().manual_seed(seed))
    losses = []
    for m in (before, after):
        loss = m(input_ids, target_hidden, loss_mask, anchors, keep)
        loss.backward()
        losses.append(loss.detach())
    grads = [(p.grad, q.grad) for p, q in zip(before.parameters(), after.parameters())]
    return losses, grads


if __name__ == "__main__":
    (before, after), grads = main()
    print(f"DFlash model as written:  {before.item():.6f}")
    print(f"with d2kernels modules:   {after.item():.6f}")
    assert torch.allclose(before, after, rtol=1e-5), "losses differ"
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in grads), "gradients differ"
    print("same loss and gradients")
