"""Host cost of the varprefix_attention op layer with the launchers stubbed out (runs on CPU).

    PYTHONPATH=. python scripts/op_overhead.py

Compares the registered custom op with the eager autograd.Function path, range checks on/off.
"""
import time
import types

import torch

import d2kernels
from d2kernels import attention as A, _ops
# stub launchers: host cost only (what the op layer adds around the kernels)
stub = types.SimpleNamespace(
    varprefix_attention_fwd=lambda q, kc, vc, kd, vd, a, k, B, s: (torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)),
    varprefix_attention_bwd=lambda do, q, kc, vc, kd, vd, o, lse, a, k, B, s: tuple(torch.empty_like(t) for t in (q, kc, vc, kd, vd)),
)
_ops.fast_impl = lambda impl, op: stub
A.fast_impl = lambda impl, op: stub
Bt, S, N, B, Hq, Hkv, D = 1, 64, 8, 7, 4, 2, 16
q = torch.randn(Bt, N*B, Hq, D, requires_grad=True)
kc = torch.randn(Bt, S, Hkv, D, requires_grad=True); kd = torch.randn(Bt, N*B, Hkv, D, requires_grad=True)
a, keep = d2kernels.sample_anchors(torch.ones(Bt, S, dtype=torch.bool), N)
def run(path, checks):
    d2kernels.set_validation(checks)
    A.pick = (lambda c, e: c) if path == "custom_op" else (lambda c, e: e)
    def once():
        o = A.varprefix_attention(q, kc, kc, kd, kd, a, keep, block_size=B, backend="triton")
        o.sum().backward()
    for _ in range(50): once()
    t = time.perf_counter(); n = 500
    for _ in range(n): once()
    return (time.perf_counter() - t) / n * 1e6
for path in ("custom_op", "eager_function"):
    for checks in ("sync", "off"):
        print(f"{path:15s} checks={checks:4s} {run(path, checks):7.1f} us per fwd+bwd (host)")
