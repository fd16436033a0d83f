"""Host cost of the varprefix_attention op layer with the launchers stubbed out (runs on CPU).

    PYTHONPATH=. python scripts/op_overhead.py

The registered custom op vs the eager autograd.Function path, range checks on/off, and a
prebuilt ``varprefix_layout`` (the drafter's way: no sort or check per call).
"""
import time
import types

import torch

import d2kernels
from d2kernels import attention as A

# stub launchers: host cost only (what the op layer adds around the kernels)
stub = types.SimpleNamespace(
    varprefix_attention_fwd=lambda q, *a, **k: (torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)),
    varprefix_attention_bwd=lambda do, q, kc, vc, kd, vd, *a, **k: tuple(torch.empty_like(t) for t in (q, kc, vc, kd, vd)),
)
A.fast_impl = lambda impl, op: stub
Bt, S, N, B, Hq, Hkv, D = 1, 64, 8, 7, 4, 2, 16
q = torch.randn(Bt, N*B, Hq, D, requires_grad=True)
kc = torch.randn(Bt, S, Hkv, D, requires_grad=True)
kd = torch.randn(Bt, N*B, Hkv, D, requires_grad=True)
a, keep = d2kernels.sample_anchors(torch.ones(Bt, S, dtype=torch.bool), N)
lay = d2kernels.varprefix_layout(a, keep, block_size=B, seq_len=S)


def run(path, checks, layout, backward=True):
    d2kernels.set_validation(checks)
    A.pick = (lambda c, e: c) if path == "custom_op" else (lambda c, e: e)

    def once():
        if layout:
            o = A.varprefix_attention(q, kc, kc, kd, kd, layout=lay, backend="triton")
        else:
            o = A.varprefix_attention(q, kc, kc, kd, kd, a, keep, block_size=B, backend="triton")
        if backward:
            o.backward(o)
    for _ in range(50):
        once()
    n = 500
    t = time.perf_counter()
    for _ in range(n):
        once()
    return (time.perf_counter() - t) / n * 1e6


for path in ("custom_op", "eager_function"):
    for checks, layout in (("sync", False), ("off", False), ("off", True)):
        fb, f = run(path, checks, layout), run(path, checks, layout, backward=False)
        print(f"{path:15s} checks={checks:4s} layout={layout!s:5s} {f:6.1f} us fwd, {fb:6.1f} us fwd+bwd (host)")
