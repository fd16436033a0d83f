"""noise_embedding, Triton backend: forward and weight gradient against the float64 reference.

CPU runs the kernels in the Triton interpreter (set before triton is imported); GPU cases
(bf16, real shapes) run only with a CUDA device.
"""
import pytest
import torch
import torch.nn.functional as F

from d2kernels import noise_embedding
from d2kernels.embedding import triton as emb_triton
from d2kernels.layout import draft_token_ids, sample_anchors, sample_prefix_lengths
from tests.utils import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(Bt, S, N, B, V, H, *, dtype=torch.float32, seed=0, dummies=0.25, near_end=True, ids_dtype=torch.int64):
    """Random layout with dummies (garbage anchors), anchors at the sequence end and every prefix length."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g).to(dtype)
    input_ids = torch.randint(0, V, (Bt, S), generator=g).to(ids_dtype)
    anchors = torch.randint(0, S, (Bt, N), generator=g)
    keep = torch.rand(Bt, N, generator=g) >= dummies
    prefix_lens = torch.randint(1, B + 1, (Bt, N), generator=g)
    if near_end:
        anchors[:, -1] = S - 1
        keep[:, -1] = True
        prefix_lens[:, -1] = B
        if N > 1:
            anchors[:, 0] = max(S - B // 2 - 1, 0)
            keep[:, 0] = True
    # Dummy anchors may hold anything: the kernel must not read input_ids through them.
    anchors = torch.where(keep, anchors, torch.full_like(anchors, S + 1000))
    mask_id = int(torch.randint(0, V, (1,), generator=g))
    t = [x.to(DEV) for x in (weight, input_ids, anchors, keep, prefix_lens)]
    return (*t, mask_id)


def ref_ids(input_ids, anchors, keep, prefix_lens, B, mask_id):
    return draft_token_ids(input_ids, anchors, keep, prefix_lens, B, mask_id)


CASES = [
    # (Bt, S, N, B, V, H)
    (2, 67, 5, 7, 50, 33),
    (1, 13, 3, 1, 17, 8),  # B=1: only the anchor slot
    (3, 29, 4, 16, 7, 5),  # tiny vocab: every id repeats, odd H
    (1, 9, 6, 4, 300, 130),  # anchors crowd the end of a short sequence
]


def case_id(c):
    Bt, S, N, B, V, H = c
    return f"B{Bt}-S{S}-N{N}-b{B}-V{V}-H{H}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=case_id)
def test_forward_matches_reference(shape, dtype):
    Bt, S, N, B, V, H = shape
    w, ids, anc, keep, pl, mask_id = make_case(*shape, dtype=dtype)
    out = torch.full((Bt, N * B, H), float("nan"), dtype=dtype, device=DEV)
    emb_triton.noise_embedding_fwd(w, ids, anc, keep, pl, B, mask_id, out=out)
    ref = w.double()[ref_ids(ids, anc, keep, pl, B, mask_id)]
    assert rel_err(out, ref) == 0.0  # a gather is exact
    pub = noise_embedding(w, ids, anc, keep, pl, block_size=B, mask_token_id=mask_id, backend="triton")
    assert pub.dtype == dtype and pub.shape == (Bt, N * B, H)
    assert torch.equal(pub, out)


def _grads(shape, dtype, seed=1):
    Bt, S, N, B, V, H = shape
    w, ids, anc, keep, pl, mask_id = make_case(*shape, dtype=dtype, seed=seed)
    g = torch.randn(Bt, N * B, H, generator=torch.Generator().manual_seed(seed + 7)).to(dtype).to(DEV)
    w1 = w.clone().requires_grad_()
    noise_embedding(w1, ids, anc, keep, pl, block_size=B, mask_token_id=mask_id, backend="triton").backward(g)
    tok = ref_ids(ids, anc, keep, pl, B, mask_id)
    w64 = w.double().requires_grad_()
    F.embedding(tok, w64).backward(g.double())
    wt = w.clone().requires_grad_()
    F.embedding(tok, wt).backward(g)
    return w1.grad, w64.grad, wt.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=case_id)
def test_weight_grad_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(emb_triton, "_workspace", lambda shape, device: torch.full(shape, float("nan"), device=device))
    dw, ref, dw_torch = _grads(shape, dtype)
    assert dw.dtype == dtype and dw.shape == ref.shape
    err = rel_err(dw, ref)
    if dtype == torch.float32:
        assert err <= 1e-6
    else:
        # One rounding of an fp32 sum: never worse than torch's own low-precision backward.
        assert err <= max(2 * rel_err(dw_torch, ref), 2 ** -9) and err <= 2e-2


@pytest.mark.parametrize("chunk", [16, 64, 256], ids=lambda c: f"chunk{c}")
def test_backward_both_paths(chunk, monkeypatch):
    """Force short segments only (chunk 256) and the two-pass long-segment path (chunk 16)."""
    monkeypatch.setattr(emb_triton, "_bwd_config", lambda R, H: (chunk, 4, 16, 4))
    monkeypatch.setattr(emb_triton, "_workspace", lambda shape, device: torch.full(shape, float("nan"), device=device))
    shape = (2, 41, 9, 7, 11, 37)  # 126 slots over 11 ids: long and short segments mixed
    dw, ref, _ = _grads(shape, torch.float32, seed=3)
    assert rel_err(dw, ref) <= 1e-6


@pytest.mark.parametrize("cfg", [(1, 16, 1), (8, 32, 4), (2, 128, 2)], ids=lambda c: f"R{c[0]}-H{c[1]}-w{c[2]}")
def test_forward_tile_configs(cfg, monkeypatch):
    monkeypatch.setattr(emb_triton, "_fwd_config", lambda H, R, itemsize: cfg)
    shape = (2, 31, 5, 3, 40, 70)
    Bt, S, N, B, V, H = shape
    w, ids, anc, keep, pl, mask_id = make_case(*shape)
    out = torch.full((Bt, N * B, H), float("nan"), device=DEV)
    emb_triton.noise_embedding_fwd(w, ids, anc, keep, pl, B, mask_id, out=out)
    assert rel_err(out, w.double()[ref_ids(ids, anc, keep, pl, B, mask_id)]) == 0.0


def test_backward_deterministic():
    shape = (2, 37, 8, 7, 5, 24)  # heavy repetition: 112 slots over 5 ids
    a, _, _ = _grads(shape, torch.float32, seed=5)
    b, _, _ = _grads(shape, torch.float32, seed=5)
    assert torch.equal(a, b)


def test_all_dummies_and_strided_inputs():
    """Every block a dummy (all slots = mask id), int32 ids, non-contiguous ids and weight."""
    Bt, S, N, B, V, H = 2, 20, 4, 5, 30, 12
    w_big = torch.randn(V, 2 * H + 3, device=DEV)
    w = w_big[:, 1 : H + 1]  # row stride != H
    ids = torch.randint(0, V, (Bt, 2 * S), device=DEV, dtype=torch.int32)[:, ::2]
    anc = torch.randint(0, S, (Bt, N), device=DEV)
    pl = torch.full((Bt, N), B, device=DEV)
    for keep in (torch.zeros(Bt, N, dtype=torch.bool, device=DEV), torch.ones(Bt, N, dtype=torch.bool, device=DEV)):
        out = noise_embedding(w, ids, anc, keep, pl, block_size=B, mask_token_id=7, backend="triton")
        assert rel_err(out, w.double()[ref_ids(ids, anc, keep, pl, B, 7)]) == 0.0


def test_no_grad_when_weight_frozen():
    w, ids, anc, keep, pl, mask_id = make_case(1, 15, 3, 4, 20, 8)
    out = noise_embedding(w, ids, anc, keep, pl, block_size=4, mask_token_id=mask_id, backend="triton")
    assert not out.requires_grad


@needs_cuda
@pytest.mark.parametrize("B,H", [(7, 2560), (16, 4096), (7, 129)], ids=lambda x: str(x))
def test_gpu_bf16_real_shapes(B, H):
    torch.manual_seed(0)
    Bt, S, N, V = 2, 4096, 512, 151936
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, V, (Bt, S), device="cuda")
    lm = torch.ones(Bt, S, dtype=torch.bool, device="cuda")
    lm[:, : S - 300] = False  # 299 candidates for 512 anchors: the rest are dummies
    anc, keep = sample_anchors(lm, N)
    pl = sample_prefix_lengths(keep, B)
    tok = ref_ids(ids, anc, keep, pl, B, 5)
    out = torch.full((Bt, N * B, H), float("nan"), device="cuda", dtype=torch.bfloat16)
    emb_triton.noise_embedding_fwd(w, ids, anc, keep, pl, B, 5, out=out)
    assert torch.equal(out, w[tok])
    g = torch.randn(Bt, N * B, H, device="cuda", dtype=torch.bfloat16)
    dw = emb_triton.noise_embedding_bwd(g, ids, anc, keep, pl, B, 5, V)
    ref = torch.zeros(V, H, device="cuda", dtype=torch.float64).index_add_(0, tok.reshape(-1), g.reshape(-1, H).double())
    wt = w.clone().requires_grad_()
    F.embedding(tok, wt).backward(g)
    err = rel_err(dw, ref)
    assert err <= max(2 * rel_err(wt.grad, ref), 2 ** -9) and err <= 2e-2
    assert torch.equal(dw, emb_triton.noise_embedding_bwd(g, ids, anc, keep, pl, B, 5, V))
