"""One GPU call for ``varprefix_attention``: correctness (bf16 first) and the timing table.

    PYTHONPATH=. python3 scripts/gpu_attention.py [--sweep] [--skip-check] [--out DIR]

1. Correctness: ours vs the float64 naive reference, forward and all five gradients, next to the
   naive torch computation in the same dtype (docs/semantics.md: ours <= 2x that and <= 2e-2; fp32 <= 1e-4).
2. Timing (``triton.testing.do_bench``, median, random data; "(sync/round)": a synchronize after
   each call, as a pytest-benchmark round) at qwen3-4b-b7 / b16: our kernels, the public op as the
   drafter calls it (layout prebuilt, validation off) eager and inside ``torch.compile``, compiled
   flex_attention (BlockMask prebuilt, and build + attention); host microseconds per call.
3. ``--sweep``: tile sizes per kernel (one kernel varied at a time, the others at their defaults).

"plain" = the torch computation run in the inputs' dtype; "upcast" = the naive reference, which
computes in fp32 and only rounds its outputs. Useful FLOPs count visible (query, key) pairs only: fwd 4*D*pairs, bwd 2.5x that, fwd+bwd 14*D*pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

import d2kernels
import d2kernels.attention.triton as tri
from d2kernels.attention import varprefix_attention, varprefix_attention_naive, varprefix_layout, varprefix_mask
from d2kernels.layout import sample_anchors

SHAPES = {  # name: (Bt, S, N, B, Hq, Hkv, D)
    "qwen3-4b-b7": (1, 4096, 512, 7, 32, 8, 128),
    "b16": (1, 4096, 512, 16, 32, 8, 128),
}
NAMES = ("o", "dq", "dk_ctx", "dv_ctx", "dk_draft", "dv_draft")
ROWS: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def inputs(shape, dtype, seed=0, dummies=False):
    Bt, S, N, B, Hq, Hkv, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()
    ins = [mk(Bt, N * B, Hq, D), mk(Bt, S, Hkv, D), mk(Bt, S, Hkv, D), mk(Bt, N * B, Hkv, D), mk(Bt, N * B, Hkv, D)]
    lm = torch.ones(Bt, S, dtype=torch.long, device="cuda")
    if dummies:  # short responses: fewer candidates than N, so dummy blocks; shuffle the order
        lm[:, : S - N // 2] = 0
    anchors, keep = sample_anchors(lm, N, generator=torch.Generator(device="cuda").manual_seed(seed))
    if dummies:
        perm = torch.randperm(N, device="cuda")
        anchors, keep = anchors[:, perm], keep[:, perm]
        anchors[0, 0], keep[0, 0] = 0, True
    do = torch.randn(Bt, N * B, Hq, D, generator=g, device="cuda").to(dtype)
    return ins, anchors, keep, do


def fwd_bwd(fn, ins, anchors, keep, do, B):
    o = fn(*ins, anchors, keep, block_size=B)
    return [o.detach(), *torch.autograd.grad(o, ins, do)]


def ours(*a, block_size):
    return varprefix_attention(*a, block_size=block_size, backend="triton")


def naive(*a, block_size):
    return varprefix_attention_naive(*a, block_size, a[0].shape[-1] ** -0.5)


def plain(q, kc, vc, kd, vd, anchors, keep, block_size):
    """The plain torch computation in the inputs' dtype (no upcast): the acceptance's low-precision baseline (docs/semantics.md)."""
    G = q.shape[2] // kc.shape[2]
    k = torch.cat([kc, kd], 1).repeat_interleave(G, 2)
    v = torch.cat([vc, vd], 1).repeat_interleave(G, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    mask = varprefix_mask(anchors, keep, kc.shape[1], block_size)[:, None]
    p = torch.softmax(s.masked_fill(~mask, torch.finfo(s.dtype).min), -1) * mask.any(-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def check(shape, dtype, dummies=False):
    """Both backwards (atomic default, deterministic) against float64; the deterministic one run twice."""
    ins, anchors, keep, do = inputs(shape, dtype, seed=1, dummies=dummies)
    B = shape[3]
    base = fwd_bwd(naive, ins, anchors, keep, do, B)
    low = fwd_bwd(plain, ins, anchors, keep, do, B)
    r_in = [t.detach().double().requires_grad_() for t in ins]
    ref = fwd_bwd(naive, r_in, anchors, keep, do.double(), B)
    ok_all = True
    for det in (False, True):
        fn = lambda *a, block_size, det=det: varprefix_attention(*a, block_size=block_size, backend="triton", deterministic=det)
        got = fwd_bwd(fn, ins, anchors, keep, do, B)
        ok = True
        cells = []
        for name, a, n, lo, r in zip(NAMES, got, base, low, ref):
            e, eb, el = rel(a, r), rel(n, r), rel(lo, r)
            good = e <= 1e-4 if dtype == torch.float32 else (e <= 2 * el and e <= 2e-2)
            ok &= good
            cells.append(f"{name} {e:.1e} (x{e / max(el, 1e-30):.2f} plain, x{e / max(eb, 1e-30):.2f} upcast){'' if good else ' FAIL'}")
        repeat = True
        if det:
            again = fwd_bwd(fn, ins, anchors, keep, do, B)
            repeat = all(torch.equal(x, y) for x, y in zip(got, again))
        line = (f"check {shape} {str(dtype)[6:]} dummies={dummies} {'det' if det else 'atomic'}: "
                f"{'OK' if ok and repeat else 'FAIL'}{' bitwise-repeat' if det and repeat else ''} | " + "; ".join(cells))
        log(line)
        ROWS.append(line)
        ok_all &= ok and repeat
    torch.cuda.empty_cache()
    return ok_all


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=80, return_mode="median")


def useful_pairs(anchors, keep, B, Hq) -> int:
    return int(((anchors + B) * keep).sum()) * B * Hq


def _rower(name, results, anchors, keep, shape):
    Bt, S, N, B, Hq, Hkv, D = shape
    pairs = useful_pairs(anchors, keep, B, Hq)
    gf = {"fwd": 4 * D * pairs / 1e9, "bwd": 10 * D * pairs / 1e9, "fwd+bwd": 14 * D * pairs / 1e9}

    def row(prov, what, ms):
        results.append(dict(shape=name, provider=prov, op=what, ms=ms, tflops=gf[what] / ms))
        log(f"| {name} | {prov} | {what} | {ms:.3f} | {gf[what] / ms:.0f} |")

    return row, gf


def sync_median(fn, n=30) -> float:
    """Median ms of ``fn(); synchronize`` (what a pytest-benchmark round measures: host + device)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[n // 2]


def compiled_layer(B):
    """A compiled function calling the op with the step's layout, as a compiled decoder layer does."""
    return torch.compile(lambda q, kc, vc, kd, vd, lay: varprefix_attention(q, kc, vc, kd, vd, layout=lay, scale=None))


def time_ours(name, results):
    Bt, S, N, B, Hq, Hkv, D = shape = SHAPES[name]
    ins, anchors, keep, do = inputs(shape, torch.bfloat16, seed=2)
    row, gf = _rower(name, results, anchors, keep, shape)
    scale = D**-0.5
    det = [t.detach() for t in ins]
    lay = varprefix_layout(anchors, keep, block_size=B, seq_len=S)
    sb = (lay.sorted_anchors, lay.perm)

    # the kernels alone (layout prebuilt)
    o, lse = tri.varprefix_attention_fwd(*det, anchors, keep, B, scale, sorted_blocks=sb)
    row("ours kernels", "fwd", bench(lambda: tri.varprefix_attention_fwd(*det, anchors, keep, B, scale, sorted_blocks=sb)))
    for dt in (False, True):
        row(f"ours kernels{' det' if dt else ''}", "bwd", bench(lambda: tri.varprefix_attention_bwd(
            do, *det, o, lse, anchors, keep, B, scale, sorted_blocks=sb, deterministic=dt)))
    # the public op as the drafter calls it: layout prebuilt, validation off
    with d2kernels.validation("off"):
        eager_f = lambda: varprefix_attention(*det, layout=lay)
        eager_fb = lambda: torch.autograd.grad(varprefix_attention(*ins, layout=lay), ins, do)
        det_fb = lambda: torch.autograd.grad(varprefix_attention(*ins, layout=lay, deterministic=True), ins, do)
        cl = compiled_layer(B)
        comp_f = lambda: cl(*det, lay)
        comp_fb = lambda: torch.autograd.grad(cl(*ins, lay), ins, do)
        for prov, f, fb in (("ours eager", eager_f, eager_fb), ("ours compiled", comp_f, comp_fb)):
            try:
                row(prov, "fwd", bench(f))
                row(prov, "fwd+bwd", bench(fb))
                row(prov + " (sync/round)", "fwd", sync_median(f))
                row(prov + " (sync/round)", "fwd+bwd", sync_median(fb))
            except Exception as e:  # noqa: BLE001 - report and go on to the other rows
                log(f"{prov} failed: {type(e).__name__}: {str(e)[:300]}")
        row("ours eager det", "fwd+bwd", bench(det_fb))
    log(f"{name}: ours done; anchor sort {bench(lambda: varprefix_layout(anchors, keep, block_size=B, seq_len=S)) * 1e3:.1f} us (layout, once per step)")


def host_cost():
    """Host microseconds per call (small shape: the GPU keeps up, so the loop measures the host),
    and whether the drafter's call syncs the device."""
    shape = (1, 256, 16, 7, 32, 8, 128)
    ins, anchors, keep, do = inputs(shape, torch.bfloat16, seed=4)
    det = [t.detach() for t in ins]
    lay = varprefix_layout(anchors, keep, block_size=7, seq_len=256)
    cl = compiled_layer(7)
    out = {}
    with d2kernels.validation("off"):
        o, lse = tri.varprefix_attention_fwd(*det, anchors, keep, 7, 128**-0.5, sorted_blocks=lay[2:4])
        cases = {
            "empty sync round": lambda: None,
            "launcher fwd": lambda: tri.varprefix_attention_fwd(*det, anchors, keep, 7, 128**-0.5, sorted_blocks=lay[2:4]),
            "launcher bwd": lambda: tri.varprefix_attention_bwd(do, *det, o, lse, anchors, keep, 7, 128**-0.5,
                                                                sorted_blocks=lay[2:4]),
            "eager fwd": lambda: varprefix_attention(*det, layout=lay),
            "eager fwd+bwd": lambda: torch.autograd.grad(varprefix_attention(*ins, layout=lay), ins, do),
            "eager fwd, no layout": lambda: varprefix_attention(*det, anchors, keep, block_size=7),
            "compiled fwd": lambda: cl(*det, lay),
            "compiled fwd+bwd": lambda: torch.autograd.grad(cl(*ins, lay), ins, do),
        }
        for k, fn in cases.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            n = 300
            t = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            out[k] = host
            log(f"host {k}: {host:.1f} us per call; {sync_median(fn, 50) * 1e3:.1f} us per synced round")
        import cProfile
        import io
        import pstats
        for k in ("eager fwd+bwd", "compiled fwd"):
            pr = cProfile.Profile()
            pr.runcall(lambda: [cases[k]() for _ in range(200)])
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
            log(f"profile {k} (200 calls):\n" + "\n".join(buf.getvalue().splitlines()[6:24]))
        torch.cuda.set_sync_debug_mode("error")
        try:
            cases["eager fwd+bwd"]()
            cases["compiled fwd+bwd"]()
            log("host: no device sync in the drafter's eager / compiled calls (sync_debug_mode=error)")
        except RuntimeError as e:
            log(f"host: SYNC in the drafter's call: {e}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out


def time_flex(name, results):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Bt, S, N, B, Hq, Hkv, D = shape = SHAPES[name]
    ins, anchors, keep, do = inputs(shape, torch.bfloat16, seed=2)
    row, gf = _rower(name, results, anchors, keep, shape)
    scale = D**-0.5
    det = [t.detach() for t in ins]

    # flex: [Bt, H, L, D] layout and concatenated keys prepared outside the timed region
    qf = det[0].transpose(1, 2).contiguous().requires_grad_()
    kf = torch.cat([det[1], det[3]], 1).transpose(1, 2).contiguous().requires_grad_()
    vf = torch.cat([det[2], det[4]], 1).transpose(1, 2).contiguous().requires_grad_()
    dof = do.transpose(1, 2).contiguous()

    def mask_mod(b, h, qi, kv):
        n = qi // B
        ctx = (kv < S) & (kv < anchors[b, n])
        own = (kv >= S) & ((kv - S) // B == n)
        return (ctx | own) & keep[b, n]

    build = lambda: create_block_mask(mask_mod, Bt, None, N * B, S + N * B, device="cuda", _compile=True)
    bm = build()
    flex = torch.compile(flex_attention)
    fl = lambda: flex(qf, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)
    of = fl()
    ref_o = tri.varprefix_attention_fwd(*det, anchors, keep, B, scale)[0]
    log(f"{name}: flex vs ours rel {rel(of.transpose(1, 2), ref_o):.2e}")
    row("flex (sync/round)", "fwd", sync_median(fl))
    row("flex (sync/round)", "fwd+bwd", sync_median(lambda: torch.autograd.grad(fl(), (qf, kf, vf), dof)))
    row("flex", "fwd", bench(fl))
    row("flex", "fwd+bwd", bench(lambda: torch.autograd.grad(fl(), (qf, kf, vf), dof)))
    row("flex+build", "fwd+bwd", bench(lambda: torch.autograd.grad(
        flex(qf, kf, vf, block_mask=build(), scale=scale, enable_gqa=True), (qf, kf, vf), dof)))
    log(f"{name}: flex done")

    del qf, kf, vf, bm
    torch.cuda.empty_cache()


SWEEP = {  # most promising first: the sweep may be cut short by --sweep-s
    # deterministic dk/dv: the spill-free tiles found by scripts/kernel_regs.py (RESULTS_attention.md)
    "dkdv": [(32, 128, 8, 3), (64, 64, 8, 3)],
    "dkdv_draft": [(64, 32, 8, 2, True)],
    "dkdv_atomic": [(64, 128, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3), (64, 128, 8, 3), (32, 128, 4, 3)],
    "dkdv_draft_atomic": [(32, 32, 4, 2), (64, 64, 8, 2)],
    "dq": [(64, 32, 4, 3)],
}


def sweep(name, out, deadline):
    Bt, S, N, B, Hq, Hkv, D = shape = SHAPES[name]
    ins, anchors, keep, do = inputs(shape, torch.bfloat16, seed=3)
    det = [t.detach() for t in ins]
    scale = D**-0.5
    o, lse = tri.varprefix_attention_fwd(*det, anchors, keep, B, scale)
    default = tri.pick_tiles
    order = [(kind, cfgs[i]) for i in range(max(map(len, SWEEP.values()))) for kind, cfgs in SWEEP.items() if i < len(cfgs)]
    for kind, c in order:
        if time.time() > deadline:
            return
        t = tri.Tiles(*c)
        tri.pick_tiles = lambda k, *a, kind=kind, t=t: t if k == kind else default(k, *a)
        try:
            if kind == "fwd":
                ms = bench(lambda: tri.varprefix_attention_fwd(*det, anchors, keep, B, scale))
            else:
                ms = bench(lambda: tri.varprefix_attention_bwd(do, *det, o, lse, anchors, keep, B, scale,
                                                               deterministic="atomic" not in kind))
        except Exception as e:  # noqa: BLE001 - a config may not fit in shared memory
            ms = math.nan
            log(f"  {kind} {c}: {type(e).__name__}: {str(e)[:120]}")
        finally:
            tri.pick_tiles = default
        out.append(dict(shape=name, kind=kind, cfg=c, ms=ms))
        log(f"sweep {name} {kind:10s} {str(c):18s} {ms:.3f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep tile sizes per kernel")
    ap.add_argument("--sweep-s", type=float, default=1e9, help="stop the sweep this many seconds after the start")
    ap.add_argument("--skip-check", action="store_true", help="timing only")
    ap.add_argument("--skip-timing", action="store_true", help="no ours / flex timing (host cost and sweep only)")
    ap.add_argument("--skip-host", action="store_true", help="no host-cost measurement")
    ap.add_argument("--small-checks", action="store_true", help="checks at the small odd shapes only (not the b7 one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = ap.parse_args()
    log(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}")
    t0 = time.time()
    ok = True
    if not args.skip_check:
        if not args.small_checks:
            ok &= check(SHAPES["qwen3-4b-b7"], torch.bfloat16)
        for shape, dtype, dm in [
            ((2, 67, 9, 7, 8, 8, 64), torch.bfloat16, True),  # odd S, GQA 1
            ((1, 517, 41, 16, 8, 2, 256), torch.bfloat16, True),  # GQA 4, head_dim 256
            ((2, 301, 9, 32, 6, 3, 128), torch.bfloat16, True),
            ((2, 517, 41, 7, 8, 2, 128), torch.float32, True),
        ]:
            ok &= check(shape, dtype, dm)
        log(f"checks {'OK' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    results, sw = [], []
    if not args.skip_timing:
        for name in SHAPES:
            time_ours(name, results)
        for name in SHAPES:
            time_flex(name, results)
    host = {}
    try:
        if not args.skip_host:
            host = host_cost()
    except Exception as e:  # noqa: BLE001
        log(f"host_cost failed: {type(e).__name__}: {str(e)[:300]}")
    if args.sweep:
        sweep("qwen3-4b-b7", sw, t0 + args.sweep_s)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(checks=ROWS, timing=results, sweep=sw, host_us=host), f, indent=1)
    log("\n| shape | provider | op | ms | useful TFLOP/s |\n|---|---|---|---|---|")
    for r in results:
        log(f"| {r['shape']} | {r['provider']} | {r['op']} | {r['ms']:.3f} | {r['tflops']:.0f} |")
    for name in SHAPES:
        get = {(r["provider"], r["op"]): r["ms"] for r in results if r["shape"] == name}
        for op in ("fwd", "fwd+bwd"):
            for mode in ("", " (sync/round)"):
                f, e, c = get.get((f"flex{mode}", op)), get.get((f"ours eager{mode}", op)), get.get((f"ours compiled{mode}", op))
                if f and e and c:
                    log(f"{name} {op}{mode}: flex/ours eager {f / e:.2f}x, flex/ours compiled {f / c:.2f}x")
    log(f"total {time.time() - t0:.0f} s; checks {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
