"""One ``decayed_cross_entropy`` forward-with-grad at the key shape, for ``ncu`` (warm-up first).

Usage (CUDA device): ncu --clock-control none -k regex:_ce_block_kernel -s 2 -c 1 --section SpeedOfLight \\
    --section ComputeWorkloadAnalysis --section WarpStateStats python3 scripts/ce_profile.py [--sup 1.0]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_cross_entropy import make  # noqa: E402  (the benchmark's inputs)

import d2kernels.cross_entropy.triton as ce_triton  # noqa: E402
from d2kernels.cross_entropy import decayed_cross_entropy  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--sup", type=float, default=1.0, help="supervised fraction")
ap.add_argument("--shape", default="3584x2560x151936", help="TxHxV")
args = ap.parse_args()
T, H, V = map(int, args.shape.split("x"))
h, W, labels, mask, off = make(T, H, V, args.sup)
h.requires_grad_()
for _ in range(3):
    num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
    num.backward()
torch.cuda.synchronize()
print("ok", float(num))
for entry in getattr(ce_triton._ce_block_kernel, "device_caches", {}).values():
    for k in entry[0].values():  # compiled variants: registers per thread and spilled registers
        print("_ce_block_kernel", getattr(k, "n_regs", "?"), "registers,", getattr(k, "n_spills", "?"), "spills")
