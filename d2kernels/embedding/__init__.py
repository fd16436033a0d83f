"""``noise_embedding``: the draft slots' input embeddings, built without an id tensor.

Tiers: ``triton.py`` (kernels + launchers) -> custom ops ``d2kernels::noise_embedding_fwd`` /
``_bwd`` with fake impls and autograd -> ``noise_embedding``. ``naive.py`` is the reference.
"""
from __future__ import annotations

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
from .naive import noise_embedding_naive

__all__ = ["noise_embedding", "noise_embedding_naive"]


def _emb_fwd_impl(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    impl: str,
) -> torch.Tensor:
    return fast_impl(impl, "embedding").noise_embedding_fwd(
        weight, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id
    )


_emb_fwd = torch.library.custom_op("d2kernels::noise_embedding_fwd", mutates_args=())(_emb_fwd_impl)


@_emb_fwd.register_fake
def _(weight, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, impl):
    Bt, N = anchors.shape
    return weight.new_empty((Bt, N * block_size, weight.shape[1]))


def _emb_bwd_impl(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    num_embeddings: int,
    impl: str,
) -> torch.Tensor:
    return fast_impl(impl, "embedding").noise_embedding_bwd(
        grad_out, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, num_embeddings
    )


_emb_bwd = torch.library.custom_op("d2kernels::noise_embedding_bwd", mutates_args=())(_emb_bwd_impl)


@_emb_bwd.register_fake
def _(grad_out, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, num_embeddings, impl):
    return grad_out.new_empty((num_embeddings, grad_out.shape[-1]))


def _emb_setup(ctx, inputs, output):
    weight, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, impl = inputs
    ctx.save_for_backward(input_ids, anchors, keep, prefix_lens)
    ctx.opts = (block_size, mask_token_id, weight.shape[0], impl)


def _emb_backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    input_ids, anchors, keep, prefix_lens = ctx.saved_tensors
    block_size, mask_token_id, V, impl = ctx.opts
    dw = ctx.bwd(grad_out.contiguous(), input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, V, impl)
    return (dw,) + (None,) * 7


torch.library.register_autograd(
    "d2kernels::noise_embedding_fwd", _emb_backward, setup_context=with_backward_op(_emb_setup, _emb_bwd)
)
_emb_eager = eager_function(_emb_fwd_impl, with_backward_op(_emb_setup, _emb_bwd_impl), _emb_backward)


def noise_embedding(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Input embeddings of the draft slots: ``weight[draft_token_ids(...)]`` without the id tensor.

    Args:
        weight: ``[V, H]`` token embedding table (usually frozen).
        input_ids: ``[Bt, S]``; anchors, keep, prefix_lens: ``[Bt, N]``.
        block_size: ``B``; mask_token_id: id of ``[MASK]`` in ``[0, V)``.
    Slot ``k`` of block ``n`` embeds ``input_ids[anchor_n + k]`` if ``k < p_n`` and ``keep_n`` and
    ``anchor_n + k < S``, else ``mask_token_id``. Returns ``[Bt, N*B, H]`` in weight's dtype; the
    weight gets a gradient only when it requires one.
    """
    check_float_tensor("weight", weight, dim=2)
    check_int_tensor("input_ids", input_ids, dim=2)
    check_int_tensor("anchors", anchors, dim=2)
    check_int_tensor("prefix_lens", prefix_lens, dim=2)
    check_same_device(weight=weight, input_ids=input_ids, anchors=anchors, keep=keep, prefix_lens=prefix_lens)
    B = check_block_size(block_size)
    V = weight.shape[0]
    if keep.dtype != torch.bool or keep.shape != anchors.shape or prefix_lens.shape != anchors.shape:
        raise ValueError("keep (bool) and prefix_lens must be shaped like anchors [Bt, N]")
    if anchors.shape[0] != input_ids.shape[0]:
        raise ValueError(f"batch mismatch: input_ids {tuple(input_ids.shape)}, anchors {tuple(anchors.shape)}")
    if input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one position, got shape {tuple(input_ids.shape)}")
    if not 0 <= int(mask_token_id) < V:
        raise ValueError(f"mask_token_id={mask_token_id} out of range [0, {V})")
    check_range("input_ids", input_ids, 0, V)
    check_range("anchors", anchors, 0, input_ids.shape[1], where=keep)
    impl = resolve_backend(backend, weight.device)
    if impl == "torch":
        return noise_embedding_naive(weight, input_ids, anchors, keep, prefix_lens, B, int(mask_token_id))
    return pick(_emb_fwd, _emb_eager)(weight, input_ids, anchors, keep, prefix_lens, B, int(mask_token_id), impl)
