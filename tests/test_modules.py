"""d2kernels.modules: the nn.Module faces of the three ops, and the recipe that swaps them into a model."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import d2kernels as dk
from d2kernels.modules import (
    DecayedCrossEntropy,
    NoiseEmbedding,
    VarPrefixAttention,
    VarPrefixMask,
    hf_attention_forward,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Bt, S, N, B, Hq, Hkv, D, H, V = 2, 23, 4, 3, 4, 2, 8, 16, 31


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (Bt, S), generator=g)
    lm = torch.ones(Bt, S, dtype=torch.bool)
    anchors, keep = dk.sample_anchors(lm, N, generator=g)
    prefix = dk.sample_prefix_lengths(keep, B, generator=g)
    return g, ids, lm, anchors, keep, prefix


def test_noise_embedding_module_shares_the_weight():
    g, ids, lm, anchors, keep, prefix = inputs()
    emb = nn.Embedding(V, H)
    m = NoiseEmbedding(emb, B, V - 1, backend="torch")
    want = dk.noise_embedding(emb.weight, ids, anchors, keep, prefix, block_size=B, mask_token_id=V - 1, backend="torch")
    assert torch.equal(m(ids, anchors, keep, prefix), want)
    ones = torch.ones_like(anchors)
    assert torch.equal(m(ids, anchors, keep), m(ids, anchors, keep, ones))
    assert list(m.state_dict()) == [] and "block_size=3" in repr(m)
    m(ids, anchors, keep, prefix).sum().backward()
    assert emb.weight.grad is not None  # the model's own parameter


def test_varprefix_attention_module_both_layouts():
    g, ids, lm, anchors, keep, _ = inputs()
    q = torch.randn(Bt, N * B, Hq, D, generator=g)
    k, v = torch.randn(Bt, S + N * B, Hkv, D, generator=g), torch.randn(Bt, S + N * B, Hkv, D, generator=g)
    want = dk.varprefix_attention(q, k[:, :S], v[:, :S], k[:, S:], v[:, S:], anchors, keep, block_size=B, backend="torch")
    m = VarPrefixAttention(B, backend="torch")
    assert torch.equal(m(q, k[:, :S], v[:, :S], k[:, S:], v[:, S:], anchors, keep), want)
    heads_first = m.forward_concat(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), anchors, keep)
    torch.testing.assert_close(heads_first.transpose(1, 2), want)
    o, w = hf_attention_forward(m, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), VarPrefixMask(anchors, keep, B))
    assert w is None
    torch.testing.assert_close(o, want)
    with pytest.raises(TypeError, match="VarPrefixMask"):
        hf_attention_forward(m, q, k, v, torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        hf_attention_forward(m, q, k, v, VarPrefixMask(anchors, keep, B), dropout=0.1)


def test_decayed_cross_entropy_module():
    g, ids, lm, anchors, keep, prefix = inputs()
    head = nn.Linear(H, V, bias=False)
    labels, ev, off = dk.draft_targets(ids, lm, anchors, keep, prefix, B, same_position=True)
    h = torch.randn(Bt, N, B, H, generator=g, requires_grad=True)
    num, den = dk.decayed_cross_entropy(h, head.weight, labels, ev, off, gamma=4.0, backend="torch")
    m = DecayedCrossEntropy(head, gamma=4.0, backend="torch")
    torch.testing.assert_close(m(h, labels, ev, off), num / (den + 1e-6))
    s = DecayedCrossEntropy(head.weight, gamma=4.0, reduction="sum", backend="torch")(h, labels, ev, off)
    torch.testing.assert_close(s[0], num)
    torch.testing.assert_close(s[1], den)
    assert list(m.state_dict()) == []
    with pytest.raises(ValueError, match="bias"):
        DecayedCrossEntropy(nn.Linear(H, V), gamma=4.0)
    with pytest.raises(ValueError, match="reduction"):
        DecayedCrossEntropy(head, gamma=4.0, reduction="none")


def test_swap_recipe_gives_the_same_loss_and_gradients():
    spec = importlib.util.spec_from_file_location("swap_modules", os.path.join(ROOT, "examples", "swap_modules.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (before, after), grads = mod.main()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
