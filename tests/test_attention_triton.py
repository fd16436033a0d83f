"""Triton ``varprefix_attention`` (forward, lse, all five gradients) against the float64 reference.

CPU runs the kernels in the Triton interpreter (tests/conftest.py) at small odd shapes in
fp32/fp16 (the interpreter's bf16 ``tl.dot`` is broken); the GPU cases add bf16, head_dim up to
512 and ``torch.compile``. Every buffer a kernel fills is allocated NaN-filled.
"""
import math

import pytest
import torch

import d2kernels.attention.triton as tri
from d2kernels.attention import varprefix_attention, varprefix_attention_naive, varprefix_layout, varprefix_mask
from d2kernels.layout import sample_anchors
from tests.utils import rel_err

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
NAMES = ("o", "dq", "dk_ctx", "dv_ctx", "dk_draft", "dv_draft")


def case_id(c):
    return "B{}-S{}-N{}-b{}-HQ{}-HKV{}-D{}".format(*c)


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Every kernel-filled buffer starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setattr(tri, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))


def force_tiles(monkeypatch, chooser):
    monkeypatch.setattr(tri, "pick_tiles", chooser)


def make_inputs(case, dtype, seed, keep_frac=0.75):
    """Random q/k/v (requires grad), unsorted anchors with one kept anchor-0 block and one dummy."""
    Bt, S, N, B, Hq, Hkv, D = case
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_()
    ins = [mk(Bt, N * B, Hq, D), mk(Bt, S, Hkv, D), mk(Bt, S, Hkv, D), mk(Bt, N * B, Hkv, D), mk(Bt, N * B, Hkv, D)]
    anchors = torch.randint(0, S, (Bt, N), generator=g)
    keep = torch.rand(Bt, N, generator=g) < keep_frac
    anchors[0, 0], keep[0, 0] = 0, True  # a kept block whose anchor is 0 sees only its own slots
    if N > 1:
        keep[-1, -1] = False  # at least one dummy block
    do = torch.randn(Bt, N * B, Hq, D, generator=g).to(DEV, dtype)
    return ins, anchors.to(DEV), keep.to(DEV), do


def run(fn, ins, anchors, keep, do, B):
    o = fn(*ins, anchors, keep, block_size=B)
    return [o.detach(), *torch.autograd.grad(o, ins, do)]


def triton_fn(*a, **k):
    return varprefix_attention(*a, **k, backend="triton")


def atomic_fn(*a, **k):
    return varprefix_attention(*a, **k, backend="triton", deterministic=False)


def layout_fn(q, kc, vc, kd, vd, anchors, keep, block_size):
    """The drafter's way: a layout built once, the op called without anchors."""
    lay = varprefix_layout(anchors, keep, block_size=block_size, seq_len=kc.shape[1])
    return varprefix_attention(q, kc, vc, kd, vd, layout=lay, backend="triton")


PATHS = {"deterministic": triton_fn, "atomic": atomic_fn, "layout": layout_fn}


def naive_fn(*a, block_size):
    return varprefix_attention_naive(*a, block_size, a[0].shape[-1] ** -0.5)


def reference(ins, anchors, keep, do, B):
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    return run(naive_fn, ref_in, anchors, keep, do.double(), B)


def check(outs, refs, dtype, baseline=None):
    """fp32: <= 1e-4 relative; fp16/bf16: <= 2x the naive same-dtype error and <= 2e-2 (docs/semantics.md)."""
    for i, (name, out, ref) in enumerate(zip(NAMES, outs, refs)):
        assert out.shape == ref.shape and out.dtype == dtype, name
        err = rel_err(out, ref)
        if dtype == torch.float32:
            assert err <= 1e-4, f"{name}: rel err {err:.3g}"
        else:
            base = rel_err(baseline[i], ref)
            assert err <= max(2 * base, 1e-3) and err <= 2e-2, f"{name}: rel err {err:.3g}, naive {base:.3g}"


def compare(case, dtype, seed=0, keep_frac=0.75, fn=triton_fn):
    ins, anchors, keep, do = make_inputs(case, dtype, seed, keep_frac)
    B = case[3]
    outs = run(fn, ins, anchors, keep, do, B)
    refs = reference(ins, anchors, keep, do, B)
    baseline = None if dtype == torch.float32 else run(naive_fn, ins, anchors, keep, do, B)
    check(outs, refs, dtype, baseline)
    return outs


SMALL = tri.Tiles(16, 16, 4, 1)

CPU_CASES = [
    # Bt, S, N, B, Hq, Hkv, D, dtype
    ((2, 67, 5, 7, 4, 2, 32), torch.float32),  # GQA 2, the DESIGN example shape
    ((1, 45, 6, 3, 2, 2, 16), torch.float32),  # GQA 1
    ((2, 41, 4, 1, 4, 1, 48), torch.float32),  # GQA 4, B=1, head_dim not a power of two
    ((1, 29, 2, 32, 2, 1, 16), torch.float32),  # B=32: one block spans several key tiles
    ((1, 70, 3, 16, 4, 1, 24), torch.float16),
    ((3, 33, 3, 7, 6, 2, 16), torch.float16),  # GQA 3 (rows per tile not a power of two), Bt=3
]


@pytest.mark.parametrize("path", ["atomic", "deterministic"])
@pytest.mark.parametrize("case,dtype", CPU_CASES, ids=[f"{case_id(c)}-{str(d)[6:]}" for c, d in CPU_CASES])
def test_matches_reference_small_tiles(monkeypatch, case, dtype, path):
    # 16x16 tiles: many unmasked context tiles, boundary tiles, and blocks straddling query tiles.
    force_tiles(monkeypatch, lambda *a: SMALL)
    compare(case, dtype, fn=PATHS[path])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_ds_and_presort_variants(monkeypatch, dtype):
    """The optional paths: ds as hi + lo halves, and context dk/dv over presorted q/do copies."""
    force_tiles(monkeypatch, lambda *a: tri.Tiles(16, 16, 4, 1, split_ds=True, presort=True))
    compare((2, 37, 4, 5, 4, 2, 16), dtype, seed=2)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case,dtype", CPU_CASES[:1] + CPU_CASES[4:5], ids=lambda x: case_id(x) if isinstance(x, tuple) else str(x)[6:])
def test_matches_reference_default_tiles(case, dtype, path):
    compare(case, dtype, seed=1, fn=PATHS[path])


@pytest.mark.parametrize("bucket", sorted(tri.TILE_TABLES))
def test_every_tile_table(monkeypatch, bucket):
    """Run each head_dim bucket's tile table (forced) at a small shape with GQA 8."""
    for t in tri.TILE_TABLES[bucket].values():
        t = tri.fit_group(t, 8)
        assert t.block_m >= 16 and t.block_n >= 16
        assert t.block_m & (t.block_m - 1) == 0 and t.block_n & (t.block_n - 1) == 0
    force_tiles(monkeypatch, lambda kind, D, B, G, dtype: tri.fit_group(tri.TILE_TABLES[bucket][kind], G))
    for fn in (triton_fn, atomic_fn):
        compare((1, 37, 3, 5, 8, 1, 16), torch.float32, seed=bucket, fn=fn)


def test_pick_tiles_buckets():
    """head_dim picks the smallest bucket that holds it; fp32 above 128 moves one bucket up."""
    f16, f32 = torch.float16, torch.float32
    assert tri.pick_tiles("fwd", 48, 7, 4, f16) == tri.fit_group(tri.TILE_TABLES[64]["fwd"], 4)
    assert tri.pick_tiles("fwd", 128, 7, 4, f16) == tri.TILE_TABLES[128]["fwd"]
    assert tri.pick_tiles("dq", 128, 7, 4, f32).num_stages == 2
    assert tri.pick_tiles("fwd", 256, 7, 4, f32) == tri.TILE_TABLES[512]["fwd"]
    assert tri.pick_tiles("dkdv", 512, 7, 4, f32) == tri.TILE_TABLES[1024]["dkdv"]
    assert tri.pick_tiles("dkdv", 2048, 7, 4, f16) == tri.TILE_TABLES[1024]["dkdv"]


def test_dummy_blocks_and_anchor_zero(monkeypatch):
    """Dummies output exactly 0 and get/give no gradient; anchor-0 blocks never touch the context."""
    force_tiles(monkeypatch, lambda *a: SMALL)
    case = (2, 23, 4, 3, 2, 1, 16)
    Bt, S, N, B, Hq, Hkv, D = case
    ins, _, _, do = make_inputs(case, torch.float32, seed=3)
    anchors = torch.tensor([[5, 9, 17, 2], [0, 0, 0, 0]], device=DEV)
    keep = torch.tensor([[False, False, False, False], [True, True, False, True]], device=DEV)
    outs = run(triton_fn, ins, anchors, keep, do, B)
    check(outs, reference(ins, anchors, keep, do, B), torch.float32)
    o, dq, dk_ctx, dv_ctx, dk_draft, dv_draft = outs
    assert all(torch.isfinite(t).all() for t in outs)
    assert (o[0] == 0).all() and (dq[0] == 0).all() and (dk_draft[0] == 0).all() and (dv_draft[0] == 0).all()
    assert (o[1, 2 * B:3 * B] == 0).all() and (dq[1, 2 * B:3 * B] == 0).all()
    assert (dk_draft[1, 2 * B:3 * B] == 0).all() and (dv_draft[1, 2 * B:3 * B] == 0).all()
    # Nobody sees any context key: sample 0 is all dummies, sample 1 anchors at 0.
    assert (dk_ctx == 0).all() and (dv_ctx == 0).all()


def test_lse(monkeypatch):
    force_tiles(monkeypatch, lambda *a: SMALL)
    case = (2, 50, 5, 4, 4, 2, 16)
    Bt, S, N, B, Hq, Hkv, D = case
    ins, anchors, keep, _ = make_inputs(case, torch.float32, seed=4)
    scale = 0.3
    o, lse = tri.varprefix_attention_fwd(*[t.detach() for t in ins], anchors, keep, B, scale)
    q, kc, _, kd, _ = [t.detach().double() for t in ins]
    k = torch.cat([kc, kd], 1).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~varprefix_mask(anchors, keep, S, B)[:, None], -math.inf)
    ref = torch.logsumexp(s, dim=-1)  # [Bt, Hq, NB], -inf on dummy rows
    dummy = ~keep.repeat_interleave(B, dim=1)[:, None].expand_as(ref)
    assert lse.dtype == torch.float32 and lse.shape == (Bt, Hq, N * B)
    assert (lse[dummy] == -math.inf).all()
    assert rel_err(lse[~dummy], ref[~dummy]) <= 1e-6


def test_descending_and_sorted_anchors(monkeypatch):
    """Anchors in any order: descending, and sorted as sample_anchors draws them."""
    force_tiles(monkeypatch, lambda *a: SMALL)
    case = (1, 41, 6, 4, 4, 2, 16)
    Bt, S, N, B, Hq, Hkv, D = case
    ins, _, _, do = make_inputs(case, torch.float32, seed=5)
    for anchors, keep in (
        (torch.tensor([[39, 30, 23, 20, 7, 1]]), torch.ones(1, N, dtype=torch.bool)),
        sample_anchors(torch.ones(1, S, dtype=torch.long), N, generator=torch.Generator().manual_seed(5)),
    ):
        anchors, keep = anchors.to(DEV), keep.to(DEV)
        check(run(triton_fn, ins, anchors, keep, do, B), reference(ins, anchors, keep, do, B), torch.float32)


def test_non_contiguous_inputs(monkeypatch):
    force_tiles(monkeypatch, lambda *a: SMALL)
    Bt, S, N, B, Hq, Hkv, D = case = (2, 31, 3, 5, 4, 2, 16)
    ins, anchors, keep, do = make_inputs(case, torch.float32, seed=6)
    q = ins[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [Bt, NB, Hq, D] head-major
    kc = torch.stack([ins[1].detach()] * 2, dim=-1).flatten(-2)[..., ::2].requires_grad_()  # head_dim stride 2
    vc = ins[2].detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_()
    kd = ins[3].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    nc = [q, kc, vc, kd, ins[4]]
    assert not any(t.is_contiguous() for t in nc[:4])
    outs = run(triton_fn, nc, anchors, keep, do.transpose(1, 2).contiguous().transpose(1, 2), B)
    check(outs, reference(ins, anchors, keep, do, B), torch.float32)
    assert all(g.shape == t.shape for g, t in zip(outs[1:], nc))


def test_autograd_through_public_op():
    """The custom-op path (autograd.Function wiring, default scale) agrees with direct launcher calls."""
    case = (1, 20, 2, 3, 2, 1, 16)
    ins, anchors, keep, do = make_inputs(case, torch.float32, seed=7)
    o = varprefix_attention(*ins, anchors, keep, block_size=3, backend="triton")
    o2, lse = tri.varprefix_attention_fwd(*[t.detach() for t in ins], anchors, keep, 3, 16**-0.5)
    assert torch.equal(o.detach(), o2)
    for det in (False, True):
        o = varprefix_attention(*ins, anchors, keep, block_size=3, backend="triton", deterministic=det)
        g = torch.autograd.grad(o, ins, do)
        g2 = tri.varprefix_attention_bwd(do, *[t.detach() for t in ins], o2, lse, anchors, keep, 3, 16**-0.5,
                                         deterministic=det)
        assert all(torch.equal(a, b) for a, b in zip(g, g2))


def test_layout():
    """A layout gives the op's exact results, carries the sort, and checks the anchors once."""
    case = (2, 31, 4, 3, 4, 2, 16)
    ins, anchors, keep, do = make_inputs(case, torch.float32, seed=14)
    lay = varprefix_layout(anchors, keep, block_size=3, seq_len=31)
    ref, idx = torch.sort(torch.where(keep, anchors, -1), dim=1, stable=True)
    assert torch.equal(lay.sorted_anchors.long(), ref) and torch.equal(lay.perm.long(), idx)
    a = run(triton_fn, ins, anchors, keep, do, 3)
    b = run(layout_fn, ins, anchors, keep, do, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="anchors out of range"):
        varprefix_layout(anchors, keep, block_size=3, seq_len=int(anchors.max()))
    with pytest.raises(ValueError, match="differs from the layout"):
        varprefix_attention(*ins, layout=lay, block_size=4)
    with pytest.raises(TypeError, match="or a layout"):
        varprefix_attention(*ins, anchors, keep)


def test_compiled_layer_one_graph_no_recompile():
    """A layer calling the op with the step's layout compiles to one graph, no break, and a new
    context length S (dynamic shapes) does not recompile; the layout may also be built inside."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    Hq, Hkv, D, B, N = 4, 2, 16, 3, 3

    @torch.compile(backend=cnt, dynamic=True, fullgraph=True)
    def layer(x, ctx, lay):  # x [1, NB, D], ctx [1, S, D]
        q = (x * 2.0).unsqueeze(2).expand(-1, -1, Hq, -1)
        k = torch.cat([ctx, x], 1).unsqueeze(2).expand(-1, -1, Hkv, -1)
        S = ctx.shape[1]
        o = varprefix_attention(q, k[:, :S], k[:, :S] + 1, k[:, S:], k[:, S:] - 1, layout=lay, backend="triton")
        return o.sum(2)

    for S in (19, 23, 29):
        g = torch.Generator().manual_seed(S)
        x = torch.randn(1, N * B, D, generator=g).to(DEV).requires_grad_()
        ctx = torch.randn(1, S, D, generator=g).to(DEV).requires_grad_()
        anchors, keep = sample_anchors(torch.ones(1, S, dtype=torch.long), N, generator=g)
        lay = varprefix_layout(anchors.to(DEV), keep.to(DEV), block_size=B, seq_len=S)
        out = layer(x, ctx, lay)
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(ctx.grad).all()
    assert cnt.frame_count == 1, f"{cnt.frame_count} compiles"
    assert not torch._dynamo.utils.counters["graph_break"]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def built_inside(q, kc, vc, kd, vd, anchors, keep):
        lay = varprefix_layout(anchors, keep, block_size=3, seq_len=kc.shape[1])
        return varprefix_attention(q, kc, vc, kd, vd, layout=lay, backend="triton")

    ins, anchors, keep, _ = make_inputs((1, 20, 2, 3, 2, 1, 16), torch.float32, seed=15)
    assert torch.equal(built_inside(*ins, anchors, keep), triton_fn(*ins, anchors, keep, block_size=3))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

GPU_CASES = [
    (2, 517, 41, 7, 8, 2, 64),
    (2, 517, 41, 7, 8, 2, 128),
    (1, 517, 41, 7, 8, 2, 256),
    (1, 1030, 64, 16, 32, 8, 128),
]


@gpu
@pytest.mark.parametrize("path", ["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_accuracy(case, dtype, path):
    compare(case, dtype, seed=11, fn=PATHS[path])


@gpu
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", [
    (2, 67, 9, 7, 8, 8, 64),  # odd S, GQA 1
    (1, 67, 9, 7, 8, 4, 128),  # GQA 2
    (2, 67, 9, 7, 8, 2, 256),  # GQA 4, head_dim 256
    (1, 67, 5, 16, 4, 1, 128),  # a block longer than a third of the context
], ids=case_id)
def test_gpu_hostile_bf16(case, path):
    """Odd context length, dummies, an anchor-0 block, GQA 1/2/4, head_dim 64/128/256."""
    compare(case, torch.bfloat16, seed=16, fn=PATHS[path])


@gpu
@pytest.mark.parametrize("case", [
    (1, 300, 20, 1, 8, 1, 128),  # GQA 8, B=1
    (2, 301, 9, 32, 6, 3, 128),  # GQA 2, B=32
    (1, 257, 13, 5, 5, 1, 64),  # GQA 5
    (1, 130, 6, 7, 4, 2, 512),  # head_dim 512: correct, if slower
], ids=case_id)
def test_gpu_shapes_bf16(case):
    compare(case, torch.bfloat16, seed=12)


@gpu
def test_gpu_deterministic():
    """The default (deterministic) backward is bitwise repeatable; the atomic one in all but dq."""
    ins, anchors, keep, do = make_inputs((1, 700, 64, 7, 8, 2, 128), torch.bfloat16, seed=13)
    a = run(triton_fn, ins, anchors, keep, do, 7)
    b = run(triton_fn, ins, anchors, keep, do, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c, d = (run(atomic_fn, ins, anchors, keep, do, 7) for _ in range(2))
    assert all(torch.equal(x, y) for i, (x, y) in enumerate(zip(c, d)) if NAMES[i] != "dq")


@pytest.mark.parametrize(
    "case,dtype,block_size,backend",
    [
        # CPU-cheap: aot_eager traces the op into one graph (no break on validation)
        pytest.param((1, 19, 2, 3, 2, 1, 16), torch.float32, 3, "aot_eager", id="aot_eager-fp32"),
        pytest.param((1, 333, 24, 7, 8, 2, 128), torch.bfloat16, 7, "inductor", id="inductor-bf16", marks=gpu),
    ],
)
def test_torch_compile_fullgraph(case, dtype, block_size, backend):
    """Under ``torch.compile(fullgraph=True)`` the op gives exactly the eager outputs and gradients."""
    ins, anchors, keep, do = make_inputs(case, dtype, seed=8)

    @torch.compile(fullgraph=True, backend=backend)
    def step(q, kc, vc, kd, vd):
        return varprefix_attention(q, kc, vc, kd, vd, anchors, keep, block_size=block_size, backend="triton") * 2.0

    o = step(*ins)
    grads = torch.autograd.grad(o, ins, do)
    eager = run(triton_fn, ins, anchors, keep, 2.0 * do, block_size)
    assert torch.equal(o.detach(), 2.0 * eager[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, eager[1:]))


def test_sort_blocks_matches_stable_sort():
    """The one-launch rank sort equals torch's stable sort of (anchor, -1 for dummies), ties included."""
    g = torch.Generator().manual_seed(9)
    for Bt, N, S in [(1, 1, 3), (2, 7, 4), (3, 200, 50)]:
        anchors = torch.randint(0, S, (Bt, N), generator=g)
        keep = torch.rand(Bt, N, generator=g) < 0.7
        sanc, perm = tri._sort_blocks(anchors.to(DEV), keep.to(DEV))
        ref, idx = torch.sort(torch.where(keep, anchors, -1), dim=1, stable=True)
        assert torch.equal(sanc.cpu().long(), ref) and torch.equal(perm.cpu().long(), idx)
