"""Where the peak memory of ``decayed_cross_entropy`` fwd+bwd comes from, per phase (CUDA device).

Usage (repository root): PYTHONPATH=. python3 scripts/ce_memory.py [--shapes 3584x4096x151936,...]

For each shape and supervised fraction it prints MiB above what was allocated before the call:
the forward's peak (d hidden stash + chunk buffers), the backward's peak, and both again when
``hidden`` already holds a ``.grad`` (a benchmark's repeated calls accumulate into it) and when it
is not a leaf (a drafter's final norm output: its gradient flows on, nothing accumulates).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from d2kernels.cross_entropy import decayed_cross_entropy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_cross_entropy import make  # noqa: E402  (the same random inputs as the benchmark)

MiB = 2 ** 20


def phase_peaks(h_leaf, W, labels, mask, off, mode):
    """-> (forward peak, backward peak) in MiB above the allocation at the call's start."""
    h = h_leaf * 1.0 if mode == "non-leaf" else h_leaf
    if mode == "leaf, grad held":
        h_leaf.grad = torch.zeros_like(h_leaf)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0)
    torch.cuda.synchronize()
    fwd = (torch.cuda.max_memory_allocated() - base) / MiB
    torch.cuda.reset_peak_memory_stats()
    (num / (den + 1e-6)).backward()
    torch.cuda.synchronize()
    bwd = (torch.cuda.max_memory_allocated() - base) / MiB
    h_leaf.grad = None
    return fwd, bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3584x2560x151936,3584x4096x151936,8192x4096x262144")
    a = ap.parse_args()
    print("| T | H | V | sup | hidden | fwd peak MiB | bwd peak MiB | grad MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in a.shapes.split(","):
        T, H, V = map(int, spec.split("x"))
        for frac in (1.0, 0.5):
            h, W, labels, mask, off = make(T, H, V, frac, seed=1)
            h.requires_grad_(True)
            phase_peaks(h, W, labels, mask, off, "leaf")  # warm-up: cuBLAS workspaces, Triton caches
            for mode in ("leaf", "leaf, grad held", "non-leaf"):
                fwd, bwd = phase_peaks(h, W, labels, mask, off, mode)
                print(f"| {T} | {H} | {V} | {frac:.0%} | {mode} | {fwd:.1f} | {bwd:.1f} | {T * H * 2 / MiB:.1f} |", flush=True)
            del h, W
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
