"""backend="cuda": the CMake-built CUDA reference library (csrc/).

CPU: without the library every op raises an error that names the cmake commands; with it,
the library loads and refuses CPU tensors. GPU (skipped without CUDA or without the library):
cuda vs the float64 torch reference vs triton, forward and every gradient, fp32 and bf16.
"""
import pytest
import torch

import d2kernels
from d2kernels import cuda as d2cuda
from d2kernels import decayed_cross_entropy, noise_embedding, varprefix_attention
from d2kernels.layout import draft_targets
from tests.utils import rel_err


def _library_built() -> bool:
    return d2cuda.library_path().is_file()


needs_gpu_lib = pytest.mark.skipif(
    not (torch.cuda.is_available() and _library_built()),
    reason="needs a CUDA device and the built library (cmake -S . -B build && cmake --build build -j)",
)


def check_close(out, ref64, torch_same_dtype, dtype, what):
    """Acceptance (docs/semantics.md): fp32 <= 1e-4; bf16 <= 2x plain torch in bf16 and <= 2e-2."""
    err = rel_err(out, ref64)
    if dtype == torch.float32:
        assert err <= 1e-4, f"{what}: rel err {err:.3g}"
    else:
        bound = min(max(2 * rel_err(torch_same_dtype, ref64), 4e-3), 2e-2)
        assert err <= bound, f"{what}: rel err {err:.3g} > {bound:.3g}"


# ---- CPU: the library's absence and presence -------------------------------------------------


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    Bt, S, N, B, V, H = 1, 12, 2, 3, 10, 8
    anchors = torch.tensor([[2, 7]])
    keep = torch.ones(1, N, dtype=torch.bool)
    ids = torch.randint(0, V, (Bt, S), generator=g)
    emb = (torch.randn(V, H, generator=g), ids, anchors, keep, torch.full((1, N), 2))
    q = torch.randn(Bt, N * B, 2, 4, generator=g)
    kv = [torch.randn(Bt, S, 1, 4, generator=g) for _ in range(2)] + [torch.randn(Bt, N * B, 1, 4, generator=g) for _ in range(2)]
    attn = (q, *kv, anchors, keep)
    ce = (torch.randn(5, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (5,), generator=g),
          torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.long))
    return emb, attn, ce, B


def _run_all_cuda(emb, attn, ce, B):
    with pytest.raises(RuntimeError, match=r"cmake -S \. -B build") as e1:
        noise_embedding(*emb, block_size=B, mask_token_id=1, backend="cuda")
    with pytest.raises(RuntimeError, match=r"cmake --build build") as e2:
        varprefix_attention(*attn, block_size=B, backend="cuda")
    with pytest.raises(RuntimeError, match="D2KERNELS_CUDA_LIB") as e3:
        decayed_cross_entropy(*ce, gamma=4.0, backend="cuda")
    return e1, e2, e3


def test_missing_library_raises_build_help(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "libd2kernels_cuda.so"
    monkeypatch.setenv("D2KERNELS_CUDA_LIB", str(missing))
    monkeypatch.setattr(d2cuda, "_LIB", None)
    for e in _run_all_cuda(*_tiny_inputs()):
        assert str(missing) in str(e.value) and "not built" in str(e.value)


def test_default_path_is_repo_build_dir(monkeypatch):
    monkeypatch.delenv("D2KERNELS_CUDA_LIB", raising=False)
    path = d2cuda.library_path()
    assert path.name == "libd2kernels_cuda.so" and path.parent.name == "build"
    assert (path.parent.parent / "d2kernels").is_dir()


@pytest.mark.skipif(not _library_built(), reason="library not built (cmake -S . -B build && cmake --build build -j)")
def test_built_library_loads_and_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(d2cuda, "_LIB", None)
    lib = d2cuda.load_library()
    assert lib.d2k_abi_version() == d2cuda.ABI_VERSION
    emb, attn, ce, B = _tiny_inputs()
    with pytest.raises(ValueError, match="CUDA device"):
        noise_embedding(*emb, block_size=B, mask_token_id=1, backend="cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        varprefix_attention(*attn, block_size=B, backend="cuda")


# ---- GPU: cross-checks ------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


def _layout(Bt, S, N, B, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randint(0, S, (Bt, N), generator=g)
    keep = torch.rand(Bt, N, generator=g) > 0.25
    anchors[0, 0], keep[0, 0] = 0, True  # sees only its own block
    anchors[-1, -1], keep[-1, -1] = S - 1, True  # slots run past the sequence end
    anchors[0, -1], keep[0, -1] = 5, False  # a dummy
    prefix_lens = torch.randint(1, B + 1, (Bt, N), generator=g)
    return anchors.cuda(), keep.cuda(), prefix_lens.cuda()


def _triton_or_none(fn):
    """Result of the triton backend, or None while that backend is not implemented yet."""
    try:
        return fn()
    except NotImplementedError:
        return None


EMB_CASES = [(2, 67, 5, 7, 300, 33), (1, 40, 9, 16, 11, 130)]


@needs_gpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMB_CASES, ids=lambda c: "B{}-S{}-N{}-b{}-V{}-H{}".format(*c))
def test_gpu_noise_embedding(shape, dtype):
    Bt, S, N, B, V, H = shape
    anchors, keep, pl = _layout(Bt, S, N, B, seed=1)
    w = torch.randn(V, H, device="cuda").to(dtype)
    ids = torch.randint(0, V, (Bt, S), device="cuda")
    g = torch.randn(Bt, N * B, H, device="cuda").to(dtype)

    def run(backend, weight):
        wr = weight.detach().clone().requires_grad_()
        out = noise_embedding(wr, ids, anchors, keep, pl, block_size=B, mask_token_id=3, backend=backend)
        out.backward(g.to(weight.dtype))
        return out, wr.grad

    out_c, dw_c = run("cuda", w)
    out_64, dw_64 = run("torch", w.double())
    out_t, dw_t = run("torch", w)
    assert rel_err(out_c, out_64) == 0.0
    check_close(dw_c, dw_64, dw_t, dtype, "dweight")
    tri = _triton_or_none(lambda: run("triton", w))
    if tri is not None:
        assert torch.equal(tri[0], out_c)
        check_close(tri[1], dw_64, dw_t, dtype, "triton dweight")


ATTN_CASES = [(2, 67, 5, 7, 4, 2, 32), (1, 50, 3, 16, 6, 3, 48), (1, 9, 4, 1, 2, 2, 16)]


@needs_gpu_lib
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_CASES, ids=lambda c: "B{}-S{}-N{}-b{}-HQ{}-HKV{}-D{}".format(*c))
def test_gpu_varprefix_attention(shape, dtype):
    Bt, S, N, B, Hq, Hkv, D = shape
    anchors, keep, _ = _layout(Bt, S, N, B, seed=2)
    NB = N * B
    shapes = [(Bt, NB, Hq, D), (Bt, S, Hkv, D), (Bt, S, Hkv, D), (Bt, NB, Hkv, D), (Bt, NB, Hkv, D)]
    inputs = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    inputs[1] = inputs[1][:, :, :, :].transpose(1, 2).contiguous().transpose(1, 2)  # non-standard strides
    do = torch.randn(Bt, NB, Hq, D, device="cuda").to(dtype)

    def run(backend, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        o = varprefix_attention(*ts, anchors, keep, block_size=B, backend=backend)
        o.backward(do.to(o.dtype))
        return [o] + [t.grad for t in ts]

    got = run("cuda", inputs)
    ref = run("torch", [t.double() for t in inputs])
    same = run("torch", inputs)
    names = ["o", "dq", "dk_ctx", "dv_ctx", "dk_draft", "dv_draft"]
    for name, a, r, s in zip(names, got, ref, same):
        check_close(a, r, s, dtype, name)
    dummy = ~keep.repeat_interleave(B, dim=1)
    assert (got[0][dummy] == 0).all() and (got[1][dummy] == 0).all()
    tri = _triton_or_none(lambda: run("triton", inputs))
    if tri is not None:
        for name, a, r, s in zip(names, tri, ref, same):
            check_close(a, r, s, dtype, "triton " + name)


CE_CASES = [(2, 5, 7, 48, 1000), (1, 3, 16, 130, 517)]


@needs_gpu_lib
@pytest.mark.parametrize("softcap", [None, 3.0], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_CASES, ids=lambda c: "B{}-N{}-b{}-H{}-V{}".format(*c))
def test_gpu_decayed_cross_entropy(shape, dtype, softcap):
    Bt, N, B, H, V = shape
    S = 60
    anchors, keep, pl = _layout(Bt, S, N, B, seed=3)
    ids = torch.randint(0, V, (Bt, S), device="cuda")
    loss_mask = torch.rand(Bt, S, device="cuda") > 0.2
    labels, eval_mask, offsets = draft_targets(ids, loss_mask, anchors, keep, pl, B, same_position=True)
    hidden = (torch.randn(Bt, N * B, H, device="cuda") * 0.5).to(dtype).view(Bt, N, B, H)
    weight = (torch.randn(V, H, device="cuda") * 0.2).to(dtype)

    def run(backend, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        num, den, correct = decayed_cross_entropy(h, w, labels, eval_mask, offsets, gamma=4.0, softcap=softcap,
                                                  return_correct=True, backend=backend)
        num.backward()
        return num, den, correct, h.grad, w.grad

    got = run("cuda", hidden, weight)
    ref = run("torch", hidden.double(), weight.double())
    same = run("torch", hidden, weight)
    for name, i in (("num", 0), ("den", 1), ("dhidden", 3), ("dweight", 4)):
        check_close(got[i], ref[i], same[i], dtype, name)
    if dtype == torch.float32:
        assert torch.equal(got[2], ref[2])
    tri = _triton_or_none(lambda: run("triton", hidden, weight))
    if tri is not None:
        for name, i in (("num", 0), ("den", 1), ("dhidden", 3), ("dweight", 4)):
            check_close(tri[i], ref[i], same[i], dtype, "triton " + name)


@needs_gpu_lib
def test_gpu_public_names_match_triton_modules():
    import importlib

    for op, names in (("embedding", ["noise_embedding_fwd", "noise_embedding_bwd"]),
                      ("attention", ["varprefix_attention_fwd", "varprefix_attention_bwd"]),
                      ("cross_entropy", ["decayed_ce_fwd", "decayed_ce_bwd"])):
        importlib.import_module(f"d2kernels.{op}.triton")
        for name in names:
            assert callable(getattr(d2cuda, name))
    assert d2kernels.noise_embedding is noise_embedding
