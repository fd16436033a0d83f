"""``decayed_cross_entropy``: lm_head fused with the decayed, masked cross-entropy.

Tiers: ``triton.py`` (kernels + launchers) -> custom ops ``d2kernels::decayed_ce_fwd`` / ``_bwd``
with fake impls and autograd -> ``decayed_cross_entropy``. ``naive.py`` is the reference.
The fast paths never allocate the ``[T, V]`` logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import check_float_tensor, check_int_tensor, check_range, check_same_device, resolve_backend
from .._ops import eager_function, fast_impl, pick, with_backward_op
from ..layout import decay_weights
from .naive import decayed_cross_entropy_naive

__all__ = ["decayed_cross_entropy", "decayed_cross_entropy_naive", "CEOptions"]


@dataclass(frozen=True)
class CEOptions:
    """Scalar options of the fused CE (one object so backward stays short)."""

    softcap: float = 0.0  # 0 = no softcap
    return_correct: bool = False


def _ce_fwd_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    softcap: float,
    return_correct: bool,
    need_dhidden: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``num`` (0-dim f32), ``den`` (0-dim f32), ``lse [T]`` f32, ``correct [T]`` bool (empty if not asked),
    ``dh_unit [T, H]`` = d num / d hidden in hidden's dtype (empty unless ``need_dhidden``)."""
    mod = fast_impl(impl, "cross_entropy")
    opts = CEOptions(softcap, return_correct)
    if need_dhidden and hasattr(mod, "decayed_ce_fwd_with_grad"):
        # a backend that gets d num / d hidden in its forward pass saves the backward's matmuls
        return mod.decayed_ce_fwd_with_grad(hidden, weight, labels, token_weights, opts)
    num, den, lse, correct = mod.decayed_ce_fwd(hidden, weight, labels, token_weights, opts)
    dh_unit = hidden.new_empty((0,))
    if need_dhidden:
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        dh_unit = mod.decayed_ce_bwd(one, hidden, weight, labels, token_weights, lse, opts, True, False)[0]
    return num, den, lse, correct, dh_unit


_ce_fwd = torch.library.custom_op("d2kernels::decayed_ce_fwd", mutates_args=())(_ce_fwd_impl)


@_ce_fwd.register_fake
def _(hidden, weight, labels, token_weights, softcap, return_correct, need_dhidden, impl):
    T = hidden.shape[0]
    f32 = torch.float32
    return (
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((T,), dtype=f32),
        hidden.new_empty((T if return_correct else 0,), dtype=torch.bool),
        torch.empty_like(hidden) if need_dhidden else hidden.new_empty((0,)),
    )


def _ce_bwd_impl(
    grad_num: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    lse: torch.Tensor,
    softcap: float,
    need_dhidden: bool,
    need_dweight: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``dhidden [T, H]`` (hidden's dtype) and ``dweight [V, H]`` (weight's dtype); empty when not needed."""
    return fast_impl(impl, "cross_entropy").decayed_ce_bwd(
        grad_num, hidden, weight, labels, token_weights, lse, CEOptions(softcap), need_dhidden, need_dweight
    )


_ce_bwd = torch.library.custom_op("d2kernels::decayed_ce_bwd", mutates_args=())(_ce_bwd_impl)


@_ce_bwd.register_fake
def _(grad_num, hidden, weight, labels, token_weights, lse, softcap, need_dhidden, need_dweight, impl):
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty((0,))
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty((0,))
    return dh, dw


def _ce_setup(ctx, inputs, output):
    hidden, weight, labels, token_weights, softcap, return_correct, need_dhidden, impl = inputs
    dh_unit = output[4]
    # eager: backward scales the d hidden stash in place and hands it on as the gradient, so backward's
    # peak holds one gradient-sized tensor, not two (T=8192 H=4096: 128 -> 64 MiB). The stash is kept off
    # the saved tensors for that; a second backward (retain_graph) finds it taken and recomputes it.
    # Traced (torch.compile): saved as usual, scaled into a new tensor
    eager = need_dhidden and not torch.compiler.is_compiling()
    ctx.stash = dh_unit.detach() if eager else None
    ctx.save_for_backward(hidden, weight, labels, token_weights, output[2], None if eager else dh_unit)
    ctx.opts = (softcap, need_dhidden, impl)
    # only num has a gradient: no zero-filled [T, H] for the stash output (a third gradient-sized tensor
    # at backward's peak: T=3584 H=4096, 84 -> 56 MiB)
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_num, grad_den, grad_lse, grad_correct, grad_dh_unit):
    hidden, weight, labels, token_weights, lse, dh_unit = ctx.saved_tensors
    softcap, stashed, impl = ctx.opts
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh = dw = None
    if grad_num is None:  # a backward through den (or correct) alone: num does not depend on it
        return None, None, None, None, None, None, None, None
    if need_dh and stashed:  # num is linear in its per-token terms: scale the stash
        if dh_unit is not None:  # traced
            dh = dh_unit * grad_num.float()
        elif ctx.stash is not None:  # eager: in place, and the ctx lets go of it
            dh, ctx.stash = ctx.stash.mul_(grad_num.float()), None
    bwd_dh = need_dh and dh is None  # no stash, or taken by an earlier backward
    if bwd_dh or need_dw:
        dh_, dw_ = ctx.bwd(grad_num.float(), hidden, weight, labels, token_weights, lse, softcap, bwd_dh, need_dw, impl)
        dh = dh_ if bwd_dh else dh
        dw = dw_ if need_dw else None
    return dh, dw, None, None, None, None, None, None


torch.library.register_autograd(
    "d2kernels::decayed_ce_fwd", _ce_backward, setup_context=with_backward_op(_ce_setup, _ce_bwd)
)
_ce_eager = eager_function(_ce_fwd_impl, with_backward_op(_ce_setup, _ce_bwd_impl), _ce_backward)


def decayed_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    eval_mask: torch.Tensor,
    decay_offsets: torch.Tensor,
    *,
    gamma: Optional[float],
    softcap: Optional[float] = None,
    return_correct: bool = False,
    backend: str = "auto",
):
    """Decayed masked cross-entropy fused with the lm_head: ``Σ w·CE(hidden @ W^T, label)`` and ``Σ w``.

    Args:
        hidden: ``[..., H]`` final (normed) hidden states.
        lm_head_weight: ``[V, H]``; gets a gradient only when it requires one.
        labels, eval_mask, decay_offsets: ``[...]`` (the leading shape of hidden).
        gamma: decay ``w = eval * exp(-offset / gamma)``; None or <= 0 = no decay.
        softcap: optional Gemma-style ``c * tanh(logits / c)``.
        return_correct: also return per-token ``correct [...]`` bool (argmax == label, False where
            unsupervised), computed in the same pass.
    Returns:
        ``(num, den)`` or ``(num, den, correct)``; ``num`` is differentiable; the loss is
        ``num / (den + 1e-6)`` (with ``den`` all-reduced under data parallelism). Labels of
        supervised tokens must lie in ``[0, V)``; unsupervised tokens are never read and cost nothing.

    Memory (Triton, 16-bit inputs): when ``hidden`` requires grad, the forward computes ``d num / d hidden``
    into a buffer like ``hidden`` that backward scales in place and returns as the gradient, so backward
    allocates nothing of that size. With that buffer at most 31 MiB the call's peak, buffer included,
    stays within 64 MiB; with a larger one, the chunk buffers beside it stay within 62 MiB. A second
    backward through the same graph (``retain_graph=True``) recomputes the gradient.
    """
    check_float_tensor("hidden", hidden)
    check_float_tensor("lm_head_weight", lm_head_weight, dim=2)
    check_int_tensor("labels", labels)
    check_same_device(hidden=hidden, lm_head_weight=lm_head_weight, labels=labels, eval_mask=eval_mask, decay_offsets=decay_offsets)
    lead = hidden.shape[:-1]
    H = hidden.shape[-1]
    V = lm_head_weight.shape[0]
    if lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must be [V, H={H}], got {tuple(lm_head_weight.shape)}")
    for name, t in (("labels", labels), ("eval_mask", eval_mask), ("decay_offsets", decay_offsets)):
        if t.shape != lead:
            raise ValueError(f"{name} must have hidden's leading shape {tuple(lead)}, got {tuple(t.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    w = decay_weights(eval_mask, decay_offsets, gamma).reshape(-1)
    lab = labels.reshape(-1)
    h2 = hidden.reshape(-1, H)
    impl = resolve_backend(backend, hidden.device)
    if impl != "triton":  # the Triton op checks them in the host sync it needs anyway (one, not two)
        check_range("labels", lab, 0, V, where=w > 0)
    if impl == "torch":
        num, den, correct = decayed_cross_entropy_naive(h2, lm_head_weight, lab, w, softcap)
    else:
        need_dh = torch.is_grad_enabled() and hidden.requires_grad
        num, den, _, correct, _ = pick(_ce_fwd, _ce_eager)(
            h2, lm_head_weight, lab, w, float(softcap or 0.0), bool(return_correct), need_dh, impl
        )
    if return_correct:
        return num, den, correct.reshape(lead)
    return num, den
