"""``decayed_cross_entropy(backend="triton")`` against the float64 naive reference.

CPU: the Triton interpreter at small V/H in fp32/fp16 (bf16 ``tl.dot`` is broken there).
GPU: bf16 at real vocabulary sizes, acceptance per docs/semantics.md (error <= 2x plain torch bf16, <= 2e-2).
"""
import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import d2kernels.cross_entropy.triton as ce_triton
from d2kernels import validation
from d2kernels.cross_entropy import CEOptions, decayed_cross_entropy
from d2kernels.cross_entropy.triton import _wait_count
from d2kernels.layout import decay_weights
from tests.utils import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MiB = 1 << 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_plan(Tc, H, V, p_bytes, cfg, write_p):
    """Force the multi-block, multi-chunk paths: one tile of rows per T-block, one tile of columns
    per vocabulary chunk (the smallest plan the kernels accept: the GPU tiles are 128 x 256)."""
    return (min(Tc, cfg.block_m) if write_p else Tc), cfg.block_n


def tiny_plan_split(Tc, H, V, itemsize, cfg, need_dh, gather):
    """Split schedule: 32-row T-blocks, 100-column chunks (two row-pass tiles of 64 on the CPU, the
    second partial; the last chunk narrower still)."""
    return min(Tc, 32), min(V, 100)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(ce_triton, "_plan", tiny_plan)
    monkeypatch.setattr(ce_triton, "_plan_split", tiny_plan_split)


def use_config(monkeypatch, **changes):
    """Run the launchers with ``_config``'s choice changed by ``changes`` (e.g. ``schedule="split"``)."""
    orig = ce_triton._config
    monkeypatch.setattr(ce_triton, "_config", lambda dev, dt: dataclasses.replace(orig(dev, dt), **changes))


@pytest.fixture(params=["fused", "split", "split-sk"])
def schedule(request, monkeypatch):
    """Both schedules (the split one runs for 16-bit inputs of one dtype; fp32 always takes the fused one);
    split-sk: the split schedule with its ``acc += P @ W`` by the stream-K kernel (``mm2="streamk"``)."""
    if request.param == "split-sk":
        use_config(monkeypatch, schedule="split", mm2="streamk")
    else:
        use_config(monkeypatch, schedule=request.param)
    return request.param


def only_16bit(schedule, dt):
    if schedule.startswith("split") and dt == "fp32":
        pytest.skip("fp32 inputs always take the fused schedule (covered by the fused case)")


def test_plan_respects_budget():
    cfg = ce_triton.CEConfig()
    for Tc, H, V in [(3584, 2560, 151936), (1792, 2560, 151936), (8192, 4096, 262144), (5, 64, 257), (300, 8192, 1000)]:
        Tb, Vc = ce_triton._plan(Tc, H, V, 2, cfg, True)
        assert Vc % cfg.block_n == 0 and cfg.block_n <= Vc <= triton_cdiv(V, cfg.block_n) * cfg.block_n
        assert 1 <= Tb <= Tc and (Tb == Tc or Tb % cfg.block_m == 0)
        assert Tb * H * 4 + Tb * Vc * 2 <= cfg.budget or Vc == cfg.block_n or Tb == cfg.block_m
        assert ce_triton._plan(Tc, H, V, 2, cfg, False)[0] == Tc


def test_plan_split_respects_budget():
    cfg = ce_triton.CEConfig(schedule="split", budget=45 << 20)
    for Tc, H, V in [(3584, 2560, 151936), (1792, 2560, 151936), (8192, 4096, 262144), (5, 64, 257), (300, 8192, 1000)]:
        for need_dh in (True, False):
            for gather in (True, False):
                Tb, Vc = ce_triton._plan_split(Tc, H, V, 2, cfg, need_dh, gather)
                assert 1 <= Tb <= Tc and (Tb == Tc or Tb % cfg.block_m == 0) and 1 <= Vc <= V
                assert Vc == V or Vc % 64 == 0
                per_row = (4 * H if need_dh else 0) + (2 * H if gather else 0)
                assert Tb * (per_row + 2 * Vc) <= cfg.budget or Vc == 64 or Tb == cfg.block_m
                if not need_dh and not gather:
                    assert Tb == Tc


@pytest.mark.parametrize("T,H,V,frac,want", [
    (3584, 2560, 151936, 1.0, (1536, 10368)),  # 45.5 MiB: 1536 + 1536 + 512 (the last block's chunks 30400 wide)
    (3584, 2560, 151936, 0.5, (1280, 10944)),  # ~50% supervised, rows gathered: 1280 + 512
    (3584, 4096, 151936, 1.0, (1280, 6144)),  # 35 MiB: 1280 + 1280 + 1024
    (8192, 4096, 262144, 1.0, (1024, 16896)),  # a stash of the cap's size: 62 MiB beyond it, 1024-row blocks,
    (8192, 4096, 262144, 0.5, (1024, 16896)),  # chunks of 66 x 256 columns (x 8 row tiles = 4 waves on 132 SMs)
    (8192, 2560, 151936, 1.0, (2048, 10240)),  # 60 MiB
    (8192, 2560, 151936, 0.5, (1792, 9856)),
])
def test_plan_split_blocks_at_the_benchmark_shapes(T, H, V, frac, want):
    """The split plan with a stash at the shapes it was timed at on the H200 (CEConfig's comments), and
    the budget that keeps stash + chunks within the 64 MiB cap where the stash leaves room for it, and
    the chunks alone within it where the stash (the returned gradient) does not."""
    cfg = ce_triton.CEConfig()
    stash = T * H * 2
    budget = ce_triton._stash_budget(stash, cfg)
    if stash + 32 * MiB <= 64 * MiB:
        assert stash + budget < 64 * MiB
    else:
        assert budget == min(max(45 * MiB, int(1.5 * stash)), 62 * MiB)
    Tc = int(T * frac)
    assert ce_triton._split_plan(T, Tc, H, V, 2, cfg, True) == want  # what the forward runs
    Tb, Vc = want
    assert Tb * (4 * H + (2 * H if Tc < T else 0) + 2 * Vc) <= budget
    if stash >= cfg.peak_cap:  # 1024-row blocks, chunks whose first matmul fills whole waves
        assert Tb <= cfg.big_stash_rows and (Tb // 128) * (Vc // 256) % cfg.sms == 0 and Vc % 256 == 0
    else:
        assert ce_triton._plan_split(Tc, H, V, 2, dataclasses.replace(cfg, budget=budget), True, Tc < T) == want
        assert ce_triton._plan_split(Tc, H, V, 2, dataclasses.replace(cfg, budget=budget, rows_tail=False), True,
                                     Tc < T)[0] <= Tb
    assert ce_triton._stash_budget(stash, dataclasses.replace(cfg, peak_cap=0, budget=45 * MiB)) == max(
        45 * MiB, min(int(1.5 * stash), 1 << 30))


def test_big_stash_plan(poison, monkeypatch):
    """A stash of at least the cap: T-blocks of at most ``big_stash_rows``, chunks cut to whole-wave
    steps (here 1 SM: multiples of 256 columns) within the capped budget; forward and gradient match."""
    bm = ce_triton._config(torch.device(DEV), torch.float16).block_m
    T, H, V = 600, 64, 1000
    budget = bm * (6 * H + 2 * 832)  # one row tile of acc f32 + gathered h fp16 + chunks of 832 columns
    use_config(monkeypatch, schedule="split", peak_cap=16 << 10, budget=budget, budget_min=budget,
               big_stash_rows=2 * bm, sms=1, spec_chunks=0)  # spec_chunks: no speculated chunk among the widths
    cfg = ce_triton._config(torch.device(DEV), torch.float16)
    assert ce_triton._stash_budget(T * H * 2, cfg) == budget
    widths = []
    rows_pass = ce_triton._rows_pass
    monkeypatch.setattr(ce_triton, "_rows_pass", lambda s, *a: widths.append(tuple(s.shape)) or rows_pass(s, *a))
    h, W, labels, mask, off = make_case((T,), H, V, torch.float16, frac=0.6, seed=8)
    num, den, cor, dh, dw = run(h, W, labels, mask, off, w_grad=False)
    rnum, rden, rcor, rdh, rdw = reference(h, W, labels, mask, off, w_grad=False)
    assert_like_torch("fp16", (num, dh), torch_lowp(h, W, labels, mask, off, w_grad=False)[:2], (rnum, rdh))
    Tb, Vc = ce_triton._split_plan(T, int(mask.sum()), H, V, 2, cfg, True)
    assert (Tb, Vc) == (bm, 768), (Tb, Vc)  # 832 columns cut to 3 x 256
    assert widths[:2] == [(Tb, Vc), (Tb, V - Vc)], widths


def test_block_cols_fill_the_same_buffer():
    """A shorter last T-block takes wider chunks, as even as the buffer allows: never more elements
    than ``Tb x Vc``, a multiple of 64 (or all of V), never narrower than ``Vc``."""
    for tb, Tb, Vc, V in [(1024, 1280, 13312, 151936), (256, 1664, 9024, 151936), (1, 32, 100, 257),
                          (343, 384, 1000, 20011), (1280, 1280, 13312, 151936), (10, 384, 1000, 1000)]:
        vc = ce_triton._block_cols(tb, Tb, Vc, V)
        assert Vc <= vc <= V and tb * vc <= Tb * Vc and (vc == V or vc % 64 == 0), (tb, Tb, Vc, V, vc)
        if tb == Tb:
            assert vc == Vc
    assert ce_triton._block_cols(1024, 1280, 13312, 151936) == 15232  # 10 chunks instead of 12


@pytest.mark.parametrize("how", ["split_rows", "w_chunk_bytes"])
def test_split_rows_blocks_and_wider_tail_chunks(how, poison, monkeypatch):
    """T-blocks of ``split_rows`` rows (or as tall as chunks of ``w_chunk_bytes`` allow) and a shorter
    last one, whose chunks are wider (same buffer); forward and both gradients match float64."""
    bm = ce_triton._config(torch.device(DEV), torch.float16).block_m
    H, V, per_row = 64, 1000, 6 * 64  # acc f32 + gathered h fp16
    budget = 2 * bm * per_row + 2 * bm * 2 * 192  # T-blocks of 2 bm rows x chunks of 192 columns
    if how == "split_rows":
        use_config(monkeypatch, schedule="split", split_rows=2 * bm, budget=budget, peak_cap=0, budget_per_stash=0.0,
                   spec_chunks=0)
    else:
        use_config(monkeypatch, schedule="split", budget=budget, peak_cap=0, budget_per_stash=0.0, w_chunk_bytes=192 * H * 2,
                   spec_chunks=0)
    widths = []
    rows_pass = ce_triton._rows_pass
    monkeypatch.setattr(ce_triton, "_rows_pass", lambda s, *a: widths.append(tuple(s.shape)) or rows_pass(s, *a))
    h, W, labels, mask, off = make_case((int(4.7 * bm),), H, V, torch.float16, frac=0.6, seed=3)
    num, den, cor, dh, dw = run(h, W, labels, mask, off, softcap=30.0)
    rnum, rden, rcor, rdh, rdw = reference(h, W, labels, mask, off, softcap=30.0)
    assert_like_torch("fp16", (num, dh, dw), torch_lowp(h, W, labels, mask, off, softcap=30.0), (rnum, rdh, rdw))
    assert torch.equal(cor.cpu(), rcor.cpu())
    Tc = int(mask.sum())
    tail_rows = Tc % (2 * bm)
    full = [w for (r, w) in widths if r == 2 * bm]  # the dW pass's chunks have all Tc rows
    tail = [w for (r, w) in widths if r == tail_rows]
    assert tail_rows and full[:6] == [192, 192, 192, 192, 192, 40], widths
    vc = ce_triton._block_cols(tail_rows, 2 * bm, 192, V)
    assert vc > 192 and tail == [vc] * (V // vc) + ([V % vc] if V % vc else []), widths


@pytest.mark.parametrize("dt", ["fp16", "bf16"] if DEV == "cuda" else ["fp16"])
def test_speculated_first_chunk_kept_or_redone(dt, poison, tiny, monkeypatch):
    """The split schedule queues its first chunk before the count is known, on the plan the last call of
    the shape had (all supervised on the first call). Same plan: the chunk is kept (no extra row pass);
    another plan: one wasted chunk, redone. Every call's loss, gradient and flags equal those without
    speculation bit for bit, also when the count changed but the plan did not (other rows gathered)."""
    use_config(monkeypatch, schedule="split")
    monkeypatch.setattr(ce_triton, "_TC_SEEN", {})
    widths = []
    rows_pass = ce_triton._rows_pass
    monkeypatch.setattr(ce_triton, "_rows_pass", lambda s, *a: widths.append(tuple(s.shape)) or rows_pass(s, *a))
    H, V = 64, 257
    cases = [make_case((90,), H, V, DTYPES[dt], frac=f, seed=s) for f, s in ((0.6, 1), (0.6, 1), (0.7, 2), (1.0, 3), (1.0, 3))]
    # the plan (tiny: 32-row blocks, gathered unless all supervised) of each call after the first is
    # that of the call before, except where all-supervised follows gathered: 0 = kept, 1 = redone
    wasted = [1, 0, 0, 1, 0]
    for case, waste in zip(cases, wasted):
        counts, outs = [], []
        for spec in (1, 0):  # both calls leave the same count behind for the next case
            use_config(monkeypatch, schedule="split", spec_chunks=spec)
            widths.clear()
            outs.append(run(*case))
            counts.append(len(widths))
        assert counts[0] == counts[1] + waste, (counts, waste)
        for a, b in zip(outs[0], outs[1]):
            assert torch.equal(a, b)
        rnum, rden, rcor, rdh, rdw = reference(*case)
        assert_like_torch(dt, outs[0][:1] + outs[0][3:], torch_lowp(*case), (rnum, rdh, rdw))


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.fixture
def poison(monkeypatch):
    """Every scratch buffer starts NaN: an unwritten tile read by a kernel shows up as NaN."""
    monkeypatch.setattr(ce_triton, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_case(lead, H, V, dtype, frac=0.6, seed=0, hscale=1.0, wscale=0.3, hot=0.3):
    """Inputs with ``hot`` of the rows made to have their label as a clear argmax (so ``correct`` is mixed)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g) * hscale
    W = torch.randn(V, H, generator=g) * wscale
    labels = torch.randint(0, V, lead, generator=g)
    flat_h, flat_l = h.view(-1, H), labels.view(-1)
    hot_rows = torch.rand(flat_l.shape, generator=g) < hot
    flat_h[hot_rows] += 2.0 * W[flat_l[hot_rows]] / W[flat_l[hot_rows]].norm(dim=-1, keepdim=True) ** 2 * 8.0
    eval_mask = torch.rand(lead, generator=g) < frac
    offsets = torch.randint(0, 7, lead, generator=g)
    # unsupervised rows carry out-of-range labels: they must never be read
    labels = torch.where(eval_mask, labels, torch.full_like(labels, -100))
    return h.to(dtype).to(DEV), W.to(dtype).to(DEV), labels.to(DEV), eval_mask.to(DEV), offsets.to(DEV)


def run(h, W, labels, eval_mask, offsets, *, gamma=4.0, softcap=None, w_grad=True, backend="triton", correct=True):
    h = h.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(w_grad)
    num, den, cor = decayed_cross_entropy(h, W, labels, eval_mask, offsets, gamma=gamma, softcap=softcap,
                                          return_correct=True, backend=backend)
    num.backward()
    return num, den, cor, h.grad, (W.grad if w_grad else None)


def reference(h, W, *args, **kw):
    """float64 naive reference (same inputs upcast)."""
    return run(h.double(), W.double(), *args, backend="torch", **kw)


def assert_like_torch(dt, ours, lowp, ref):
    """Acceptance (docs/semantics.md) for ``(num, dhidden, dweight)``: fp32 within 1e-4 of float64; 16-bit within
    2x the error of plain torch in that dtype (floor 1e-4) and within 2e-2."""
    for name, a, t, b in zip(("num", "dhidden", "dweight"), ours, lowp, ref):
        err = rel_err(a, b)
        if dt == "fp32":
            assert err <= 1e-4, f"{name}: {err:.2e}"
        else:
            terr = rel_err(t, b)
            assert err <= min(2e-2, 2 * max(terr, 1e-4)), f"{name}: {err:.2e} vs torch {dt} {terr:.2e}"


def assert_repeatable_and_accurate(dt, h, W, labels, mask, off):
    """Two runs bitwise identical (a race shows up here), and the first one accurate (``assert_like_torch``)."""
    first = run(h, W, labels, mask, off, softcap=None)
    again = run(h, W, labels, mask, off, softcap=None)
    for a, b in zip(first, again):
        assert torch.equal(a, b), "the schedule must be deterministic"
    rnum, _, rcor, rdh, rdw = reference(h, W, labels, mask, off)
    num, _, cor, dh, dw = first
    assert_like_torch(dt, (num, dh, dw), torch_lowp(h, W, labels, mask, off), (rnum, rdh, rdw))
    assert (cor == rcor).float().mean() > 0.99


def torch_lowp(h, W, labels, eval_mask, offsets, *, gamma=4.0, softcap=None, w_grad=True):
    """What a user runs today in the inputs' dtype: logits matmul in that dtype, CE in fp32."""
    h = h.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(w_grad)
    w = decay_weights(eval_mask, offsets, gamma).reshape(-1)
    sel = w > 0
    z = (h.reshape(-1, h.shape[-1])[sel] @ W.t()).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    num = (w[sel] * torch.nn.functional.cross_entropy(z, labels.reshape(-1)[sel], reduction="none")).sum()
    num.backward()
    return num, h.grad, (W.grad if w_grad else None)


CPU_CASES = [
    # (lead shape, H, V, dtype, softcap)
    ((37,), 64, 257, "fp32", None),
    ((2, 3, 7), 48, 1000, "fp32", 30.0),
    ((5, 11), 96, 257, "fp16", None),
    ((3, 13), 72, 1000, "fp16", 15.0),  # H % block_k != 0
    ((4, 9), 64, 300, "fp16", 3.0),  # a cap the logits saturate: padding columns must stay out of the sums
]


def case_id(c):
    lead, H, V, dt, sc = c
    return f"L{'x'.join(map(str, lead))}-H{H}-V{V}-{dt}-sc{sc or 0:g}"


@pytest.mark.parametrize("plan", ["default", "tiny"])
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_forward_backward_vs_float64(case, plan, schedule, poison, monkeypatch):
    lead, H, V, dt, sc = case
    only_16bit(schedule, dt)
    if plan == "tiny":
        monkeypatch.setattr(ce_triton, "_plan", tiny_plan)
        monkeypatch.setattr(ce_triton, "_plan_split", tiny_plan_split)
    h, W, labels, mask, off = make_case(lead, H, V, DTYPES[dt], seed=H + V)
    num, den, cor, dh, dw = run(h, W, labels, mask, off, softcap=sc)
    rnum, rden, rcor, rdh, rdw = reference(h, W, labels, mask, off, softcap=sc)
    assert cor.shape == lead and cor.dtype == torch.bool
    assert torch.equal(cor.cpu(), rcor.cpu()), "correct flags differ from argmax of the float64 logits"
    assert 0 < int(cor.sum()) < int(mask.sum()), "test inputs should give a mix of right and wrong argmax"
    assert rel_err(den, rden) <= 1e-6
    lowp = torch_lowp(h, W, labels, mask, off, softcap=sc) if dt != "fp32" else (None,) * 3  # not needed for fp32
    assert_like_torch(dt, (num, dh, dw), lowp, (rnum, rdh, rdw))
    assert dh.dtype == h.dtype and dw.dtype == W.dtype
    assert torch.all(dh.reshape(-1, H)[~mask.reshape(-1)] == 0), "unsupervised rows must get exactly zero gradient"


@pytest.mark.parametrize("gamma", [None, 0.0, 4.0], ids=lambda g: f"gamma{g}")
def test_gamma_and_frozen_weight(gamma, poison, tiny):
    h, W, labels, mask, off = make_case((41,), 64, 257, torch.float32, seed=3)
    num, den, _, dh, _ = run(h, W, labels, mask, off, gamma=gamma, w_grad=False)
    rnum, rden, _, rdh, _ = reference(h, W, labels, mask, off, gamma=gamma, w_grad=False)
    assert rel_err(num, rnum) <= 1e-4 and rel_err(den, rden) <= 1e-6 and rel_err(dh, rdh) <= 1e-4


@pytest.mark.parametrize("jump", ["up", "down"])
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_logit_jump_takes_the_rescaling_path(dt, jump, schedule, poison, tiny):
    """up: logits of later vocabulary chunks far above the running max (P cannot share the lagged
    reference; split: in the second tile of a chunk, so the P tiles already written and the acc rows
    are rescaled); down: later chunks far below it (their P terms underflow, their sums are clamped)."""
    only_16bit(schedule, dt)
    h, W, labels, mask, off = make_case((37,), 64, 400, torch.float32, seed=7, wscale=0.05)
    if jump == "up":
        W[264:] *= 40.0  # fused: chunks 4.. (of 64 columns); split: chunk 2 (200..299) from its second tile
    else:
        W[:64] *= 100.0  # chunk 0 sets a running max ~100 above the later tiles (past the e^80 clamp)
    h, W = h.to(DTYPES[dt]), W.to(DTYPES[dt])
    num, den, cor, dh, dw = run(h, W, labels, mask, off)
    rnum, _, rcor, rdh, rdw = reference(h, W, labels, mask, off)
    tol = 1e-4 if dt == "fp32" else 5e-3
    assert rel_err(num, rnum) <= tol and rel_err(dh, rdh) <= tol and rel_err(dw, rdw) <= tol
    assert torch.equal(cor.cpu(), rcor.cpu())


def test_split_row_order_does_not_change_a_bit(poison, tiny, monkeypatch):
    """The row pass from the last row up (``rows_reverse``) gives bitwise the same results: rows are
    independent, so only the order the programs start in may change."""
    h, W, labels, mask, off = make_case((37,), 64, 400, torch.float16, seed=7, wscale=0.05)
    W[264:] *= 40.0  # with a reference move inside a chunk
    outs = []
    for rev in (False, True):
        use_config(monkeypatch, schedule="split", rows_reverse=rev)
        outs.append(run(h, W, labels, mask, off))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_no_grad_forward_and_weight_only_grad(dt, schedule, poison, tiny):
    """Forward without a stash (stats-only chunks), and a backward that needs only dW."""
    only_16bit(schedule, dt)
    h, W, labels, mask, off = make_case((6, 9), 48, 1000, DTYPES[dt], seed=5)
    rnum, rden, rcor, _, rdw = reference(h, W, labels, mask, off, softcap=20.0)
    with torch.no_grad():
        num, den, cor = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, softcap=20.0,
                                              return_correct=True, backend="triton")
    tol = 1e-4 if dt == "fp32" else 2e-3
    assert rel_err(num, rnum) <= tol and torch.equal(cor.cpu(), rcor.cpu())
    Wg = W.clone().requires_grad_(True)
    num, _ = decayed_cross_entropy(h, Wg, labels, mask, off, gamma=4.0, softcap=20.0, backend="triton")
    num.backward()
    assert rel_err(Wg.grad, rdw) <= tol


def test_bwd_launcher_dhidden(poison):
    """``decayed_ce_bwd`` computes dhidden itself too (other backends' path through the wiring)."""
    h, W, labels, mask, off = make_case((29,), 64, 257, torch.float32, seed=9)
    w = decay_weights(mask, off, 4.0)
    num, den, lse, _ = ce_triton.decayed_ce_fwd(h, W, labels, w, CEOptions())
    g = torch.tensor(0.37, device=DEV)
    dh, dw = ce_triton.decayed_ce_bwd(g, h, W, labels, w, lse, CEOptions(), True, True)
    _, _, _, rdh, rdw = reference(h, W, labels, mask, off)
    assert rel_err(dh, 0.37 * rdh) <= 1e-4 and rel_err(dw, 0.37 * rdw) <= 1e-4
    lab_ok = torch.where(w > 0, labels, 0)
    ref_lse = torch.logsumexp(h.double() @ W.double().t(), dim=-1)
    assert rel_err(lse[w > 0], ref_lse[w > 0]) <= 1e-6 and torch.all(lse[w == 0] == 0)
    assert lab_ok.shape == labels.shape


def test_mixed_dtypes(poison):
    h, W, labels, mask, off = make_case((33,), 64, 257, torch.float32, seed=11)
    W16 = W.half()
    num, den, cor, dh, dw = run(h, W16, labels, mask, off)
    rnum, _, rcor, rdh, rdw = reference(h, W16, labels, mask, off)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float16
    assert rel_err(num, rnum) <= 1e-4 and rel_err(dh, rdh) <= 1e-4 and rel_err(dw, rdw) <= 1e-3
    assert torch.equal(cor.cpu(), rcor.cpu())


def test_all_masked_launches_nothing(schedule, monkeypatch):
    """Nothing supervised: zeros, and no kernel beyond the compaction. The split schedule's first call of
    a shape may queue its speculated chunk (on the plan of the count it last saw, or of all supervised);
    once it has seen the count 0 it launches nothing either."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"kernel launched with grid {grid} although nothing is supervised")

    h, W, labels, mask, off = make_case((4, 5), 64, 257, torch.float16, frac=0.0)
    for call in range(2):
        if call == 1:
            for name in ("_ce_block_kernel", "_ce_rows_kernel", "_ce_finalize_kernel", "_ce_dlogits_kernel",
                         "_ce_dlogits_rows_kernel", "_mm2_streamk_kernel"):
                monkeypatch.setattr(ce_triton, name, NoLaunch())
        num, den, cor, dh, dw = run(h, W, labels, mask, off)
        assert num.item() == 0 and den.item() == 0 and not cor.any()
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_rejects_float64_and_bad_labels():
    h, W, labels, mask, off = make_case((8,), 64, 257, torch.float32, frac=1.0)
    with pytest.raises(TypeError, match="float64"):
        decayed_cross_entropy(h.double(), W.double(), labels, mask, off, gamma=4.0, backend="triton")
    bad = labels.clone()
    bad[3] = 257
    with pytest.raises(ValueError, match="out of range"):
        decayed_cross_entropy(h, W, bad, mask, off, gamma=4.0, backend="triton")
    bad[3] = -1
    with pytest.raises(ValueError, match="out of range"):
        decayed_cross_entropy(h, W, bad, mask, off, gamma=4.0, backend="triton")


def test_unsupervised_labels_are_never_read():
    """Padding labels (-100, >= V) on unsupervised tokens pass the in-op check and change nothing."""
    h, W, labels, mask, off = make_case((40,), 64, 257, torch.float32, frac=0.5, seed=5)
    assert mask.any() and not mask.all()
    pad = labels.clone()
    pad[~mask] = torch.where(torch.arange(40, device=DEV)[~mask] % 2 == 0, -100, 257 + 7)
    a = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    b = decayed_cross_entropy(h, W, pad, mask, off, gamma=4.0, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    bad = pad.clone()
    bad[mask.nonzero()[0, 0]] = 257
    with pytest.raises(ValueError, match=r"labels out of range \[0, 257\): 1 bad value\(s\), e.g. \[257\]"):
        decayed_cross_entropy(h, W, bad, mask, off, gamma=4.0, backend="triton")


@pytest.mark.parametrize("cap", [0, 64 * MiB])
def test_split_budget_grows_with_the_stash(cap, monkeypatch):
    """With a d hidden stash the split schedule's chunk budget is what the peak cap leaves next to it
    (cap - stash - 1 MiB) or, with no cap, max(budget, budget_per_stash x stash bytes); without a stash
    (no grad) it stays ``budget``."""
    cfg = dataclasses.replace(ce_triton._config(torch.device(DEV), torch.float16), budget=4096, peak_cap=cap, spec_chunks=0)
    monkeypatch.setattr(ce_triton, "_config", lambda dev, dt: cfg)
    seen = []
    plan = ce_triton._plan_split
    monkeypatch.setattr(ce_triton, "_plan_split", lambda Tc, H, V, isz, c, dh, g: seen.append(c.budget) or plan(Tc, H, V, isz, c, dh, g))
    h, W, labels, mask, off = make_case((64,), 64, 257, torch.float16, frac=1.0)
    decayed_cross_entropy(h.requires_grad_(), W, labels, mask, off, gamma=4.0, backend="triton")[0].backward()
    with torch.no_grad():
        decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    assert seen == [cap - 64 * 64 * 2 - MiB if cap else int(1.5 * 64 * 64 * 2), 4096], seen


@pytest.mark.parametrize("T", [0, 1, 7, 1024, 2500])
@pytest.mark.parametrize("lab_dtype", [torch.int64, torch.int32, torch.uint8])
def test_compaction_kernel(T, lab_dtype):
    """``_supervised`` (one compaction launch + one host read) against torch: rows in order, their labels
    and weights, ``den``, zeroed ``lse``/``correct``/``err``; bad labels count only where supervised."""
    g = torch.Generator().manual_seed(T)
    tw = torch.rand(T, generator=g) * (torch.rand(T, generator=g) < 0.6)
    labels = torch.randint(0, 200, (T,), generator=g).to(lab_dtype)
    Tc, rows, rows32, lab_c, tw_c, den, lse, correct, err = ce_triton._supervised(labels.to(DEV), tw.to(DEV), 200, True)
    assert lse.shape == (T,) and correct.shape == (T,) and err.shape == (1,)
    want = torch.nonzero(tw > 0).flatten()
    # the whole buffer: the others after the supervised rows (a permutation of [0, T)), weight 0
    c = ce_triton._compact(labels.to(DEV), tw.to(DEV), 200)
    assert ce_triton._count(c, labels.to(DEV), tw.to(DEV), 200) == Tc
    assert torch.equal(c.rows.sort().values.cpu(), torch.arange(T)) and torch.equal(c.rows32.cpu(), c.rows.int().cpu())
    assert torch.equal(c.rows[Tc:].sort().values.cpu(), torch.nonzero(tw == 0).flatten()) and not c.tw_c[Tc:].any()
    assert torch.equal(c.lab_c.cpu(), labels[c.rows.cpu()].int())
    assert Tc == want.numel() and torch.equal(rows.cpu(), want) and torch.equal(rows32.cpu(), want.int())
    assert torch.equal(lab_c.cpu(), labels[want].int()) and torch.equal(tw_c.cpu(), tw[want])
    assert torch.allclose(den.cpu(), tw.sum(), rtol=1e-5, atol=0) and not lse.any() and not correct.any() and err.item() == 0
    if lab_dtype != torch.uint8 and T:
        bad = labels.clone()
        bad[tw == 0] = -5  # unsupervised: never an error
        ce_triton._supervised(bad.to(DEV), tw.to(DEV), 200)
        if Tc:
            bad[want[-1]] = 200
            for mode in ("sync", "async"):  # the count is read in the op's sync anyway: both raise
                with validation(mode), pytest.raises(ValueError, match=r"labels out of range \[0, 200\): 1 bad"):
                    ce_triton._supervised(bad.to(DEV), tw.to(DEV), 200)


@GPU
@pytest.mark.parametrize("V", [151936, 262144])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=lambda s: f"sc{s or 0:g}")
def test_gpu_bf16_acceptance(V, softcap, schedule, poison):
    torch.manual_seed(V)
    T, H = 512, 2560
    h = torch.randn(T, H, device=DEV).bfloat16()
    W = (torch.randn(V, H, device=DEV) * 0.02).bfloat16()
    labels = torch.randint(0, V, (T,), device=DEV)
    mask = torch.rand(T, device=DEV) < 0.5
    off = torch.randint(0, 7, (T,), device=DEV)
    num, den, cor, dh, dw = run(h, W, labels, mask, off, softcap=softcap)
    rnum, rden, rcor, rdh, rdw = reference(h, W, labels, mask, off, softcap=softcap)
    assert_like_torch("bf16", (num, dh, dw), torch_lowp(h, W, labels, mask, off, softcap=softcap), (rnum, rdh, rdw))
    assert (cor == rcor).float().mean() > 0.99  # near-ties may flip in bf16


def test_backward_through_den_alone():
    """``den`` carries no gradient to hidden: a backward through it alone gives none (num's grad is None
    there: unused outputs' grads are not zero-filled)."""
    h, W, labels, mask, off = make_case((9,), 64, 257, torch.float16, seed=2)
    h = h.requires_grad_(True)
    num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    (2 * den).backward()
    assert h.grad is None
    num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    (num + den).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("leaf", [True, False], ids=["leaf", "non-leaf"])
def test_backward_hands_on_the_stash_and_retain_graph_recomputes(leaf):
    """The eager backward scales the d hidden stash in place and returns it (no second gradient-sized
    tensor); a second backward through the same graph (retain_graph) finds it taken, recomputes it and
    still gets the same gradient."""
    h0, W, labels, mask, off = make_case((37,), 64, 257, torch.float32, seed=6)
    h_leaf = h0.requires_grad_(True)
    h = h_leaf if leaf else h_leaf * 1.0
    w = decay_weights(mask, off, 4.0)
    num, den, _, _, dh_unit = torch.ops.d2kernels.decayed_ce_fwd(h, W, labels, w, 0.0, False, True, "triton")
    unit = dh_unit.clone()
    loss = num / (den + 1e-6)
    grads = torch.autograd.grad(loss, h, retain_graph=True)[0]
    assert grads.data_ptr() == dh_unit.data_ptr()  # the stash itself, scaled
    assert rel_err(grads, unit / (den + 1e-6)) <= 1e-6
    again = torch.autograd.grad(loss, h)[0]
    assert again.data_ptr() != dh_unit.data_ptr() and rel_err(again, unit / (den + 1e-6)) <= 1e-6
    rdh = reference(h0.detach(), W, labels, mask, off)[3]
    assert rel_err(again * (den + 1e-6), rdh) <= 1e-5


@GPU
def test_gpu_backward_allocates_no_second_gradient():
    """Backward's peak: the d hidden stash becomes the gradient, so backward allocates nothing of its
    size (no scaled copy, no zero-filled grad for the stash output)."""
    h, W, labels, mask, off = make_case((2048,), 1024, 32000, torch.bfloat16, frac=1.0, seed=4, wscale=0.02)
    h = h.requires_grad_(True)
    for _ in range(2):  # the second call: cuBLAS workspaces and Triton caches exist already
        h.grad = None
        num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (num / (den + 1e-6)).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = h.numel() * h.element_size()
    assert extra <= 0.1 * grad_bytes, f"backward allocated {extra / grad_bytes:.2f} gradients beyond the stash"


@GPU
def test_gpu_speculation_keeps_the_peak(monkeypatch):
    """A speculated first chunk on the wrong plan is dropped before the right plan's buffers exist: a
    call's peak stays within the 64 MiB cap (stash included) whether the plan was guessed or not."""
    monkeypatch.setattr(ce_triton, "_TC_SEEN", {})
    T, H, V = 3584, 2560, 32000
    h, W, labels, mask, off = make_case((1024,), H, V, torch.bfloat16, frac=1.0, seed=6, wscale=0.02)
    decayed_cross_entropy(h.requires_grad_(True), W, labels, mask, off, gamma=4.0, backend="triton")[0].backward()
    peaks = []  # (the call above set up cuBLAS's workspace: not counted below)
    for frac in (1.0, 0.5, 0.5, 1.0):  # no memory / guessed all supervised / guessed right / guessed gathered
        h, W, labels, mask, off = make_case((T,), H, V, torch.bfloat16, frac=frac, seed=6, wscale=0.02)
        h = h.requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
        (num / (den + 1e-6)).backward()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / MiB)
    assert max(peaks) <= 64, peaks


def test_custom_op_traces_fullgraph():
    """The op (with its d num/d hidden stash output) traces without a graph break and keeps its gradient."""
    h, W, labels, mask, off = make_case((20,), 64, 257, torch.float32, seed=13)
    w = decay_weights(mask, off, 4.0)

    def loss_fn(h):
        num, den, _, _, _ = torch.ops.d2kernels.decayed_ce_fwd(h, W, labels, w, 0.0, False, True, "triton")
        return num / (den + 1e-6)

    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(h1).backward()
    loss_fn(h2).backward()
    assert rel_err(h1.grad, h2.grad) <= 1e-6


@GPU
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_gpu_tile_schedule_stress(dt, poison, monkeypatch):
    """Many row tiles x many chunks x several T-blocks, one launch each: every wait
    must hold (a race shows as a wrong or NaN result), and two runs are bitwise identical."""
    monkeypatch.setattr(ce_triton, "_plan", lambda Tc, H, V, p_bytes, cfg, write_p: (
        (min(Tc, 3 * cfg.block_m) if write_p else Tc), 4 * cfg.block_n))
    h, W, labels, mask, off = make_case((1111,), 320, 20011, DTYPES[dt], frac=0.7, seed=21, wscale=0.1)
    W[15000:] *= 8.0  # later chunks jump above the lagged reference: the rescaling path runs too
    assert_repeatable_and_accurate(dt, h, W, labels, mask, off)


@GPU
@pytest.mark.parametrize("mm2", ["cublas", "streamk"])
@pytest.mark.parametrize("frac", [0.7, 1.0], ids=lambda f: f"sup{f:g}")
def test_gpu_split_schedule_stress(frac, mm2, poison, monkeypatch):
    """Split schedule, bf16: several T-blocks (rows gathered, or plain slices when all are supervised)
    x 21 chunks of 1000 columns (not a multiple of 16) and a last one of 11, later chunks jumping
    far above the reference inside their second row-pass tile; two runs bitwise identical. streamk:
    6 output tiles of 16 K steps for up to 132 programs, each tile's adds a chain of 16 segments
    (tensor descriptors; the last chunk's 22-byte rows take pointer loads)."""
    use_config(monkeypatch, schedule="split", rows_block=512, mm2=mm2)
    monkeypatch.setattr(ce_triton, "_plan_split", lambda Tc, H, V, itemsize, cfg, need_dh, gather: (min(Tc, 384), 1000))
    h, W, labels, mask, off = make_case((1111,), 320, 20011, torch.bfloat16, frac=frac, seed=21, wscale=0.1)
    W[15600:] *= 8.0  # chunk 15 = columns 15000..15999, row-pass tiles of 512: the jump is in its second
    assert_repeatable_and_accurate("bf16", h, W, labels, mask, off)


@triton.jit
def _wait_probe(cnt_ptr, err_ptr, target, SPIN: tl.constexpr):
    _wait_count(cnt_ptr, target, err_ptr, SPIN)


def test_dependency_wait_gives_up_and_raises_the_error_flag():
    """A wait whose count never arrives ends after SPIN reads with the error flag set (the loss
    then comes out NaN instead of a hang); a satisfied wait leaves the flag alone."""
    for have, want, flagged in ((3, 3, 0), (5, 3, 0), (2, 3, 1)):
        cnt = torch.tensor([have], dtype=torch.int32, device=DEV)
        err = torch.zeros(1, dtype=torch.int32, device=DEV)
        _wait_probe[(1,)](cnt, err, want, SPIN=8)
        assert int(err) == flagged and int(cnt) == have, (have, want)


@pytest.mark.parametrize("raised", [False, True])
def test_error_flag_turns_the_loss_nan(raised, monkeypatch):
    """The finalize step reads the flag a given-up wait raises: the loss is NaN, never silently wrong."""

    class FakeBlockLaunch:  # stands in for _ce_block_kernel: plausible stats, then the flag
        def __getitem__(self, grid):
            def launch(h, w, rows, lab, p, sm, ss, zl, acc, mrun, srun, sync, err, *args, **kwargs):
                for t, v in ((zl, 0.0), (acc, 0.0), (mrun, 0.0), (srun, 1.0)):
                    t.fill_(v)
                err.fill_(int(raised))
            return launch

    monkeypatch.setattr(ce_triton, "_ce_block_kernel", FakeBlockLaunch())
    h, W, labels, mask, off = make_case((9,), 64, 257, torch.float32, frac=1.0)
    num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    assert torch.isnan(num).item() == raised


# ----------------------------------------------------------------------------------------------
# the split schedule's stream-K ``acc (+)= P @ W`` kernel, called directly
# ----------------------------------------------------------------------------------------------
def range_owners(total, n_r):
    """Iteration -> the stream-K range holding it, by enumeration."""
    return [r for r in range(n_r) for _ in range(r * total // n_r, (r + 1) * total // n_r)]


def streamk_segments(M, N, K, cfg, n_progs):
    """The kernel's work split, modelled on the host: tile -> the ranges holding its K steps."""
    n_tiles = triton_cdiv(M, cfg.mm2_block_m) * triton_cdiv(N, cfg.mm2_block_n)
    ki = triton_cdiv(K, cfg.mm2_block_k)
    total = n_tiles * ki
    owner = range_owners(total, min(n_progs, total))
    return {t: sorted(set(owner[t * ki:(t + 1) * ki])) for t in range(n_tiles)}, total


@triton.jit
def _range_of_probe(out_ptr, g0, n, step, n_r, total, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    g = g0 + o * step
    tl.store(out_ptr + o, ce_triton._range_of(g, n_r, total), mask=o < n)


@pytest.mark.parametrize("total,n_r", [(1, 1), (7, 7), (9, 2), (60, 13), (101, 100), (20800, 132), (56 * 283, 132)])
def test_streamk_range_of_matches_enumeration(total, n_r):
    """The kernel's closed form for "which range holds iteration g" (every wait count is a difference
    of two of them) against the ranges enumerated."""
    owner = range_owners(total, n_r)
    step = max(1, total // 512)
    g = list(range(0, total, step))[:512]
    out = torch.full((512,), -1, dtype=torch.int32, device=DEV)
    _range_of_probe[(1,)](out, 0, len(g), step, n_r, total, BLOCK=512)
    assert out[:len(g)].tolist() == [owner[x] for x in g]


def streamk_cfg(**changes):
    """The stream-K kernel with the interpreter's small tiles on any device: the cases below are built for
    16 x 32 x 16 tiles and 5 programs (``test_gpu_mm2_streamk`` runs the GPU's tiles)."""
    cfg = ce_triton._config(torch.device("cpu"), torch.float16)
    return dataclasses.replace(cfg, mm2="streamk", **changes)


STREAMK_CASES = [
    # (M, K, N, n_progs, tma, what the case must exercise)
    (37, 203, 75, 5, False, "odd M/N/K, pointer loads"),
    (37, 200, 72, 5, True, "M/N edge tiles, tensor descriptors"),
    (21, 5, 40, 3, False, "K < one BK step"),
    (21, 8, 40, 3, True, "K < one BK step, tensor descriptors"),
    (20, 20, 40, 11, False, "more programs than K steps"),
    (16, 16, 32, 4, True, "one step, more programs than steps"),
    (37, 100, 50, 1, False, "one program"),
    (16, 144, 32, 3, True, "one tile over 3 programs"),
    (33, 150, 64, 13, False, "tiles over 3 programs"),
]


@pytest.mark.parametrize("order", ["kalign", "tile"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("case", STREAMK_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-p{c[3]}-{'tma' if c[4] else 'ptr'}")
def test_mm2_streamk_matches_torch(case, accumulate, order):
    """``acc (=|+=) p @ w`` against float32 torch, bitwise identical on repeat (with the same scratch,
    which each launch leaves zeroed: a wrong "last segment" would leave a flag set), a NaN-poisoned
    acc never read when overwriting; both segment orders."""
    M, K, N, n_progs, tma, what = case
    cfg = streamk_cfg(mm2_order=order)
    segs, total = streamk_segments(M, N, K, cfg, n_progs)
    spread = max(len(r) for r in segs.values())
    if "3 programs" in what:
        assert spread >= 3, segs
    if "more programs" in what:
        assert n_progs > total
    if "K <" in what:
        assert K < cfg.mm2_block_k
    assert len(segs) > 1 or "one tile" in what or "one step" in what
    g = torch.Generator().manual_seed(M * K + N)
    p = torch.randn(M, K, generator=g).half().to(DEV)
    w = (torch.randn(K, N, generator=g) * 0.5).half().to(DEV)
    acc0 = torch.randn(M, N, generator=g).to(DEV) if accumulate else torch.full((M, N), float("nan"), device=DEV)
    want = p.float() @ w.float() + (acc0 if accumulate else 0.0)
    sync = ce_triton._mm2_sync(M, N, cfg, DEV)
    err = torch.zeros(1, dtype=torch.int32, device=DEV)
    outs = []
    for _ in range(2):
        acc = acc0.clone()
        ce_triton._mm2_streamk(acc, p, w, accumulate, cfg, n_progs=n_progs, sync=sync, err=err, tma=tma)
        outs.append(acc)
        assert int(err) == 0 and int(sync.abs().sum()) == 0, "the scratch must be left zeroed for the next launch"
    assert rel_err(outs[0], want) <= 1e-5, f"{what}: {rel_err(outs[0], want):.2e}"
    assert torch.equal(outs[0], outs[1]), "stream-K must be bitwise reproducible"


@GPU
@pytest.mark.parametrize("order", ["kalign", "tile"])
@pytest.mark.parametrize("shape", [(1280, 13312, 2560), (896, 18112, 4096), (300, 1000, 320)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_mm2_streamk(shape, order):
    """bf16 at the split schedule's chunk shapes (M x K x N): against cuBLAS's f32-out addmm, bitwise
    identical over 3 runs, no wait given up, scratch left zeroed."""
    M, K, N = shape
    torch.manual_seed(M + K)
    p = torch.rand(M, K, device=DEV).bfloat16()
    w = (torch.randn(K, N, device=DEV) * 0.02).bfloat16()
    acc0 = torch.randn(M, N, device=DEV)
    cfg = dataclasses.replace(ce_triton._config(torch.device(DEV), torch.bfloat16), mm2="streamk", mm2_order=order)
    sync = ce_triton._mm2_sync(M, N, cfg, DEV)
    err = torch.zeros(1, dtype=torch.int32, device=DEV)
    from scripts.mm2_probe import repeated
    outs = repeated(acc0, p, w, cfg, sync, err)
    assert int(err) == 0 and int(sync.abs().sum()) == 0
    assert rel_err(outs[0], torch.addmm(acc0, p, w, out_dtype=torch.float32)) <= 1e-5
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_mm2_streamk_in_place_of_a_row_slice():
    """As the split schedule calls it: ``acc[:tb]`` rows of a larger buffer, ``w`` a row slice of the
    lm_head weight (a chunk), ``p`` the front of a flat buffer; rows past ``tb`` stay untouched."""
    cfg = streamk_cfg()
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 48, generator=g).half().to(DEV)
    s_buf = torch.randn(40 * 96, generator=g).half().to(DEV)
    acc = torch.randn(40, 48, generator=g).to(DEV)
    before = acc.clone()
    tb, v0, width = 29, 104, 96
    p = s_buf[:tb * width].view(tb, width)
    w = weight[v0:v0 + width]
    sync = ce_triton._mm2_sync(40, 48, cfg, DEV)
    ce_triton._mm2_streamk(acc[:tb], p, w, True, cfg, sync=sync)
    assert rel_err(acc[:tb], before[:tb] + p.float() @ w.float()) <= 1e-5
    assert torch.equal(acc[tb:], before[tb:])


@pytest.mark.parametrize("plan", ["default", "tiny"])
def test_split_sk_runs_the_streamk_kernel(plan, poison, monkeypatch):
    """The split-sk schedule's ``acc += P @ W`` goes through the stream-K kernel: every chunk's launch
    but the first of a T-block accumulates; the 1000-column chunk of the default plan takes tensor
    descriptors, the tiny plan's 100 columns (200-byte rows) pointer loads."""
    use_config(monkeypatch, schedule="split", mm2="streamk", spec_chunks=0)  # no speculated chunk among the launches
    if plan == "tiny":
        monkeypatch.setattr(ce_triton, "_plan_split", tiny_plan_split)
    launches = []
    kernel = ce_triton._mm2_streamk_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["ACCUMULATE"], kwargs["TMA"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ce_triton, "_mm2_streamk_kernel", Recorder())
    h, W, labels, mask, off = make_case((3, 13), 72, 1000, torch.float16, seed=1072)
    num, den, cor, dh, dw = run(h, W, labels, mask, off)
    rnum, _, _, rdh, _ = reference(h, W, labels, mask, off)
    assert rel_err(num, rnum) <= 2e-3 and rel_err(dh, rdh) <= 2e-2
    tma = plan == "default"
    n_chunks = 1 if tma else 10
    n_blocks = 1 if tma else triton_cdiv(int(mask.sum()), 32)
    want = [(False, tma)] + [(True, tma)] * (n_chunks - 1)
    assert launches == want * n_blocks
