"""Swap a DFlash trainer's flex mask, noise ids and logits+CE for the three d2kernels calls.

A DeepSpec / SpecForge-style DFlash drafter step does three things d2kernels replaces:
  1. builds a [Bt, N*B] id tensor (anchor token, then [MASK]s) and embeds it;
  2. builds a BlockMask with create_block_mask and runs flex_attention over [ctx ; draft] keys;
  3. materializes [Bt*N*B, V] logits and runs F.cross_entropy with decay weights.
Both versions below share one tiny one-layer model (RoPE, MLP and the rest of the layer stay as
they are, so they are left out). Runs on CPU in a few seconds:  python examples/replace_flex.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout, uninstalled

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

import d2kernels  # noqa: E402
from d2kernels import layout  # noqa: E402

Bt, S, N, B, H, Hq, Hkv, D, V, MASK, GAMMA = 2, 40, 6, 4, 32, 4, 2, 8, 97, 96, 4.0

torch.manual_seed(0)
embed, lm_head = nn.Embedding(V, H), nn.Linear(H, V, bias=False)
fc, q_proj = nn.Linear(3 * H, H, bias=False), nn.Linear(H, Hq * D, bias=False)
k_proj, v_proj, o_proj = nn.Linear(H, Hkv * D, bias=False), nn.Linear(H, Hkv * D, bias=False), nn.Linear(Hq * D, H, bias=False)
norm = nn.RMSNorm(H)

input_ids = torch.randint(0, V - 1, (Bt, S))
loss_mask = torch.ones(Bt, S, dtype=torch.bool)
loss_mask[:, :8] = False  # the prompt
target_hidden = torch.randn(Bt, S, 3 * H)  # 3 target layers, concatenated
anchors, keep = layout.sample_anchors(loss_mask, N, generator=torch.Generator().manual_seed(0))


def attend_inputs(x, ctx):
    """q from draft states, k/v from context and draft states: [Bt, T, heads, D] each."""
    q = q_proj(x).view(Bt, N * B, Hq, D)
    k_ctx, v_ctx = k_proj(ctx).view(Bt, S, Hkv, D), v_proj(ctx).view(Bt, S, Hkv, D)
    k_draft, v_draft = k_proj(x).view(Bt, N * B, Hkv, D), v_proj(x).view(Bt, N * B, Hkv, D)
    return q, k_ctx, v_ctx, k_draft, v_draft


def loss_before():
    # 1. noise ids: slot 0 holds the anchor token, the others [MASK]; dummy blocks all [MASK]
    ids = torch.full((Bt, N, B), MASK)
    ids[:, :, 0] = torch.where(keep, input_ids.gather(1, anchors), MASK)
    x = embed(ids.view(Bt, N * B))
    ctx = fc(target_hidden)
    q, k_ctx, v_ctx, k_draft, v_draft = attend_inputs(x, ctx)

    # 2. BlockMask: block n sees context j < anchor_n and its own B slots
    def mask_mod(b, h, q_idx, kv_idx):
        n = q_idx // B
        own = (kv_idx >= S) & ((kv_idx - S) // B == n)
        return keep[b, n] & ((kv_idx < anchors[b, n]) | own)

    block_mask = create_block_mask(mask_mod, Bt, None, N * B, S + N * B, device="cpu")
    k, v = torch.cat([k_ctx, k_draft], 1), torch.cat([v_ctx, v_draft], 1)
    o = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True)
    h = norm(x + o_proj(o.transpose(1, 2).reshape(Bt, N * B, Hq * D)))

    # 3. logits of every slot + CE; DeepSpec labels: slot k predicts input_ids[anchor + k + 1]
    logits = lm_head(h).float()  # [Bt, N*B, V]
    t = anchors[..., None] + torch.arange(B) + 1  # [Bt, N, B]
    valid = keep[..., None] & (t < S) & loss_mask.gather(1, t.clamp(max=S - 1).view(Bt, -1)).view(Bt, N, B)
    run = torch.cumprod(valid.int(), -1).bool()  # supervised: an unbroken run from slot 0
    w = run * torch.exp(-torch.arange(B) / GAMMA)
    labels = input_ids.gather(1, t.clamp(max=S - 1).view(Bt, -1))
    ce = F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none")
    return (w.view(-1) * ce).sum() / (w.sum() + 1e-6)


def loss_after():
    prefix_lens = torch.ones_like(anchors)  # DFlash: only the anchor is visible (D2: sample_prefix_lengths)
    # 1. no id tensor: the kernel reads anchors / keep / prefix_lens directly
    x = d2kernels.noise_embedding(embed.weight, input_ids, anchors, keep, prefix_lens, block_size=B, mask_token_id=MASK)
    ctx = fc(target_hidden)
    # 2. no mask at all: the anchors are the mask
    o = d2kernels.varprefix_attention(*attend_inputs(x, ctx), anchors, keep, block_size=B)
    h = norm(x + o_proj(o.reshape(Bt, N * B, Hq * D)))
    # 3. no logits tensor: lm_head fused with the decayed CE; unsupervised slots cost nothing
    labels, eval_mask, offsets = layout.draft_targets(input_ids, loss_mask, anchors, keep, prefix_lens, B, same_position=False)
    num, den = d2kernels.decayed_cross_entropy(h.view(Bt, N, B, H), lm_head.weight, labels, eval_mask, offsets, gamma=GAMMA)
    return num / (den + 1e-6)


if __name__ == "__main__":
    with torch.no_grad():  # flex_attention has no CPU backward; on a GPU drop no_grad and call .backward()
        before = loss_before()
    after = loss_after()
    after.backward()  # the d2kernels path trains on any device
    print(f"flex + ids + logits/CE: {before.item():.6f}")
    print(f"d2kernels (3 calls):    {after.item():.6f}")
    assert torch.allclose(before, after.detach(), rtol=1e-5), "losses differ"
    print("same loss; fc grad norm", f"{fc.weight.grad.norm().item():.4f}")
