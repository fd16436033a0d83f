"""``varprefix_attention`` benchmarks: ours vs compiled flex_attention vs SDPA with a dense mask.

    pytest benchmarks/test_attention.py --benchmark-only

Providers: ``ours`` (the public op as the drafter's layers call it: ``varprefix_layout`` built
once per step outside the timed region, validation off, default backward), ``ours-compiled``
(the same call inside a ``torch.compile``'d function, as a compiled decoder layer runs it),
``flex`` (compiled ``flex_attention``, BlockMask prebuilt), ``flex+build`` (compiled
``create_block_mask`` + attention, fwd+bwd only), ``sdpa`` (dense ``[NB, S+NB]`` bool mask, fwd
and fwd+bwd). Flex and SDPA get their ``[Bt, H, L, D]`` layout and the concatenated context+draft
keys prepared outside the timed region.
Anchors: ``sample_anchors`` on an all-ones loss mask. Each round ends with a device synchronize.

Useful FLOPs count visible (query, key) pairs only, ``P = Hq * sum_kept B * (anchor + B)``:
fwd ``4*D*P``, bwd ``10*D*P`` (2.5x fwd, the FlashAttention convention), fwd+bwd ``14*D*P``;
``extra_info["tflops"]`` uses the median time.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import d2kernels  # noqa: E402
from d2kernels.attention import varprefix_attention, varprefix_layout, varprefix_mask  # noqa: E402
from d2kernels.layout import sample_anchors  # noqa: E402

SHAPES = {  # name: (Bt, S, N, B, Hq, Hkv, D)
    "qwen3-4b-b7": (1, 4096, 512, 7, 32, 8, 128),
    "b16": (1, 4096, 512, 16, 32, 8, 128),
}
FLOP_PER_PAIR_PER_D = {"fwd": 4, "bwd": 10, "fwd+bwd": 14}
_CASES: dict = {}


def make_case(name: str, device="cuda", dtype=torch.bfloat16, shapes=SHAPES) -> dict:
    """Random inputs (never zeros), anchors, and each provider's prepared layout; cached per shape."""
    key = (name, str(device), dtype)
    if key in _CASES:
        return _CASES[key]
    Bt, S, N, B, Hq, Hkv, D = shapes[name]
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_()
    ins = [mk(Bt, N * B, Hq, D), mk(Bt, S, Hkv, D), mk(Bt, S, Hkv, D), mk(Bt, N * B, Hkv, D), mk(Bt, N * B, Hkv, D)]
    anchors, keep = sample_anchors(torch.ones(Bt, S, dtype=torch.long, device=device), N,
                                   generator=torch.Generator(device=device).manual_seed(0))
    do = torch.randn(Bt, N * B, Hq, D, generator=g, device=device).to(dtype)
    det = [t.detach() for t in ins]
    heads_first = lambda t: t.transpose(1, 2).contiguous()  # [Bt, L, H, D] -> [Bt, H, L, D]
    case = dict(
        shape=(Bt, S, N, B, Hq, Hkv, D), ins=ins, anchors=anchors, keep=keep, do=do,
        qf=heads_first(det[0]).requires_grad_(),
        kf=heads_first(torch.cat([det[1], det[3]], 1)).requires_grad_(),
        vf=heads_first(torch.cat([det[2], det[4]], 1)).requires_grad_(),
        dof=heads_first(do),
        pairs=int(((anchors + B) * keep).sum()) * B * Hq,
        layout=varprefix_layout(anchors, keep, block_size=B, seq_len=S),
    )
    _CASES[key] = case
    return case


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_fn(provider: str, case: dict, compile_flex=True):
    """``forward() -> output`` for one provider, plus the tensors its backward differentiates."""
    Bt, S, N, B, Hq, Hkv, D = case["shape"]
    anchors, keep = case["anchors"], case["keep"]
    if provider in ("ours", "ours-compiled"):
        ins, lay = case["ins"], case["layout"]
        op = lambda q, kc, vc, kd, vd, lay: varprefix_attention(q, kc, vc, kd, vd, layout=lay, backend="triton")
        if provider == "ours-compiled":
            op = torch.compile(op)
        with d2kernels.validation("off"):  # as the drafter runs its layers
            op(*ins, lay)

        def fwd():
            with d2kernels.validation("off"):
                return op(*ins, lay)
        return fwd, ins, case["do"]
    qf, kf, vf, dof = case["qf"], case["kf"], case["vf"], case["dof"]
    if provider in ("flex", "flex+build"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, kv):
            n = qi // B
            ctx = (kv < S) & (kv < anchors[b, n])
            own = (kv >= S) & ((kv - S) // B == n)
            return (ctx | own) & keep[b, n]

        build = lambda: create_block_mask(mask_mod, Bt, None, N * B, S + N * B, device=qf.device, _compile=compile_flex)
        flex = torch.compile(flex_attention) if compile_flex else flex_attention
        if provider == "flex":
            bm = build()
            return (lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True)), (qf, kf, vf), dof
        return (lambda: flex(qf, kf, vf, block_mask=build(), enable_gqa=True)), (qf, kf, vf), dof
    if provider == "sdpa":
        mask = varprefix_mask(anchors, keep, S, B)[:, None]  # [Bt, 1, NB, S+NB]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda: sdpa(qf, kf, vf, attn_mask=mask, enable_gqa=True)), (qf, kf, vf), dof
    raise ValueError(provider)


def make_target(provider: str, op: str, case: dict, compile_flex=True):
    """``(setup, target)`` for ``benchmark.pedantic``: setup runs the untimed part (the forward of
    a bwd-only round), target the timed part; both end with a device synchronize."""
    fwd, wrt, grad_out = make_fn(provider, case, compile_flex)
    dev = grad_out.device
    if op == "fwd":
        def target():
            with torch.no_grad():
                fwd()
            _sync(dev)
        return None, target
    if op == "fwd+bwd":
        def target():
            torch.autograd.grad(fwd(), wrt, grad_out)
            _sync(dev)
        return None, target

    def setup():
        out = fwd()
        _sync(dev)
        return (out,), {}

    def target(out):
        torch.autograd.grad(out, wrt, grad_out)
        _sync(dev)
    return setup, target


PARAMS = [(s, p, o) for s in SHAPES for p in ("ours", "ours-compiled", "flex", "flex+build", "sdpa") for o in FLOP_PER_PAIR_PER_D
          if not (p == "flex+build" and o != "fwd+bwd") and not (p == "sdpa" and o == "bwd")]


@pytest.mark.parametrize("shape,provider,op", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_attention(benchmark, shape, provider, op):
    case = make_case(shape)
    setup, target = make_target(provider, op, case)
    for _ in range(3):  # warm up: compile, autotune, allocator
        target(*setup()[0]) if setup else target()
    benchmark.group = f"attention {shape} {op}"
    if setup:
        benchmark.pedantic(target, setup=setup, rounds=30, warmup_rounds=0)
    else:
        benchmark.pedantic(target, rounds=30, warmup_rounds=2)
    D = case["shape"][-1]
    benchmark.extra_info["tflops"] = FLOP_PER_PAIR_PER_D[op] * D * case["pairs"] / benchmark.stats.stats.median / 1e12
