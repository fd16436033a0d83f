"""Drafter train step (fwd, bwd, AdamW), d2kernels vs the usual path, Qwen3-4B shape (pytest-benchmark).

Shape: 5-layer Qwen3-4B drafter (hidden 2560, 32/8 heads, head_dim 128, intermediate 9728,
vocab 151936), D2 on, S=4096, N=512, B=7, bf16, local batch 1. Providers:
``d2kernels`` (this package), ``d2kernels-compiled`` (decoder layers torch.compile'd) and ``reference`` (compiled flex_attention + create_block_mask every
step, ``nn.Embedding`` of an id tensor, materialized logits + compiled ``F.cross_entropy``).
``extra_info`` carries tokens/s, peak memory and the largest power-of-two local batch that fits.
The same table prints from ``python scripts/gpu_train_step.py``.
"""
import pytest
import torch

from benchmarks.reference_step import (
    ReferenceOps,
    TrainStep,
    largest_batch,
    make_batch,
    measure,
    qwen3_4b_target_config,
)
from d2sd.models import build_drafter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

S, N, B, BT = 4096, 512, 7, 1
PROVIDERS = ["d2kernels", "d2kernels-compiled", "reference"]


@pytest.fixture(scope="module")
def ops():
    return ReferenceOps(attn_impl="flex", compile=True)


def make_drafter():
    torch.manual_seed(0)
    with torch.device("cuda"):
        d = build_drafter(qwen3_4b_target_config(), num_draft_layers=5, block_size=B, num_anchors=N,
                          enable_d2_feature=True, loss_decay_gamma=4.0)
    return d.to(torch.bfloat16)


def test_providers_agree_on_loss(ops):
    d = make_drafter()
    batch = make_batch(d.config, BT, S, "cuda", torch.bfloat16)
    with torch.no_grad():
        ours = TrainStep(d, "d2kernels", ops).loss(batch)
        ref = TrainStep(d, "reference", ops).loss(batch)
    assert abs(ours.item() - ref.item()) <= 2e-2 * abs(ref.item())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, ops, provider):
    d = make_drafter()
    cfg = d.config
    batch = make_batch(cfg, BT, S, "cuda", torch.bfloat16)
    step = TrainStep(d, provider, ops)
    stats = measure(step, batch, "cuda", warmup=3, iters=5)  # also compiles before the benchmark rounds

    def run():
        step(batch)
        torch.cuda.synchronize()

    benchmark.group = f"train-step qwen3-4b S{S} N{N} b{B} Bt{BT} bf16"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)

    def try_step(bt):
        step(make_batch(cfg, bt, S, "cuda", torch.bfloat16, seed=bt))
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        provider=provider,
        tokens_per_s=BT * S / stats["ms"] * 1e3,
        peak_gib=round(stats["peak_gib"], 2),
        extra_gib=round(stats["extra_gib"], 2),
        max_local_batch=largest_batch(try_step, limit=64),
    )
