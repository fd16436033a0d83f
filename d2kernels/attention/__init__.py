"""``varprefix_attention``: variable-prefix block-sparse attention of DFlash / D2 drafters.

Tiers: ``triton.py`` (kernels + launchers) -> custom ops ``d2kernels::varprefix_attention_fwd``
/ ``_bwd`` with fake impls and autograd -> ``varprefix_attention`` (public, validated).
``naive.py`` is the reference and the ``backend="torch"`` path. ``varprefix_layout`` holds what
depends only on the anchors (their sort), built once per step and passed to every layer's call.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._checks import (
    FLOAT_DTYPES,
    check_block_size,
    check_float_tensor,
    check_int_tensor,
    check_range,
    check_same_device,
    resolve_backend,
)
from .._ops import eager_function, fast_impl, pick, with_backward_op
from .naive import varprefix_attention_naive, varprefix_mask

__all__ = ["VarPrefixLayout", "varprefix_attention", "varprefix_attention_naive", "varprefix_layout", "varprefix_mask"]


class VarPrefixLayout(NamedTuple):
    """The per-step part of the attention that depends only on the anchors: build it once with
    ``varprefix_layout`` and pass it to every layer's ``varprefix_attention(..., layout=)``.

    A NamedTuple of tensors and one int, so ``torch.compile`` takes it as plain graph inputs."""

    anchors: torch.Tensor  # [Bt, N] as given (the torch and cuda backends read these)
    keep: torch.Tensor  # [Bt, N] bool
    sorted_anchors: torch.Tensor  # [Bt, N] int32 ascending, dummy blocks first as -1
    perm: torch.Tensor  # [Bt, N] int32: sorted position -> block
    block_size: int


def _sort_impl(anchors: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return fast_impl("triton", "attention")._sort_blocks(anchors, keep)


_sort_op = torch.library.custom_op("d2kernels::varprefix_sort_blocks", mutates_args=())(_sort_impl)


@_sort_op.register_fake
def _(anchors, keep):
    return anchors.new_empty(anchors.shape, dtype=torch.int32), anchors.new_empty(anchors.shape, dtype=torch.int32)


def _check_anchors(anchors, keep):
    check_int_tensor("anchors", anchors, dim=2)
    if not isinstance(keep, torch.Tensor) or keep.shape != anchors.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor shaped like anchors {tuple(anchors.shape)}")


def _layout(anchors: torch.Tensor, keep: torch.Tensor, B: int, impl: str) -> VarPrefixLayout:
    if impl == "triton" and anchors.device.type == "cuda":
        sanc, perm = pick(_sort_op, _sort_impl)(anchors, keep)
    else:  # the same stable order from torch (CPU, and the torch / cuda backends)
        sanc, perm = torch.sort(torch.where(keep, anchors.long(), -1), dim=1, stable=True)
        sanc, perm = sanc.int(), perm.int()
    return VarPrefixLayout(anchors, keep, sanc, perm, B)


def varprefix_layout(
    anchors: torch.Tensor, keep: torch.Tensor, *, block_size: int, seq_len: int, backend: str = "auto"
) -> VarPrefixLayout:
    """Sort the blocks by anchor once per step (one launch on CUDA) for every layer's call to share.

    ``anchors [Bt, N]`` integer, ``keep [Bt, N]`` bool, ``seq_len`` the context length ``S``. The
    anchors are range-checked here (under ``d2kernels.validation``), so the attention calls that
    take this layout skip that check and its host sync.
    """
    _check_anchors(anchors, keep)
    B = check_block_size(block_size)
    check_same_device(anchors=anchors, keep=keep)
    check_range("anchors", anchors, 0, seq_len, where=keep)
    return _layout(anchors, keep, B, resolve_backend(backend, anchors.device))


def _attn_fwd_impl(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    sanc: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    mod = fast_impl(impl, "attention")
    if impl == "triton":
        return mod.varprefix_attention_fwd(
            q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale, sorted_blocks=(sanc, perm)
        )
    return mod.varprefix_attention_fwd(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale)


_attn_fwd = torch.library.custom_op("d2kernels::varprefix_attention_fwd", mutates_args=())(_attn_fwd_impl)


@_attn_fwd.register_fake
def _(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, sanc, perm, block_size, scale, impl, deterministic):
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
    sanc: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mod = fast_impl(impl, "attention")
    args = (do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, block_size, scale)
    if impl == "triton":
        return mod.varprefix_attention_bwd(*args, sorted_blocks=(sanc, perm), deterministic=deterministic)
    return mod.varprefix_attention_bwd(*args)


_attn_bwd = torch.library.custom_op("d2kernels::varprefix_attention_bwd", mutates_args=())(_attn_bwd_impl)


@_attn_bwd.register_fake
def _(do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, sanc, perm, block_size, scale, impl, deterministic):
    return tuple(torch.empty_like(t) for t in (q, k_ctx, v_ctx, k_draft, v_draft))


def _attn_setup(ctx, inputs, output):
    q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, sanc, perm, *opts = inputs
    o, lse = output
    ctx.save_for_backward(q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, sanc, perm)
    ctx.opts = opts  # block_size, scale, impl, deterministic


def _attn_backward(ctx, do, dlse):
    q, k_ctx, v_ctx, k_draft, v_draft, o, lse, *blocks = ctx.saved_tensors
    grads = ctx.bwd(do.contiguous(), q, k_ctx, v_ctx, k_draft, v_draft, o, lse, *blocks, *ctx.opts)
    return (*grads, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "d2kernels::varprefix_attention_fwd", _attn_backward, setup_context=with_backward_op(_attn_setup, _attn_bwd)
)
_attn_eager = eager_function(_attn_fwd_impl, with_backward_op(_attn_setup, _attn_bwd_impl), _attn_backward)


def _validate(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, checked):
    """Shapes, dtypes, devices (a few attribute reads on the common path: the drafter calls this
    once per layer); the anchors' range unless ``checked`` (a layout's build did it)."""
    ts = (q, k_ctx, v_ctx, k_draft, v_draft)
    dt, dev = q.dtype, q.device
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in ts) or dt not in FLOAT_DTYPES:
        for name, t in zip(("q", "k_ctx", "v_ctx", "k_draft", "v_draft"), ts):
            check_float_tensor(name, t, dim=4)
    if any(t.dtype != dt for t in ts):
        raise TypeError("q, k_ctx, v_ctx, k_draft, v_draft must share one dtype")
    if any(t.device != dev for t in (*ts, anchors, keep)):
        check_same_device(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_draft=k_draft, v_draft=v_draft, anchors=anchors, keep=keep)
    Bt, NB, Hq, D = q.shape
    Btc, S, Hkv, Dc = k_ctx.shape
    if tuple(v_ctx.shape) != (Btc, S, Hkv, Dc):
        raise ValueError(f"v_ctx {tuple(v_ctx.shape)} must match k_ctx {tuple(k_ctx.shape)}")
    if tuple(k_draft.shape) != (Bt, NB, Hkv, D) or tuple(v_draft.shape) != (Bt, NB, Hkv, D):
        raise ValueError(
            f"k_draft/v_draft must be [Bt, N*B, Hkv, D] = {(Bt, NB, Hkv, D)}, "
            f"got {tuple(k_draft.shape)} / {tuple(v_draft.shape)}"
        )
    if Btc != Bt or Dc != D:
        raise ValueError(f"k_ctx must be [Bt={Bt}, S, Hkv, D={D}], got {tuple(k_ctx.shape)}")
    if D < 1 or NB < 1:
        raise ValueError(f"q must have a head dim D >= 1 and N*B >= 1 draft slots, got shape {tuple(q.shape)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv} (GQA)")
    if anchors.dim() != 2 or anchors.shape[0] != Bt or anchors.shape[1] * B != NB:
        raise ValueError(f"anchors must be [Bt={Bt}, N] with N*block_size = {NB}, got {tuple(anchors.shape)} and block_size={B}")
    if S < 1:
        raise ValueError("k_ctx must have at least one context position")
    if not checked:
        check_range("anchors", anchors, 0, S, where=keep)


def varprefix_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    anchors: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    *,
    block_size: Optional[int] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    layout: Optional[VarPrefixLayout] = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Variable-prefix block-sparse attention (DFlash / D2 drafters).

    Args:
        q: ``[Bt, N*B, Hq, D]`` queries of the draft slots (block ``n`` = slots ``n*B .. n*B+B-1``).
        k_ctx, v_ctx: ``[Bt, S, Hkv, D]`` keys/values of the context (target features).
        k_draft, v_draft: ``[Bt, N*B, Hkv, D]`` keys/values of the draft slots.
        anchors: ``[Bt, N]`` integer anchor positions (need not be sorted); ``keep [Bt, N]`` bool.
            Both may be left out when ``layout`` is given.
        block_size: ``B`` (default: the layout's). scale: softmax scale, default ``D**-0.5``.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"``, ``"cuda"``.
        layout: ``varprefix_layout(anchors, keep, block_size=B, seq_len=S)``, built once per step
            and shared by every layer (without it each call sorts the anchors itself and
            range-checks them).
        deterministic: the triton backward. True (default: the faster one on an H200, and
            bitwise repeatable): dq by its own kernel per query tile, 7 matmuls per tile pair.
            False: FlashAttention-2's 5 matmuls, dq added atomically in fp32 by the dk/dv kernel
            (run-to-run differences at fp32 rounding level); its atomics cost more than the two
            matmuls it saves here (benchmarks/RESULTS_attention.md).

    A query of block ``n`` sees context keys ``j < anchor_n`` and all ``B`` slots of block ``n``::

        B=2, anchors=[2, 1]   ctx 0 1 2 3 | draft 0 1 2 3
                     slot 0       1 1 0 0 |       1 1 0 0
                     slot 2       1 0 0 0 |       0 0 1 1

    Dummy blocks (``keep=False``) output 0 and receive/give no gradient. GQA: ``Hq % Hkv == 0``,
    query head ``h`` uses kv head ``h // (Hq // Hkv)``. Returns ``o [Bt, N*B, Hq, D]`` in q's dtype.
    """
    if layout is not None:
        anchors = layout.anchors if anchors is None else anchors
        keep = layout.keep if keep is None else keep
        block_size = layout.block_size if block_size is None else block_size
        if block_size != layout.block_size:
            raise ValueError(f"block_size={block_size} differs from the layout's {layout.block_size}")
    elif anchors is None or keep is None or block_size is None:
        raise TypeError("varprefix_attention needs anchors, keep and block_size, or a layout")
    else:
        _check_anchors(anchors, keep)
    B = check_block_size(block_size)
    _validate(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, checked=layout is not None)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    impl = resolve_backend(backend, q.device)
    if impl == "torch":
        return varprefix_attention_naive(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, B, scale)
    if layout is None:
        layout = _layout(anchors, keep, B, impl)
    o, _ = pick(_attn_fwd, _attn_eager)(
        q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, layout.sorted_anchors, layout.perm,
        B, scale, impl, bool(deterministic),
    )
    return o
