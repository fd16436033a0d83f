"""``varprefix_attention``: variable-prefix block-sparse attention of DFlash / D2 drafters.

Tiers: ``triton.py`` (kernels + launchers) -> custom ops ``d2kernels::varprefix_attention_fwd``
/ ``_bwd`` with fake impls and autograd -> ``varprefix_attention`` (public, validated).
``naive.py`` is the reference and the ``backend="torch"`` path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import (
    check_block_size,
    check_float_tensor,
    check_int_tensor,
    check_range,
    check_same_device,
    resolve_backend,
)
from .._ops import eager_function, fast_impl, pick, with_backward_op
from .naive import varprefix_attention_naive, varprefix_mask

__all__ = ["varprefix_attention", "varprefix_attention_naive", "varprefix_mask"]


def _attn_fwd_impl(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fast_impl(impl, "attention").varprefix_attention_fwd(
        q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale
    )


_attn_fwd = torch.library.custom_op("d2kernels::varprefix_attention_fwd", mutates_args=())(_attn_fwd_impl)


@_attn_fwd.register_fake
def _(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale, impl):
    Bt, NB, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((Bt, Hq, NB), dtype=torch.float32)


def _attn_bwd_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return fast_impl(impl, "attention").varprefix_attention_bwd(
        do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, block_size, scale
    )


_attn_bwd = torch.library.custom_op("d2kernels::varprefix_attention_bwd", mutates_args=())(_attn_bwd_impl)


@_attn_bwd.register_fake
def _(do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, block_size, scale, impl):
    return tuple(torch.empty_like(t) for t in (q, k_ctx, v_ctx, k_draft, v_draft))


def _attn_setup(ctx, inputs, output):
    q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale, impl = inputs
    o, lse = output
    ctx.save_for_backward(q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep)
    ctx.opts = (block_size, scale, impl)


def _attn_backward(ctx, do, dlse):
    q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep = ctx.saved_tensors
    block_size, scale, impl = ctx.opts
    grads = ctx.bwd(do.contiguous(), q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, block_size, scale, impl)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd(
    "d2kernels::varprefix_attention_fwd", _attn_backward, setup_context=with_backward_op(_attn_setup, _attn_bwd)
)
_attn_eager = eager_function(_attn_fwd_impl, with_backward_op(_attn_setup, _attn_bwd_impl), _attn_backward)


def _validate(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size):
    for name, t in (("q", q), ("k_ctx", k_ctx), ("v_ctx", v_ctx), ("k_draft", k_draft), ("v_draft", v_draft)):
        check_float_tensor(name, t, dim=4)
    check_int_tensor("anchors", anchors, dim=2)
    check_same_device(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_draft=k_draft, v_draft=v_draft, anchors=anchors, keep=keep)
    B = check_block_size(block_size)
    Bt, NB, Hq, D = q.shape
    _, S, Hkv, _ = k_ctx.shape
    if len({q.dtype, k_ctx.dtype, v_ctx.dtype, k_draft.dtype, v_draft.dtype}) != 1:
        raise TypeError("q, k_ctx, v_ctx, k_draft, v_draft must share one dtype")
    if v_ctx.shape != k_ctx.shape:
        raise ValueError(f"v_ctx {tuple(v_ctx.shape)} must match k_ctx {tuple(k_ctx.shape)}")
    if k_draft.shape != (Bt, NB, Hkv, D) or v_draft.shape != k_draft.shape:
        raise ValueError(
            f"k_draft/v_draft must be [Bt, N*B, Hkv, D] = {(Bt, NB, Hkv, D)}, "
            f"got {tuple(k_draft.shape)} / {tuple(v_draft.shape)}"
        )
    if k_ctx.shape[0] != Bt or k_ctx.shape[3] != D:
        raise ValueError(f"k_ctx must be [Bt={Bt}, S, Hkv, D={D}], got {tuple(k_ctx.shape)}")
    if D < 1 or NB < 1:
        raise ValueError(f"q must have a head dim D >= 1 and N*B >= 1 draft slots, got shape {tuple(q.shape)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv} (GQA)")
    if anchors.shape[0] != Bt or anchors.shape[1] * B != NB:
        raise ValueError(f"anchors must be [Bt={Bt}, N] with N*block_size = {NB}, got {tuple(anchors.shape)} and block_size={B}")
    if keep.shape != anchors.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor shaped like anchors {tuple(anchors.shape)}")
    if S < 1:
        raise ValueError("k_ctx must have at least one context position")
    check_range("anchors", anchors, 0, S, where=keep)
    return B


def varprefix_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    *,
    block_size: int,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Variable-prefix block-sparse attention (DFlash / D2 drafters).

    Args:
        q: ``[Bt, N*B, Hq, D]`` queries of the draft slots (block ``n`` = slots ``n*B .. n*B+B-1``).
        k_ctx, v_ctx: ``[Bt, S, Hkv, D]`` keys/values of the context (target features).
        k_draft, v_draft: ``[Bt, N*B, Hkv, D]`` keys/values of the draft slots.
        anchors: ``[Bt, N]`` integer anchor positions (need not be sorted); ``keep [Bt, N]`` bool.
        block_size: ``B``. scale: softmax scale, default ``D**-0.5``.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"``, ``"cuda"``.

    A query of block ``n`` sees context keys ``j < anchor_n`` and all ``B`` slots of block ``n``::

        B=2, anchors=[2, 1]   ctx 0 1 2 3 | draft 0 1 2 3
                     slot 0       1 1 0 0 |       1 1 0 0
                     slot 2       1 0 0 0 |       0 0 1 1

    Dummy blocks (``keep=False``) output 0 and receive/give no gradient. GQA: ``Hq % Hkv == 0``,
    query head ``h`` uses kv head ``h // (Hq // Hkv)``. Returns ``o [Bt, N*B, Hq, D]`` in q's dtype.
    """
    B = _validate(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    impl = resolve_backend(backend, q.device)
    if impl == "torch":
        return varprefix_attention_naive(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, scale)
    o, _ = pick(_attn_fwd, _attn_eager)(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, scale, impl)
    return o
