"""The split CE schedule's second matmul ``acc[M, N] += P[M, K] @ W[K, N]`` (f32 out): cuBLAS vs the stream-K kernel.

``acc [Tb, H]`` is small and K (the chunk width) long: at 1280 x 13312 x 2560 cuBLAS's 128 x 256 tiles
make 100 output tiles for the H200's 132 SMs. ``_mm2_streamk_kernel`` (d2kernels/cross_entropy/triton.py)
gives every SM the same number of K steps and adds the partial tiles in a fixed order (deterministic).
Per shape (M x K x N = Tb x Vc x H, bf16 P and W) this times (``do_bench``, median):

  cublas          torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc)  (what the schedule runs now)
  sk BMxBNxBK wW sS O  the stream-K kernel at that tile / warps / stages (tensor-descriptor loads),
                       segment order O (``CEConfig.mm2_order``): kalign (programs stream the same K
                       window, P/W slabs shared in L2) or tile (every program at its own K offset)

and checks each kernel against cuBLAS (relative error) and its bitwise determinism over 3 repeats;
the markdown table comes last.

    PYTHONPATH=. python3 scripts/mm2_probe.py [--shapes 1280x13312x2560,...] [--orders kalign,tile] [--progs N]
                                              [--ptr] [--cpu-check]
``--cpu-check`` runs the kernel at tiny shapes in the Triton interpreter against torch and exits.
"""
import argparse
import dataclasses
import itertools
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

CONFIGS = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]


def repeated(acc0, p, w, cfg, sync, err, n=3):
    """``n`` runs of ``acc0 + p @ w`` through the stream-K kernel, each on a fresh copy of ``acc0``
    (for bitwise-determinism checks; the GPU test of the kernel uses it too)."""
    import d2kernels.cross_entropy.triton as ce
    outs = []
    for _ in range(n):
        acc = acc0.clone()
        ce._mm2_streamk(acc, p, w, True, cfg, sync=sync, err=err)
        outs.append(acc)
    return outs


def cpu_check():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import d2kernels.cross_entropy.triton as ce
    torch.manual_seed(0)
    base = ce._config(torch.device("cpu"), torch.float16)
    # fp16: the interpreter of triton 3.9 returns garbage for a bf16 x bf16 tl.dot
    for M, K, N, n_progs in ((37, 200, 72, 5), (21, 8, 40, 3), (16, 144, 32, 3), (20, 20, 40, 11)):
        p = torch.rand(M, K).half()
        w = (torch.randn(K, N) * 0.5).half()
        acc0 = torch.randn(M, N)
        for tma, accumulate, order in itertools.product((False, True) if ce._tma_ok(p, w) else (False,),  # 16-byte rows
                                                        (False, True), ("kalign", "tile")):
            cfg = dataclasses.replace(base, mm2_order=order)
            sync = ce._mm2_sync(M, N, base, "cpu")
            err = torch.zeros(1, dtype=torch.int32)
            outs = []
            for _ in range(2):
                acc = acc0.clone()
                ce._mm2_streamk(acc, p, w, accumulate, cfg, n_progs=n_progs, sync=sync, err=err, tma=tma)
                outs.append(acc)
            want = p.float() @ w.float() + (acc0 if accumulate else 0)
            tag = f"M{M} K{K} N{N} progs {n_progs} tma {tma} accumulate {accumulate} {order}"
            assert torch.allclose(outs[0], want, atol=1e-4, rtol=1e-4), tag
            assert torch.equal(outs[0], outs[1]), f"{tag}: not deterministic"
            assert int(err) == 0 and int(sync.abs().sum()) == 0, f"{tag}: scratch not left zeroed"
    print("cpu check ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1280x13312x2560,1024x13312x2560,896x18112x4096",
                    help="comma-separated M x K x N (= Tb x Vc x H of one chunk)")
    ap.add_argument("--orders", default="kalign,tile", help="segment orders to time (CEConfig.mm2_order)")
    ap.add_argument("--progs", type=int, default=0, help="persistent programs of the stream-K kernel (0: the SM count)")
    ap.add_argument("--ptr", action="store_true", help="also time each tile config with pointer loads (no TMA)")
    ap.add_argument("--cpu-check", action="store_true", help="interpreter check at tiny shapes (no GPU), then exit")
    args = ap.parse_args()
    if args.cpu_check:
        return cpu_check()
    import triton
    from triton.testing import do_bench

    import d2kernels.cross_entropy.triton as ce
    dev = "cuda"
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    n_progs = args.progs or n_sm
    bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    rows = []
    for shape in args.shapes.split(","):
        M, K, N = map(int, shape.split("x"))
        torch.manual_seed(M + K + N)
        p = torch.rand(M, K, device=dev).bfloat16()  # P = exp(z - r) * softcap' lies in [0, 1] mostly
        w = (torch.randn(K, N, device=dev) * 0.02).bfloat16()
        acc0 = torch.randn(M, N, device=dev)
        fl = 2.0 * M * N * K
        ref = torch.addmm(acc0, p, w, out_dtype=torch.float32)
        acc = acc0.clone()
        t = bench(lambda: torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc))
        rows.append((shape, "cublas", t * 1e3, fl / t / 1e9, 0.0, "-", "-"))
        variants = list(itertools.product(args.orders.split(","), (True, False) if args.ptr else (True,), CONFIGS))
        for order, tma, (bm, bn, bk, warps, stages) in variants:
            name = f"sk {bm}x{bn}x{bk} w{warps} s{stages} {order}" + ("" if tma else " ptr")
            cfg = dataclasses.replace(ce.CEConfig(), mm2="streamk", mm2_block_m=bm, mm2_block_n=bn, mm2_block_k=bk,
                                      mm2_warps=warps, mm2_stages=stages, mm2_progs=n_progs, mm2_tma=tma,
                                      mm2_order=order)
            n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            try:
                sync = ce._mm2_sync(M, N, cfg, dev)
                err = torch.zeros(1, dtype=torch.int32, device=dev)
                outs = repeated(acc0, p, w, cfg, sync, err)
                torch.cuda.synchronize()
                det = "yes" if all(torch.equal(outs[0], o) for o in outs[1:]) else "NO"
                if int(err) or int(sync.abs().sum()):
                    det += f" (err {int(err)}, scratch sum {int(sync.abs().sum())})"
                rel = ((outs[0] - ref).norm() / ref.norm()).item()
                acc = acc0.clone()
                t = bench(lambda: ce._mm2_streamk(acc, p, w, True, cfg, sync=sync, err=err))
                rows.append((shape, name, t * 1e3, fl / t / 1e9, rel, det, n_tiles))
            except Exception as e:  # a config this Triton cannot compile: report, go on
                print(f"{shape} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"{shape}: done", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {n_sm} SMs, stream-K programs {n_progs}, triton {triton.__version__}")
    print("| M x K x N | kernel | us | TFLOP/s | rel err vs cublas | deterministic (3 runs) | output tiles |")
    print("|---|---|---|---|---|---|---|")
    for shape, name, us, tf, rel, det, n_tiles in rows:
        print(f"| {shape} | {name} | {us:.1f} | {tf:.0f} | {rel:.1e} | {det} | {n_tiles} |")


if __name__ == "__main__":
    main()
