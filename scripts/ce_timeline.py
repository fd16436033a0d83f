"""Where the split schedule's wall time goes: GPU kernel timeline gaps, host enqueue time, and the same
chunk loop replayed from a CUDA graph (no host launch cost at all).

    PYTHONPATH=. python3 scripts/ce_timeline.py [--frac 1.0] [--configs default,split_r1x2048w2]
Prints per config: wall (do_bench), host enqueue ms of one call, kernel busy / span / gap totals of
one profiled call with its largest gaps, and the graph-replayed forward.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import d2kernels.cross_entropy.triton as ce  # noqa: E402
from d2kernels.cross_entropy import decayed_cross_entropy  # noqa: E402
from d2kernels.layout import decay_weights  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_cross_entropy import make  # noqa: E402  (the same random inputs as the benchmark)


def timeline(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return kernel_union(prof)


def kernel_union(prof):
    """A profile's CUDA kernels as one timeline -> span and busy ms (the union of kernel intervals), and
    the gaps as (us, next kernel's name)."""
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, end = 0.0, [], ev[0][0]
    for s, e, n in ev:
        if s > end:
            gaps.append((s - end, n))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return (end - ev[0][0]) / 1e3, busy / 1e3, gaps


def chunk_loop(h, W, labels, mask, off, cfg):
    """The split schedule's chunk loop alone (``_forward_split`` on inputs compacted beforehand, so no
    host sync) -> (the eager callable, a CUDA graph of one call of it)."""
    w = decay_weights(mask, off, 4.0).float()
    rows = torch.nonzero(w > 0).flatten()
    args = (h.detach(), W, rows, rows.int(), labels[rows].int(), w[rows].contiguous(), cfg, 0.0, False, True)
    outs = (torch.zeros(h.shape[0], device="cuda"), torch.zeros(0, dtype=torch.bool, device="cuda"), torch.zeros_like(h),
            torch.zeros(1, dtype=torch.int32, device="cuda"))
    loop = lambda: ce._forward_split(*args, *outs)  # noqa: E731
    loop()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loop()
    return loop, g


def phases(fn, n=40):
    """Where one call's wall time goes, without a profiler: CUDA events and host clocks at the call's
    start, the sync's return (``_count``), the chunk loop's first launch and end, and the call's
    end; medians over ``n`` back-to-back calls (the steady state do_bench measures)."""
    marks = {}

    def mark(name):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.setdefault(name, []).append((ev, time.perf_counter()))

    sup, split = ce._count, ce._forward_split

    def sup_w(*a, **k):
        out = sup(*a, **k)
        mark("after sync")
        return out

    def split_w(*a, **k):
        mark("loop start")
        out = split(*a, **k)
        mark("loop end")
        return out

    ce._count, ce._forward_split = sup_w, split_w
    try:
        for _ in range(n):
            mark("call start")
            fn()
            mark("call end")
        torch.cuda.synchronize()
    finally:
        ce._count, ce._forward_split = sup, split
    order = ["call start", "after sync", "loop start", "loop end", "call end"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    row = []
    for a, b in zip(order, order[1:]):
        k = min(len(marks[a]), len(marks[b]))  # backward re-runs the forward: pair each with its next
        gpu = med([marks[a][i][0].elapsed_time(marks[b][i][0]) for i in range(k)])
        host = med([(marks[b][i][1] - marks[a][i][1]) * 1e3 for i in range(k)])
        row.append(f"{a} -> {b}: gpu {gpu:.3f} host {host:.3f}")
    nxt = [marks["call end"][i][0].elapsed_time(marks["call start"][i + 1][0]) for i in range(n - 1)]
    return " | ".join(row) + f" | call end -> next start: gpu {med(nxt):.3f} ms"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frac", type=float, default=1.0)
    ap.add_argument("--configs", default="default")
    ap.add_argument("--shape", default="3584x2560x151936")
    a = ap.parse_args()
    T, H, V = map(int, a.shape.split("x"))
    h, W, labels, mask, off = make(T, H, V, a.frac, seed=1)
    h.requires_grad_(True)
    base = ce._config
    for name in a.configs.split(","):
        changes = {} if name == "default" else dict(kv.split("=") for kv in name.split(":"))
        cfg = dataclasses.replace(ce.CEConfig(), **{k: type(getattr(ce.CEConfig, k))(v) for k, v in changes.items()})
        ce._config = lambda dev, dt, c=cfg: c

        def fn():
            num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
            (num / (den + 1e-6)).backward()

        fn()
        wall = do_bench(fn, warmup=30, rep=200, return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        span, busy, gaps = timeline(fn)
        big = sorted(gaps, reverse=True)[:6]
        # the chunk loop alone, eager vs one CUDA graph replay
        loop, g = chunk_loop(h, W, labels, mask, off, cfg)
        eager_loop = do_bench(loop, warmup=20, rep=200, return_mode="median")
        graph_loop = do_bench(g.replay, warmup=20, rep=200, return_mode="median")
        print(f"{name}: wall {wall:.3f} ms | host enqueue {(t1 - t0) / 5 * 1e3:.3f} ms/call (drain {(t2 - t1) * 1e3:.1f} ms) | "
              f"profiled span {span:.3f} busy {busy:.3f} gaps {sum(g for g, _ in gaps) / 1e3:.3f} ms in {len(gaps)} | "
              f"chunk loop eager {eager_loop:.3f} graph {graph_loop:.3f} ms", flush=True)
        print("   largest gaps (us, next kernel):", [(round(g, 1), n[:40]) for g, n in big], flush=True)
        print("   phases (ms, medians):", phases(fn), flush=True)
    ce._config = base


if __name__ == "__main__":
    main()
