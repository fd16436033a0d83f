"""noise_embedding benchmark: ours (Triton) vs the torch index path (draft_token_ids + F.embedding).

Providers: ``ours`` = the public op (with its input validation), ``op`` = the registered custom
op without that validation, ``kernel`` = the Triton launchers alone, ``torch`` = what users run
today.
Run on a GPU: ``python -m pytest benchmarks/test_embedding.py -s``. Each case prints the median
of ``triton.testing.do_bench`` (ms) and the bandwidth of the bytes that must move (weight rows
read once, output written once); pytest-benchmark times the same call with a device sync.
"""
import pytest
import torch
import torch.nn.functional as F

from d2kernels import noise_embedding, validation
from d2kernels.layout import draft_token_ids, sample_anchors, sample_prefix_lengths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(1, 4096, 512, 7, 2560), (1, 4096, 512, 7, 4096), (1, 4096, 512, 16, 2560), (1, 4096, 512, 16, 4096)]
V = 151936
MASK_ID = 151669


@pytest.fixture(scope="module", autouse=True)
def _warm_gpu():
    """Bring the clocks up before the first timing (an idle H200 sits at a low SM clock)."""
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        x @ x
    torch.cuda.synchronize()


def _inputs(Bt, S, N, B, H, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g)
    input_ids = torch.randint(0, V, (Bt, S), device="cuda", generator=g)
    loss_mask = torch.ones(Bt, S, dtype=torch.bool, device="cuda")
    loss_mask[:, :64] = False  # a prompt
    anchors, keep = sample_anchors(loss_mask, N, generator=g)
    prefix_lens = sample_prefix_lengths(keep, B, generator=g)
    return weight, input_ids, anchors, keep, prefix_lens


def _providers(weight, input_ids, anchors, keep, prefix_lens, B):
    def ours():
        return noise_embedding(weight, input_ids, anchors, keep, prefix_lens, block_size=B, mask_token_id=MASK_ID, backend="triton")

    def ours_unchecked():  # the public op with validation off (ids/anchors checked upstream, as the drafter does)
        with validation("off"):
            return ours()

    def kernel():  # the launcher alone: no input validation (check_range syncs) of the public op
        from d2kernels.embedding import triton as emb_triton

        return emb_triton.noise_embedding_fwd(weight, input_ids, anchors, keep, prefix_lens, B, MASK_ID)

    def op():  # the registered custom op (autograd included) without the public wrapper's checks
        return torch.ops.d2kernels.noise_embedding_fwd(weight, input_ids, anchors, keep, prefix_lens, B, MASK_ID, "triton")

    def torch_index():
        ids = draft_token_ids(input_ids, anchors, keep, prefix_lens, B, MASK_ID)
        return F.embedding(ids, weight)

    return {"ours": ours, "ours_unchecked": ours_unchecked, "op": op, "kernel": kernel, "torch": torch_index}


def _shape_id(s):
    Bt, S, N, B, H = s
    return f"B{Bt}-S{S}-N{N}-b{B}-H{H}"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "ours_unchecked", "op", "kernel", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_noise_embedding(benchmark, shape, provider, mode):
    import triton


    Bt, S, N, B, H = shape
    weight, input_ids, anchors, keep, prefix_lens = _inputs(*shape)
    if mode == "fwd+bwd":
        weight.requires_grad_()
    fn = _providers(weight, input_ids, anchors, keep, prefix_lens, B)[provider]
    grad = torch.randn(Bt, N * B, H, device="cuda", dtype=torch.bfloat16)

    def step():
        out = fn()
        if mode == "fwd+bwd" and provider == "kernel":
            from d2kernels.embedding import triton as emb_triton

            emb_triton.noise_embedding_bwd(grad, input_ids, anchors, keep, prefix_lens, B, MASK_ID, V)
        elif mode == "fwd+bwd":
            weight.grad = None
            out.backward(grad)
        return out

    ref = F.embedding(draft_token_ids(input_ids, anchors, keep, prefix_lens, B, MASK_ID), weight.detach())
    assert torch.equal(step().detach(), ref)  # never time a wrong answer
    ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    moved = 2 * Bt * N * B * H * weight.element_size()
    benchmark.extra_info.update(ms=ms, gbps=moved / ms / 1e6)
    print(f"\nnoise_embedding {mode:7s} {_shape_id(shape)} {provider:6s} {ms:.4f} ms  {moved / ms / 1e6:.0f} GB/s (fwd bytes)")

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("cfg", [(8, 512, 4), (4, 1024, 4), (8, 1024, 8), (1, 2048, 8), (2, 2048, 8), (4, 2048, 8), (2, 2048, 16)],
                         ids=lambda c: f"R{c[0]}-H{c[1]}-w{c[2]}")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=_shape_id)
def test_fwd_tile_sweep(benchmark, shape, cfg, monkeypatch):
    """Forward tile sizes side by side (the chooser's pick is the 'ours' row above)."""
    import triton

    from d2kernels.embedding import triton as emb_triton

    monkeypatch.setattr(emb_triton, "_fwd_config", lambda H, R, itemsize: cfg)
    Bt, S, N, B, H = shape
    weight, input_ids, anchors, keep, prefix_lens = _inputs(*shape)
    fn = _providers(weight, input_ids, anchors, keep, prefix_lens, B)["kernel"]
    ref = F.embedding(draft_token_ids(input_ids, anchors, keep, prefix_lens, B, MASK_ID), weight)
    assert torch.equal(fn(), ref)
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(ms=ms)
    print(f"\nnoise_embedding fwd tiles {cfg} {_shape_id(shape)} {ms:.4f} ms")
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)
