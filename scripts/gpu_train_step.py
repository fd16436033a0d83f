"""One full drafter training step (fwd, bwd, AdamW), d2kernels vs the usual flex + materialized-logits path.

    python scripts/gpu_train_step.py                 # Qwen3-4B-shaped 5-layer drafter, D2, S=4096, N=512, B=7, bf16
    python scripts/gpu_train_step.py --tiny          # CPU-sized check that both paths agree and the table prints

Prints, per provider: ms/step (median), tokens/s (Bt*S per step), peak memory (total and above the
step's starting level) and the largest power-of-two local batch that fits (GPU only).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.reference_step import (  # noqa: E402
    ReferenceOps,
    TrainStep,
    largest_batch,
    make_batch,
    measure,
    qwen3_4b_target_config,
    tiny_target_config,
)
from d2sd.models import build_drafter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny dims on CPU (fp32, dense-mask SDPA reference, no compile)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length S")
    p.add_argument("--num-anchors", type=int, default=512, help="anchors per sample N")
    p.add_argument("--block-size", type=int, default=7, help="block size B")
    p.add_argument("--batch", type=int, default=1, help="local batch Bt for the timing")
    p.add_argument("--layers", type=int, default=5, help="draft layers")
    p.add_argument("--no-d2", action="store_true", help="plain DFlash (shifted labels) instead of D2")
    p.add_argument("--providers", default="d2kernels,d2kernels-compiled,reference",
                   help="comma list of d2kernels, d2kernels-compiled (layers torch.compile'd), reference")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (includes torch.compile)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--max-batch", type=int, default=64, help="largest local batch tried in the fit search (0 = skip)")
    p.add_argument("--no-compile", action="store_true", help="run the reference path eagerly")
    return p.parse_args(argv)


def build(args, device, dtype):
    tc = tiny_target_config() if args.tiny else qwen3_4b_target_config()
    with torch.device(device):
        d = build_drafter(
            tc, num_draft_layers=args.layers, block_size=args.block_size, num_anchors=args.num_anchors,
            enable_d2_feature=not args.no_d2, loss_decay_gamma=4.0, backend="auto",
        )
    return d.to(dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: use --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.tiny:
        args.seq_len, args.num_anchors, args.block_size = min(args.seq_len, 96), min(args.num_anchors, 12), min(args.block_size, 4)
        args.layers, args.iters, args.warmup, args.max_batch = min(args.layers, 2), min(args.iters, 3), 1, 0
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    providers = [p for p in args.providers.split(",") if p]
    if args.tiny:
        providers = [p for p in providers if p != "d2kernels-compiled"]  # minutes of CPU compile for nothing
    ops = ReferenceOps(attn_impl="flex" if cuda else "dense", compile=cuda and not args.no_compile)

    torch.manual_seed(0)
    drafter = build(args, device, dtype)
    cfg = drafter.config
    batch = make_batch(cfg, args.batch, args.seq_len, device, dtype)

    # Same weights, same batch: the two paths must give the same loss before anything is timed.
    with torch.no_grad():
        losses = {p: TrainStep(drafter, p, ops).loss(batch).item() for p in providers if p != "d2kernels-compiled"}
    print(f"loss check: {losses}")
    vals = list(losses.values())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if any(abs(v - vals[0]) > tol * abs(vals[0]) for v in vals):
        print(f"error: providers disagree on the loss: {losses}", file=sys.stderr)
        return 1

    tokens = args.batch * args.seq_len
    shape = (f"{'tiny' if args.tiny else 'qwen3-4b'} {cfg.num_draft_layers} layers, H={cfg.hidden_size}, "
             f"V={cfg.vocab_size}, S={args.seq_len}, N={args.num_anchors}, B={args.block_size}, "
             f"Bt={args.batch}, {'D2' if cfg.enable_d2_feature else 'DFlash'}, {str(dtype)[6:]}, {device}")
    rows = []
    for p in providers:
        torch.manual_seed(0)
        d = build(args, device, dtype)
        step = TrainStep(d, p, ops)
        r = measure(step, batch, device, warmup=args.warmup, iters=args.iters)
        fit = "-"
        if cuda and args.max_batch:
            def try_step(bt, step=step):
                step(make_batch(cfg, bt, args.seq_len, device, dtype, seed=bt))
                torch.cuda.synchronize()
            fit = str(largest_batch(try_step, args.max_batch))
        rows.append((p, r["ms"], tokens / r["ms"] * 1e3, r.get("peak_gib"), r.get("extra_gib"), fit))
        print(f"  {p}: {r['ms']:.2f} ms/step, max local batch {fit}", flush=True)
        del step, d
        if cuda:
            torch.cuda.empty_cache()

    print(f"\ntrain step ({shape})")
    print("| provider | ms/step | tokens/s | peak GiB | extra GiB | max local batch |")
    print("|---|---|---|---|---|---|")
    for p, ms, tps, peak, extra, fit in rows:
        f = (lambda v: "-" if v is None else f"{v:.2f}")
        print(f"| {p} | {ms:.2f} | {tps:,.0f} | {f(peak)} | {f(extra)} | {fit} |")
    ref = [r for r in rows if r[0] == "reference"]
    for r in rows:
        if ref and r[0] != "reference":
            print(f"speedup {r[0]} vs reference: {ref[0][1] / r[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
