"""Triton kernels and host launchers of ``noise_embedding``.

Forward: a gather of embedding rows whose ids are derived on the fly from
``input_ids / anchors / keep / prefix_lens`` (no id tensor), ``[BLOCK_R, BLOCK_H]`` tiles.
Backward (deterministic, no float atomics): slot ids -> stable sort -> per-id row sums in fp32,
in a fixed order. Ids with many slots (the mask id) are summed in two passes over fixed chunks
of the sorted order so no program walks thousands of rows alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["noise_embedding_fwd", "noise_embedding_bwd"]


@triton.jit
def _slot_token(
    ids_ptr, anchors_ptr, keep_ptr, plen_ptr,
    rows, m_rows, NB, S, B, mask_token_id,
    stride_ib, stride_is, stride_ab, stride_an, stride_kb, stride_kn, stride_pb, stride_pn,
):
    """Input token (int64) of flat draft slots ``rows [BLOCK_R]`` (row = b * N*B + n*B + k)."""
    b = rows // NB
    slot = rows % NB
    n = slot // B
    k = slot % B
    anchor = tl.load(anchors_ptr + b * stride_ab + n * stride_an, mask=m_rows, other=0).to(tl.int64)
    keep = tl.load(keep_ptr + b * stride_kb + n * stride_kn, mask=m_rows, other=0) != 0
    p = tl.load(plen_ptr + b * stride_pb + n * stride_pn, mask=m_rows, other=0).to(tl.int64)
    pos = anchor + k
    vis = m_rows & keep & (k < p) & (pos >= 0) & (pos < S)
    tok = tl.load(ids_ptr + b * stride_ib + pos * stride_is, mask=vis, other=0).to(tl.int64)
    return tl.where(vis, tok, mask_token_id)


@triton.jit
def noise_embedding_fwd_kernel(
    w_ptr, out_ptr, ids_ptr, anchors_ptr, keep_ptr, plen_ptr,
    R, H, NB, S, B, mask_token_id,
    stride_wv, stride_wh,
    stride_ib, stride_is, stride_ab, stride_an, stride_kb, stride_kn, stride_pb, stride_pn,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``out [R, H]`` (R = Bt*N*B, contiguous) = ``w [V, H]`` rows of each slot's token."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    o_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    m_r = o_r < R
    m_h = o_h < H
    tok = _slot_token(
        ids_ptr, anchors_ptr, keep_ptr, plen_ptr, o_r, m_r, NB, S, B, mask_token_id,
        stride_ib, stride_is, stride_ab, stride_an, stride_kb, stride_kn, stride_pb, stride_pn,
    )
    m = m_r[:, None] & m_h[None, :]  # [BLOCK_R, BLOCK_H]
    x = tl.load(w_ptr + tok[:, None] * stride_wv + o_h[None, :] * stride_wh, mask=m)
    tl.store(out_ptr + o_r[:, None] * H + o_h[None, :], x, mask=m)


@triton.jit
def noise_embedding_ids_kernel(
    tok_ptr, ids_ptr, anchors_ptr, keep_ptr, plen_ptr,
    R, NB, S, B, mask_token_id,
    stride_ib, stride_is, stride_ab, stride_an, stride_kb, stride_kn, stride_pb, stride_pn,
    BLOCK_R: tl.constexpr,
):
    """``tok [R]`` int32: the input token of every flat draft slot (backward only)."""
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    tok = _slot_token(
        ids_ptr, anchors_ptr, keep_ptr, plen_ptr, o_r, m_r, NB, S, B, mask_token_id,
        stride_ib, stride_is, stride_ab, stride_an, stride_kb, stride_kn, stride_pb, stride_pn,
    )
    tl.store(tok_ptr + o_r, tok.to(tl.int32), mask=m_r)


@triton.jit
def noise_embedding_bwd_chunk_kernel(
    g_ptr, part_ptr, tok_ptr, perm_ptr, seg_lo_ptr, seg_hi_ptr,
    R, H,
    CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 1 for long segments: sorted rows ``[j*CHUNK, (j+1)*CHUNK)`` of chunk ``j``.

    A segment longer than CHUNK meets a chunk only as its head (it holds the chunk's first row)
    or its tail (it holds the last row), so two fp32 partials per chunk suffice:
    ``part [n_chunks, 2, H]`` = sums of the rows whose id is the head's / the tail's.
    """
    j = tl.program_id(0)
    pid_h = tl.program_id(1)
    o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    m_h = o_h < H
    first = j * CHUNK
    last = tl.minimum(first + CHUNK, R) - 1
    o_s = first + tl.arange(0, CHUNK)  # [CHUNK] positions in sorted order
    m_s = o_s <= last
    tok = tl.load(tok_ptr + o_s, mask=m_s, other=-1)
    head_long = (tl.load(seg_hi_ptr + first) - tl.load(seg_lo_ptr + first)) > CHUNK
    tail_long = (tl.load(seg_hi_ptr + last) - tl.load(seg_lo_ptr + last)) > CHUNK
    # Ids are >= 0, so key -2 selects nothing: short segments are summed in pass 2 instead.
    head = tl.where(head_long, tl.load(tok_ptr + first), -2)
    tail = tl.where(tail_long, tl.load(tok_ptr + last), -2)
    sel_head = m_s & (tok == head)  # [CHUNK]
    sel_tail = m_s & (tok == tail)
    row = tl.load(perm_ptr + o_s, mask=m_s, other=0)  # [CHUNK] grad_out row of each position
    m_g = (sel_head | sel_tail)[:, None] & m_h[None, :]
    g = tl.load(g_ptr + row[:, None] * H + o_h[None, :], mask=m_g, other=0.0).to(tl.float32)  # [CHUNK, BLOCK_H]
    s_head = tl.sum(tl.where(sel_head[:, None], g, 0.0), axis=0)  # [BLOCK_H]
    s_tail = tl.sum(tl.where(sel_tail[:, None], g, 0.0), axis=0)
    p_part = part_ptr + j.to(tl.int64) * 2 * H + o_h
    tl.store(p_part, s_head, mask=m_h)
    tl.store(p_part + H, s_tail, mask=m_h)


@triton.jit
def noise_embedding_bwd_segment_kernel(
    g_ptr, dw_ptr, part_ptr, tok_ptr, perm_ptr, seg_lo_ptr, seg_hi_ptr,
    H,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 2: program ``i`` owns the segment (id) starting at sorted position ``i``, if any.

    Short segments (<= CHUNK rows) sum their grad_out rows directly; long ones sum the chunk
    partials of pass 1 in chunk order. Writes ``dw [V, H]`` row ``id`` once.
    """
    i = tl.program_id(0)
    pid_h = tl.program_id(1)
    lo = tl.load(seg_lo_ptr + i)
    if lo == i:
        hi = tl.load(seg_hi_ptr + i)
        v = tl.load(tok_ptr + i).to(tl.int64)
        o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        m_h = o_h < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        if hi - lo <= CHUNK:
            for start in range(lo, hi, BLOCK_R):
                o_s = start + tl.arange(0, BLOCK_R)  # [BLOCK_R]
                m_s = o_s < hi
                row = tl.load(perm_ptr + o_s, mask=m_s, other=0)
                m = m_s[:, None] & m_h[None, :]
                g = tl.load(g_ptr + row[:, None] * H + o_h[None, :], mask=m, other=0.0)  # [BLOCK_R, BLOCK_H]
                acc += tl.sum(g.to(tl.float32), axis=0)
        else:
            for c in range(lo // CHUNK, (hi - 1) // CHUNK + 1):
                # The segment holds chunk c's first row iff it is the head partial.
                is_head = tl.load(tok_ptr + c * CHUNK).to(tl.int64) == v
                slot = tl.where(is_head, 0, 1)
                acc += tl.load(part_ptr + (c * 2 + slot) * H + o_h, mask=m_h, other=0.0)
        tl.store(dw_ptr + v * H + o_h, acc.to(dw_ptr.dtype.element_ty), mask=m_h)


def _fwd_config(H: int, R: int, itemsize: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)`` of the forward gather (tests monkeypatch this).

    H200, bf16, N=512 (benchmarks/RESULTS_embedding.md): 2 rows x 2048 columns x 8 warps was the
    fastest or tied in two sweeps (0.015 vs 0.024 ms for 8 x 512 x 4 at B=7, H=2560 in one run;
    all tiles within noise in the other).
    """
    block_h = min(triton.next_power_of_2(H), max(16, 4096 // itemsize))  # <= 4 KiB of a row
    block_r = max(1, 8192 // (block_h * itemsize))  # ~8 KiB per program
    return min(block_r, 16), block_h, 8 if block_h * itemsize >= 2048 else 4


def _bwd_config(R: int, H: int) -> tuple[int, int, int, int]:
    """``(CHUNK, BLOCK_R, BLOCK_H, num_warps)`` of the backward (tests monkeypatch this)."""
    # CHUNK ~ sqrt(R) balances pass-1 tile size against the chunks a long segment walks in pass 2.
    chunk = min(256, max(16, triton.next_power_of_2(int(R ** 0.5))))
    block_h = min(triton.next_power_of_2(H), max(16, 8192 // chunk))
    return chunk, 8, block_h, 4


def _workspace(shape, device) -> torch.Tensor:
    """fp32 scratch of the backward's chunk partials (tests poison it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _slots(input_ids, anchors, keep, block_size):
    """-> ``S``, ``NB = N*B`` slots per sample, ``R = Bt*NB`` rows, ``keep`` as uint8 (what the kernels read)."""
    Bt, N = anchors.shape
    NB = N * block_size
    return input_ids.shape[1], NB, Bt * NB, keep.view(torch.uint8)


def _index_args(input_ids, anchors, keep, prefix_lens):
    return (
        input_ids.stride(0), input_ids.stride(1), anchors.stride(0), anchors.stride(1),
        keep.stride(0), keep.stride(1), prefix_lens.stride(0), prefix_lens.stride(1),
    )


def noise_embedding_fwd(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``weight [V, H]`` -> ``out [Bt, N*B, H]`` (weight's dtype), ids read from the index tensors.

    ``out`` (contiguous, optional) lets tests hand in a NaN-poisoned buffer.
    """
    S, NB, R, keep_u8 = _slots(input_ids, anchors, keep, block_size)
    H = weight.shape[1]
    if out is None:
        out = torch.empty((anchors.shape[0], NB, H), dtype=weight.dtype, device=weight.device)
    if R == 0 or H == 0:
        return out
    block_r, block_h, num_warps = _fwd_config(H, R, weight.element_size())
    grid = (triton.cdiv(R, block_r), triton.cdiv(H, block_h))
    noise_embedding_fwd_kernel[grid](
        weight, out, input_ids, anchors, keep_u8, prefix_lens,
        R, H, NB, S, block_size, mask_token_id,
        weight.stride(0), weight.stride(1),
        *_index_args(input_ids, anchors, keep_u8, prefix_lens),
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return out


def noise_embedding_bwd(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    num_embeddings: int,
) -> torch.Tensor:
    """``grad_out [Bt, N*B, H]`` (contiguous) -> ``dweight [V, H]`` (grad_out's dtype), deterministic."""
    S, NB, R, keep_u8 = _slots(input_ids, anchors, keep, block_size)
    H = grad_out.shape[-1]
    dev = grad_out.device
    dw = torch.zeros((num_embeddings, H), dtype=grad_out.dtype, device=dev)
    if R == 0 or H == 0:
        return dw
    g = grad_out.contiguous()
    tok = torch.empty(R, dtype=torch.int32, device=dev)
    noise_embedding_ids_kernel[(triton.cdiv(R, 1024),)](
        tok, input_ids, anchors, keep_u8, prefix_lens,
        R, NB, S, block_size, mask_token_id,
        *_index_args(input_ids, anchors, keep_u8, prefix_lens),
        BLOCK_R=1024,
    )
    # A stable sort fixes the summation order, so the result is bitwise reproducible.
    tok_sorted, perm = torch.sort(tok, stable=True)
    seg_lo = torch.searchsorted(tok_sorted, tok_sorted, right=False)  # [R] first position of the row's id
    seg_hi = torch.searchsorted(tok_sorted, tok_sorted, right=True)  # [R] one past its last position
    chunk, block_r, block_h, num_warps = _bwd_config(R, H)
    n_chunks = triton.cdiv(R, chunk)
    part = _workspace((n_chunks, 2, H), dev)
    n_h = triton.cdiv(H, block_h)
    noise_embedding_bwd_chunk_kernel[(n_chunks, n_h)](
        g, part, tok_sorted, perm, seg_lo, seg_hi, R, H,
        CHUNK=chunk, BLOCK_H=block_h, num_warps=num_warps,
    )
    noise_embedding_bwd_segment_kernel[(R, n_h)](
        g, dw, part, tok_sorted, perm, seg_lo, seg_hi, H,
        CHUNK=chunk, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return dw
