"""The backend="torch" references against float64 computations written independently here."""
import math

import pytest
import torch

from d2kernels import decayed_cross_entropy, layout, noise_embedding, varprefix_attention
from tests.utils import rel_err


def loop_attention(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, scale):
    """Per block, per head: softmax over [ctx keys < anchor ; own block] (docs/semantics.md mask rule, no mask tensor)."""
    Bt, NB, Hq, D = q.shape
    G = Hq // k_ctx.shape[2]
    rows = []
    for b in range(Bt):
        blocks = []
        for n in range(NB // B):
            sl = slice(n * B, (n + 1) * B)
            if not keep[b, n]:
                blocks.append(torch.zeros_like(q[b, sl]))
                continue
            a = int(anchors[b, n])
            heads = []
            for h in range(Hq):
                kk = torch.cat([k_ctx[b, :a, h // G], k_draft[b, sl, h // G]])
                vv = torch.cat([v_ctx[b, :a, h // G], v_draft[b, sl, h // G]])
                p = torch.softmax(q[b, sl, h] @ kk.T * scale, dim=-1)
                heads.append(p @ vv)
            blocks.append(torch.stack(heads, dim=1))
        rows.append(torch.cat(blocks))
    return torch.stack(rows)


ATTN_CASES = [
    # Bt, S, N, B, Hq, Hkv, D
    (2, 13, 3, 4, 2, 1, 8),
    (1, 67, 5, 7, 4, 2, 16),
    (2, 9, 4, 1, 4, 4, 8),
    (1, 20, 2, 16, 4, 1, 12),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-S{}-N{}-b{}-HQ{}-HKV{}-D{}".format(*c))
def test_attention_reference(case, dtype):
    Bt, S, N, B, Hq, Hkv, D = case
    g = torch.Generator().manual_seed(sum(case))
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, kc, vc = mk(Bt, N * B, Hq, D), mk(Bt, S, Hkv, D), mk(Bt, S, Hkv, D)
    kd, vd = mk(Bt, N * B, Hkv, D), mk(Bt, N * B, Hkv, D)
    anchors = torch.randint(0, S, (Bt, N), generator=g)
    anchors[0, 0] = 0  # a kept block whose anchor is 0 sees only its own slots
    keep = torch.rand(Bt, N, generator=g) < 0.8
    keep[0, 0] = True
    keep[-1, -1] = False  # at least one dummy block
    ins = [t.detach().to(dtype).clone().requires_grad_() for t in (q, kc, vc, kd, vd)]
    refs = [t.detach().clone().requires_grad_() for t in (q, kc, vc, kd, vd)]
    scale = D**-0.5
    out = varprefix_attention(*ins, anchors, keep, block_size=B, backend="torch")
    ref = loop_attention(*refs, anchors, keep, B, scale)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out.double() * do).sum().backward()
    (ref * do).sum().backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    dummy = ~keep.repeat_interleave(B, dim=1)
    assert out.detach()[dummy].eq(0).all()
    for name, a, r in zip(("dq", "dk_ctx", "dv_ctx", "dk_draft", "dv_draft"), ins, refs):
        assert rel_err(a.grad, r.grad) < tol * 4, name
        assert torch.isfinite(a.grad).all(), name
    assert ins[0].grad[dummy].eq(0).all()


def test_attention_all_dummy_no_nan():
    q = torch.randn(1, 6, 2, 4, requires_grad=True)
    kc = torch.randn(1, 5, 1, 4, requires_grad=True)
    kd = torch.randn(1, 6, 1, 4, requires_grad=True)
    anchors, keep = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool)
    o = varprefix_attention(q, kc, kc, kd, kd, anchors, keep, block_size=3, backend="torch")
    o.sum().backward()
    assert o.eq(0).all() and q.grad.eq(0).all() and kc.grad.eq(0).all() and kd.grad.eq(0).all()


def test_embedding_reference():
    g = torch.Generator().manual_seed(0)
    Bt, S, N, B, V, H = 2, 15, 4, 5, 37, 6
    ids = torch.randint(0, V, (Bt, S), generator=g)
    anchors = torch.randint(0, S, (Bt, N), generator=g)
    keep = torch.rand(Bt, N, generator=g) < 0.7
    p = torch.randint(1, B, (Bt, N), generator=g)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    out = noise_embedding(w, ids, anchors, keep, p, block_size=B, mask_token_id=3, backend="torch")
    expect = torch.empty(Bt, N * B, H, dtype=torch.float64)
    dw = torch.zeros(V, H, dtype=torch.float64)
    go = torch.randn(Bt, N * B, H, dtype=torch.float64, generator=g)
    for b in range(Bt):
        for n in range(N):
            for k in range(B):
                pos = int(anchors[b, n]) + k
                tok = int(ids[b, pos]) if (k < p[b, n] and keep[b, n] and pos < S) else 3
                expect[b, n * B + k] = w.detach()[tok]
                dw[tok] += go[b, n * B + k]
    assert torch.equal(out.detach(), expect)
    (out * go).sum().backward()
    assert rel_err(w.grad, dw) < 1e-12


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("gamma", [None, 4.0])
def test_cross_entropy_reference(gamma, softcap):
    g = torch.Generator().manual_seed(1)
    T1, T2, H, V = 3, 7, 10, 29
    h = torch.randn(T1, T2, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (T1, T2), generator=g)
    ev = torch.rand(T1, T2, generator=g) < 0.6
    labels[~ev] = -100  # unsupervised labels are never read
    off = torch.randint(0, 6, (T1, T2), generator=g)
    num, den, correct = decayed_cross_entropy(h, W, labels, ev, off, gamma=gamma, softcap=softcap, return_correct=True, backend="torch")
    exp_num = torch.zeros((), dtype=torch.float64)
    exp_den = 0.0
    for i in range(T1):
        for j in range(T2):
            if not ev[i, j]:
                assert not correct[i, j]
                continue
            w = math.exp(-int(off[i, j]) / gamma) if gamma else 1.0
            z = W @ h[i, j]
            if softcap:
                z = softcap * torch.tanh(z / softcap)
            exp_num = exp_num + w * (torch.logsumexp(z, 0) - z[labels[i, j]])
            exp_den += w
            assert bool(correct[i, j]) == (int(z.argmax()) == int(labels[i, j]))
    assert abs(float(den) - exp_den) < 1e-6 * max(exp_den, 1.0)  # weights are float32 (docs/semantics.md)
    assert rel_err(num, exp_num) < 1e-6
    gh, gw = torch.autograd.grad(exp_num, (h, W))
    num.backward()
    assert rel_err(h.grad, gh) < 1e-6 and rel_err(W.grad, gw) < 1e-6


def test_cross_entropy_all_masked_is_zero():
    h = torch.randn(4, 8, requires_grad=True)
    W = torch.randn(11, 8, requires_grad=True)
    num, den = decayed_cross_entropy(h, W, torch.full((4,), -100), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), gamma=4.0, backend="torch")
    num.backward()
    assert num.item() == 0 and den.item() == 0
    assert h.grad.eq(0).all() and W.grad.eq(0).all()


def test_cross_entropy_fp32_matches_float64():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(50, 32, generator=g)
    W = torch.randn(300, 32, generator=g) * 0.3
    labels = torch.randint(0, 300, (50,), generator=g)
    ev = torch.ones(50, dtype=torch.bool)
    off = torch.arange(50) % 7
    num32, _ = decayed_cross_entropy(h, W, labels, ev, off, gamma=4.0, backend="torch")
    num64, _ = decayed_cross_entropy(h.double(), W.double(), labels, ev, off, gamma=4.0, backend="torch")
    assert rel_err(num32, num64) < 1e-5


def test_validation_messages():
    q = torch.randn(1, 6, 3, 4)
    kc = torch.randn(1, 5, 2, 4)
    kd = torch.randn(1, 6, 2, 4)
    a, keep = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        varprefix_attention(q, kc, kc, kd, kd, a, keep, block_size=3)
    q = torch.randn(1, 6, 4, 4)
    with pytest.raises(ValueError, match="anchors out of range"):
        varprefix_attention(q, kc, kc, kd, kd, torch.tensor([[0, 5]]), keep, block_size=3)
    with pytest.raises(ValueError, match="N\\*block_size"):
        varprefix_attention(q, kc, kc, kd, kd, a, keep, block_size=2)
    with pytest.raises(TypeError, match="one dtype"):
        varprefix_attention(q.half(), kc, kc, kd, kd, a, keep, block_size=3)
    with pytest.raises(ValueError, match="backend"):
        varprefix_attention(q, kc, kc, kd, kd, a, keep, block_size=3, backend="jax")
    W = torch.randn(10, 4)
    with pytest.raises(ValueError, match="labels out of range"):
        decayed_cross_entropy(torch.randn(2, 4), W, torch.tensor([1, 10]), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), gamma=None)
    with pytest.raises(ValueError, match="lm_head_weight"):
        decayed_cross_entropy(torch.randn(2, 5), W, torch.tensor([1, 2]), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), gamma=None)
    ids = torch.randint(0, 10, (1, 8))
    with pytest.raises(ValueError, match="mask_token_id"):
        noise_embedding(W, ids, a, keep, torch.ones(1, 2, dtype=torch.long), block_size=3, mask_token_id=10)
    with pytest.raises(ValueError, match="input_ids out of range"):
        noise_embedding(W, ids + 5, a, keep, torch.ones(1, 2, dtype=torch.long), block_size=3, mask_token_id=1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            varprefix_attention(q.cuda(), kc, kc, kd, kd, a, keep, block_size=3)


def test_draft_ids_match_embedding_rows():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (1, 12), generator=g)
    a, keep = layout.sample_anchors(torch.ones(1, 12, dtype=torch.bool), 3, generator=g)
    p = layout.sample_prefix_lengths(keep, 4, generator=g)
    W = torch.eye(20)
    emb = noise_embedding(W, ids, a, keep, p, block_size=4, mask_token_id=19, backend="torch")
    assert torch.equal(emb.argmax(-1), layout.draft_token_ids(ids, a, keep, p, 4, 19))


def test_validation_modes():
    import d2kernels

    W = torch.randn(10, 4)
    args = (torch.randn(2, 4), W, torch.tensor([1, 10]), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="validation mode"):
        d2kernels.set_validation("sometimes")
    prev = d2kernels.set_validation("sync")
    try:
        with pytest.raises(ValueError, match="labels out of range"):
            decayed_cross_entropy(*args[:2], torch.tensor([1, 10]), *args[3:], gamma=None)
        d2kernels.set_validation("off")
        from d2kernels._checks import check_range

        check_range("ids", torch.tensor([5]), 0, 3)  # off: not checked
        with d2kernels.validation("sync"):
            with pytest.raises(ValueError, match="ids out of range"):
                check_range("ids", torch.tensor([5]), 0, 3)
        check_range("ids", torch.tensor([5]), 0, 3)  # the block restored "off"
    finally:
        d2kernels.set_validation(prev)
