"""Benchmark: fused lm_head + decayed CE, fwd+bwd with a frozen lm_head (the drafter case).

Providers: ours (triton) / torch eager / torch.compile / Liger fused linear CE / Cut Cross-Entropy
(a provider that is not importable is skipped). Shapes: T in {3584, 8192}, H in {2560, 4096},
V in {151936, 262144}, supervised fraction 100% and ~50%. extra_info: peak extra memory (MiB) and
useful TFLOP/s (2 logits-sized matmuls over the supervised tokens).
Run: ``pytest benchmarks/test_cross_entropy.py --benchmark-only`` on a CUDA machine.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(T, H, V) for T in (3584, 8192) for H in (2560, 4096) for V in (151936, 262144)]
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger", "cce"]


def _inputs(T, H, V, frac):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    W = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, V, (T,), device="cuda", generator=g)
    mask = torch.rand(T, device="cuda", generator=g) < frac
    off = torch.arange(T, device="cuda") % 7
    return h, W, labels, mask, off


def _loss(h, W, tgt, w):
    logits = h @ W.t()
    return (F.cross_entropy(logits.float(), tgt, reduction="none") * w).sum() / w.sum()


_COMPILED = {}


def _provider(name, h, W, labels, mask, off):
    from d2kernels.cross_entropy import decayed_cross_entropy
    from d2kernels.layout import decay_weights

    w = decay_weights(mask, off, 4.0)
    if name == "ours":
        def fn():
            num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=4.0, backend="triton")
            (num / (den + 1e-6)).backward()
        return fn
    if name == "torch_eager":
        return lambda: _loss(h, W, labels, w).backward()
    if name == "torch_compile":
        cl = _COMPILED.setdefault("loss", torch.compile(_loss))
        return lambda: cl(h, W, labels, w).backward()
    if name == "liger":
        flce = pytest.importorskip("liger_kernel.transformers.functional").liger_fused_linear_cross_entropy
        tg = torch.where(w > 0, labels, torch.full_like(labels, -100))  # Liger has no per-token weights
        return lambda: flce(h, W, tg, ignore_index=-100, reduction="mean").backward()
    if name == "cce":
        lce = pytest.importorskip("cut_cross_entropy").linear_cross_entropy
        return lambda: ((lce(h, W, labels, reduction="none").float() * w).sum() / w.sum()).backward()
    raise ValueError(name)


@pytest.mark.parametrize("frac", [1.0, 0.5], ids=lambda f: f"sup{int(f * 100)}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-H{s[1]}-V{s[2]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ce_fwd_bwd(benchmark, provider, shape, frac):
    T, H, V = shape
    h, W, labels, mask, off = _inputs(T, H, V, frac)
    fn = _provider(provider, h, W, labels, mask, off)

    def step():
        fn()
        h.grad = None
        torch.cuda.synchronize()

    step()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    sup = int(mask.sum())
    benchmark.extra_info.update(peak_extra_mib=peak_mib, supervised=sup,
                                useful_tflops=2 * 2.0 * sup * H * V / benchmark.stats.stats.median / 1e12)
