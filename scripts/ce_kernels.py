"""Per-kernel GPU time of the CE providers under sustained load, and the split schedule's second matmul
(``acc += P @ W_c``) in the layouts cuBLAS can be asked for.

Single profiled calls flatter every kernel (clocks drop under sustained matmuls on the H200), so this
first runs the provider for ``--warm-ms`` and then profiles ``--calls`` calls, reporting the mean per
call of each kernel name: ours and torch.compile side by side, same inputs, same thermal state.

    PYTHONPATH=. python3 scripts/ce_kernels.py [--shape 3584x2560x151936] [--frac 1.0] [--no-compile] [--graph] [--mm2]
"""
import argparse
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import d2kernels.cross_entropy.triton as ce  # noqa: E402
from d2kernels.cross_entropy import decayed_cross_entropy  # noqa: E402
from d2kernels.layout import decay_weights  # noqa: E402


def per_kernel(fn, calls: int, warm_ms: float):
    """Mean GPU ms per call of each kernel name over ``calls`` calls, after ``warm_ms`` of the same load."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t_end = time.perf_counter() + warm_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    from ce_timeline import kernel_union
    tot = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = e.name[:70]
            n, t = tot.get(k, (0, 0.0))
            tot[k] = (n + 1, t + e.device_time_total / 1e3)
    span, busy, _ = kernel_union(prof)
    return {k: (n / calls, t / calls) for k, (n, t) in tot.items()}, span / calls, busy / calls


def show(title, result, top=10):
    table, span, busy = result
    total = sum(t for _, t in table.values())
    print(f"{title}: per call: GPU kernels {total:.3f} ms, busy {busy:.3f} ms, span {span:.3f} ms (idle {span - busy:.3f})")
    for k, (n, t) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {t:8.3f} ms  x{n:<6.1f} {t / max(n, 1e-9) * 1e3:8.1f} us each  {k}")


def mm2_layouts(Tb, Vc, H, reps=3):
    """``acc [Tb, H] += P [Tb, Vc] @ W_c [Vc, H]`` (f32 out) as the schedule calls it, and transposed
    (``accT [H, Tb] += W_c^T @ P^T``: the same products, another cuBLAS kernel choice), next to mm1."""
    from gpu_cross_entropy import chunk_gemms
    fns, acc, acc_t = chunk_gemms(Tb, Vc, H)
    fl = 2.0 * Tb * Vc * H
    names = {"mm1": "mm1 S = h @ W_c^T", "mm2": "mm2 acc += P @ W_c", "mm2_t": "mm2 accT += W_c^T @ P^T"}
    for key, fn in fns.items():
        ts = [do_bench(fn, warmup=25, rep=150, return_mode="median") for _ in range(reps)]
        t = sorted(ts)[len(ts) // 2]
        print(f"  Tb={Tb} Vc={Vc} H={H} {names[key]:26s} {t * 1e3:7.1f} us {fl / t / 1e9:5.0f} TF/s  (rounds {' '.join(f'{x * 1e3:.1f}' for x in ts)})",
              flush=True)
    # the two layouts agree (same products, f32 accumulate)
    acc.zero_(), acc_t.zero_()
    fns["mm2"]()
    fns["mm2_t"]()
    print(f"  layouts agree: max |diff| {(acc - acc_t.t()).abs().max().item():.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3584x2560x151936", help="T x H x V")
    ap.add_argument("--frac", type=float, default=1.0, help="supervised fraction")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--warm-ms", type=float, default=1500.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also ours' chunk loop replayed from a CUDA graph: no host "
                    "gaps, so the GPU runs at full duty as torch.compile does (the eager profile runs cooler)")
    ap.add_argument("--mm2", action="store_true", help="also time mm2 in both layouts at this shape's chunk plan")
    a = ap.parse_args()
    from gpu_cross_entropy import make  # the benchmark's inputs
    T, H, V = map(int, a.shape.split("x"))
    h, W, labels, mask, off = make(T, H, V, a.frac, seed=1)
    h.requires_grad_(True)
    w = decay_weights(mask, off, 4.0)

    def ours():
        num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
        (num / (den + 1e-6)).backward()
        h.grad = None

    provs = {"ours": ours}
    if not a.no_compile:
        def lossfn(h, W, tgt, w):
            logits = h @ W.t()
            return (torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="none") * w).sum() / w.sum()
        cl = torch.compile(lossfn)

        def comp():
            cl(h, W, labels, w).backward()
            h.grad = None
        provs["torch_compile"] = comp
    print(f"{torch.cuda.get_device_name()} T={T} H={H} V={V} sup={a.frac:.0%}", flush=True)
    for name, fn in provs.items():
        fn()
        cold = do_bench(fn, warmup=40, rep=250, return_mode="median")
        res = per_kernel(fn, a.calls, a.warm_ms)
        warm = do_bench(fn, warmup=40, rep=250, return_mode="median")  # right after the sustained load
        show(f"{name} (wall {cold:.3f} ms fresh, {warm:.3f} ms after the warm-up)", res)
    if a.graph:
        from ce_timeline import chunk_loop
        _, g = chunk_loop(h, W, labels, mask, off, ce.CEConfig())
        wall = do_bench(g.replay, warmup=40, rep=250, return_mode="median")
        show(f"ours, chunk loop as a CUDA graph (replay {wall:.3f} ms)", per_kernel(g.replay, a.calls, a.warm_ms))
    if a.mm2:
        Tc = int((w > 0).sum())
        Tb, Vc = ce._split_plan(T, Tc, H, V, 2, ce.CEConfig(), True)
        print(f"chunk plan Tb={Tb} Vc={Vc} ({triton.cdiv(Tc, Tb)} T-blocks x {triton.cdiv(V, Vc)} chunks)")
        mm2_layouts(Tb, Vc, H)


if __name__ == "__main__":
    main()
