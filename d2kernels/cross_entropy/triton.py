"""Triton kernels and host launchers of ``decayed_cross_entropy`` (fused lm_head + decayed CE).

Only supervised tokens (weight > 0) are visited: they are compacted first (one host sync for
their count ``Tc``, which sizes the grids; their labels are range-checked in the same sync). The split
schedule queues its first chunk before that sync, on the plan of the count the shape's last call had,
so the GPU is not idle while the host waits and plans; the count keeps that chunk or redoes it.
Shapes: ``hidden [T, H]``, ``weight [V, H]``.

Frozen lm_head (the drafter case) costs two matmuls over the supervised tokens, both in the
forward, and the ``[T, V]`` logits never exist. Two schedules (``CEConfig.schedule``):

split (the default for 16-bit ``hidden`` and ``weight`` of one dtype). For each T-block of
supervised rows (gathered, or plain slices when every token is supervised) and vocabulary chunk:
  ``S = h @ W[chunk]^T``  cuBLAS, in the inputs' dtype (the rounding of a plain torch lm_head);
  ``_ce_rows_kernel``     one pass over ``S``: running max / sum / label logit per row, and ``S``
                          becomes ``P = exp(z - r) * softcap'(z)`` in place. The row reference ``r``
                          moves only when a tile's max exceeds it by more than TAU; then the row's
                          sum, P tiles already written and ``acc`` row are rescaled right there;
  ``acc += P @ W[chunk]`` cuBLAS with f32 output (``out_dtype``), or (``CEConfig.mm2 = "streamk"``)
                          ``_mm2_streamk_kernel``: a deterministic stream-K Triton matmul, every SM
                          the same share of the K steps (the output is only ``[Tb, H]``).
Then ``_ce_finalize_kernel`` as below. The matmuls run at cuBLAS's rate; the price is one write
and one read of each logits chunk, which the budget keeps small.

fused (fp32 and mixed inputs; ``schedule="fused"`` otherwise): both matmuls in Triton tiles.
For each T-block ``[Tb]`` of supervised rows and each vocabulary chunk ``k`` (``Vc`` columns):

  A(k): ``z = h @ W[chunk]^T`` tile by tile; per (row, tile) max ``m`` and ``s = Σ exp(z - m)``;
        ``P = exp(z - R) * softcap'(z)`` into the chunk buffer, ``R`` = the running row max after
        chunk ``k - 1`` (a lazy shift constant: no normalisation needed yet; a tile whose max
        exceeds ``R + TAU`` uses its own max instead and B rescales those rows).
  B(k): ``acc = acc * exp(M_old - M_new) + (P @ W[chunk]) * exp(R - M_new)`` with the running
        row max ``M`` and sum ``S`` updated from the tile stats (online log-sum-exp in fp32).
  finalize: ``lse = M + log S``; ``dh_unit = w * (acc / S - softcap'(z_label) * W[label])``.

One launch runs a whole T-block, one program per tile: a program claims the next tile from an
atomic counter when it starts, in the order A(0), B(0), A(1), B(1), A(2), ..., and waits, per
128-row tile, only for what it reads: B(k) rows ``m`` for A(k) and B(k-1) of rows ``m``; A(k) rows
``m`` for B(k-1) of rows ``m`` (it overwrites the P rows and stats B(k-1) read). Every dependency
is an earlier claim, held by a program that has started, so the waits always end; a wait that
spins too long sets an error flag and the loss comes out NaN instead of a hang. No launch
boundary, no tail wave per chunk. ``dhidden = grad_num * dh_unit`` is then one elementwise op in backward.
Extra memory: ``acc [Tb, H]`` f32 + ``P [Tb, Vc]`` (sized to a budget) + the ``[T, H]`` stash.
A trainable lm_head adds a backward pass: recompute a logits chunk with the final ``lse``, write
``dlogits [Tc, Vc]`` and ``dW[chunk] = dlogits^T @ h`` (cuBLAS). Under the split schedule the
logits chunks come from cuBLAS, whose rounding depends on the call's shape, so that pass first
recomputes ``lse`` from the very calls it then repeats. No float atomics: deterministic.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import raise_range_error, validation_mode

__all__ = ["decayed_ce_fwd", "decayed_ce_fwd_with_grad", "decayed_ce_bwd", "CEConfig"]

_MiB = 1 << 20


@dataclass
class CEConfig:
    """Tile sizes and memory budget; ``_config`` picks one per device (tests monkeypatch it)."""

    block_m: int = 128  # supervised rows per tile (A, B and dlogits)
    block_n: int = 256  # vocabulary columns per A tile (one stats column)
    block_k: int = 64  # reduction step of both matmuls (divides block_n)
    block_h: int = 256  # hidden columns per B tile
    num_warps: int = 8
    num_stages: int = 4  # H200 sweeps: n256/h256/s4 beat h128, n128 and s3 (benchmarks/RESULTS_cross_entropy.md)
    # fused: acc [Tb, H] f32 + P [Tb, Vc]; split: acc + gathered h [Tb, H] + S [Tb, Vc]. The split
    # schedule with a d hidden stash sizes its chunks by ``peak_cap`` instead (``_stash_budget``; at
    # least this budget when the stash leaves no room under the cap)
    budget: int = 45 * _MiB
    stats_cols: int = 64  # stats columns per chunk when no P is written (forward only)
    finalize_m: int = 32
    finalize_h: int = 256
    # "split" (16-bit inputs of one dtype; fp32 and mixed inputs always run "fused"): per T-block and
    # vocabulary chunk cuBLAS writes the logits chunk, one Triton row pass folds it into the running
    # stats and turns it into P in place, cuBLAS accumulates P @ W. "fused": both matmuls in the
    # Triton tile kernel. H200, T=3584 H=2560 V=151936: split 9.7 / 5.1 ms, fused 11.8 / 6.3 ms
    # (100% / 50% supervised; benchmarks/RESULTS_cross_entropy.md)
    schedule: str = "split"
    rows_m: int = 1  # rows per program of the split schedule's row pass
    rows_block: int = 2048  # columns per step of the row pass (0: the whole chunk row in one step)
    rows_warps: int = 4
    rows_prefetch: bool = True  # the next column tile's load in flight during this one's math
    rows_reverse: bool = False  # row pass from the last row up (the logits the matmul wrote last may sit in L2)
    # split with a d hidden stash ([T, H], the returned gradient): the chunk budget is what keeps the
    # call's peak within ``peak_cap`` (stash + chunks), when that leaves at least ``budget_min``;
    # otherwise (a stash too large for the cap) the chunk buffers may grow to ``budget_per_stash`` x the
    # stash's bytes (fewer T-blocks, so W is streamed fewer times), but to no more than ``peak_cap`` - 2 MiB:
    # beyond the returned gradient the call stays within the cap. At T=8192 H=2560 the cap on the total
    # (23 MiB of chunks) loses to torch.compile (0.93x); 60 MiB there wins (1.04-1.13x). peak_cap 0: always
    # the growth rule, uncapped (96 MiB at T=8192 H=4096)
    peak_cap: int = 64 * _MiB
    budget_min: int = 32 * _MiB
    budget_per_stash: float = 1.5
    # split, with a d hidden stash: T-blocks as tall as the budget allows (at most ``max_rows``) with
    # chunks whose W slice holds ``w_chunk_bytes`` (``Vc x H`` elements), the last block shorter and its
    # chunks wider (``_block_cols``); a last block under a quarter of that height, or ``rows_tail=False``:
    # blocks of equal height instead. H200, 100%, alternating rounds against torch.compile: T=3584 H=2560
    # (45 MiB) 1536+1536+512 rows beat 3 x 1280 (the old equal-height rule) in 5 of 5 rounds, 9.71 vs 10.11
    # ms (compile 10.18); T=3584 H=4096 (35 MiB) 1280+1280+1024 14.49 ms, 4 x 896 14.99 (compile 14.65)
    w_chunk_bytes: int = 48 * _MiB
    max_rows: int = 2048
    rows_tail: bool = True
    # a stash of at least ``peak_cap`` (T=8192 H=4096): T-blocks of at most ``big_stash_rows`` and chunks as
    # wide as the budget allows in steps whose first matmul fills whole waves of 128 x 256 output tiles on
    # ``sms`` SMs. H200, T=8192 H=4096 V=262144 / 151936, 100%, alternating rounds against torch.compile:
    # 1024 x 16896 (50 MiB) 1.018x / 1.062x, 1024 x 23552 1.009x / 1.043x, 2048 x 7680 (the rule above at
    # 63 MiB) 0.995x / 1.026x, 2048 x 16384 (96 MiB) 1.010x / 1.048x. At H=2560 short blocks lose (the
    # second matmul's [Tb, H] output fills 80 of 132 SMs): 1024 x 16896 0.996x / 1.029x, 2048 x 10240 1.059x / 1.127x
    big_stash_rows: int = 1024
    sms: int = 132  # the device's (``_config`` reads it)
    rows_share: float = 0.35  # split without a stash: at most this share of the budget for the gathered rows
    split_rows: int = 0  # split: force T-blocks of this many rows (a multiple of block_m; the last takes the rest)
    # split: chunks of the first T-block queued before the host waits for the supervised count, on the
    # plan the last call of the same shape had (``_split_speculate``; kept when the count gives that plan).
    # H200 duels: 0.3-4.5% faster at 15 of the 16 benchmark points (key shape 9.40 -> 9.29 ms, ~50% 5.15 ->
    # 5.01); 2 chunks no better than 1
    spec_chunks: int = 1
    # split: who runs ``acc += P @ W[chunk]``. "cublas" (addmm, f32 out), or "streamk": the Triton
    # stream-K kernel ``_mm2_streamk_kernel`` (every SM the same share of the K iterations: at the key
    # shape cuBLAS's 128 x 256 tiles give 100 tiles for 132 SMs). Deterministic either way
    mm2: str = "cublas"
    mm2_block_m: int = 128
    mm2_block_n: int = 256
    mm2_block_k: int = 64
    mm2_warps: int = 8
    mm2_stages: int = 3
    mm2_progs: int = 0  # persistent programs of the stream-K kernel (0: the device's SM count)
    mm2_tma: bool = True  # tensor-descriptor (TMA) loads where the strides allow it (sm_90+; else pointer loads)
    # "kalign": a range that ends inside a tile computes that tile's first K steps first; tiles add
    # in increasing K order; every program streams the same K window (P and W slabs shared in L2).
    # "tile": segments in tile order, adding in decreasing K order (programs at scattered K offsets)
    mm2_order: str = "kalign"


def _config(device: torch.device, dot_dtype: torch.dtype) -> CEConfig:
    if device.type != "cuda":  # Triton interpreter: small tiles keep CPU tests fast
        return CEConfig(block_m=32, block_n=64, block_k=16, block_h=64, num_warps=4, num_stages=1, rows_block=64, rows_m=4,
                        stats_cols=2, finalize_m=32, finalize_h=64,
                        mm2_block_m=16, mm2_block_n=32, mm2_block_k=16, mm2_warps=4, mm2_stages=1, mm2_progs=5)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if dot_dtype == torch.float32:
        # 4-byte tiles: 4 stages asked 329 KB of shared memory on the H200 (limit 227 KB); 2 halve it
        return CEConfig(num_stages=2, sms=sms)
    return CEConfig(sms=sms)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Scratch buffers every element of which a kernel writes before reading (tests poison this)."""
    return torch.empty(shape, dtype=dtype, device=device)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh without libdevice (same code on GPU and in the interpreter); exp overflow -> +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows_ptr, n_rows, H, V, m0, n0, softcap,
    stride_ht, stride_hh, stride_wv, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """``z = softcap(h[rows[m0:m0+BM]] @ W[n0:n0+BN]^T)`` -> ``z [BLOCK_M, BLOCK_N]`` f32 (-inf past V)."""
    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < V
    o_k = tl.arange(0, BLOCK_K)
    rows = tl.load(rows_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    p_h = h_ptr + rows[:, None] * stride_ht + o_k[None, :] * stride_hh  # [BLOCK_M, BLOCK_K]
    p_w = w_ptr + o_n.to(tl.int64)[:, None] * stride_wv + o_k[None, :] * stride_wh  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            b_h = tl.load(p_h, mask=m_m[:, None], other=0.0)
            b_w = tl.load(p_w, mask=m_n[:, None], other=0.0)
        else:
            m_k = (k0 + o_k) < H
            b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(b_h.to(DOT_DTYPE), tl.trans(b_w.to(DOT_DTYPE)), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_h.to(DOT_DTYPE), tl.trans(b_w.to(DOT_DTYPE)), acc)
        p_h += BLOCK_K * stride_hh
        p_w += BLOCK_K * stride_wh
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return tl.where(m_n[None, :], acc, float("-inf")), o_m, m_m, o_n, m_n


@triton.jit
def _a_tile(
    tile_m, tile_n, chunk, h_ptr, w_ptr, rows_ptr, lab_ptr, p_ptr, sm_ptr, ss_ptr, zl_ptr, mrun_ptr,
    Tb, H, V, Vc, softcap,
    stride_ht, stride_hh, stride_wv, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    WRITE_P: tl.constexpr, TAU: tl.constexpr,
):
    """One logits tile of chunk ``chunk``: tile stats, label logit, and (WRITE_P) ``P`` into the chunk buffer.

    ``P = exp(z - r)`` with ``r = R`` (the running max after chunk ``chunk - 1``) when the tile max
    is at most ``R + TAU``, else ``r`` = the tile max.
    """
    z, o_m, m_m, o_n, m_n = _logits_tile(
        h_ptr, w_ptr, rows_ptr, Tb, H, V, tile_m * BLOCK_M, chunk * Vc + tile_n * BLOCK_N, softcap,
        stride_ht, stride_hh, stride_wv, stride_wh,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SOFTCAP, DOT_DTYPE, IEEE,
    )
    b_m = tl.max(z, axis=1)  # [BLOCK_M]
    lab = tl.load(lab_ptr + o_m, mask=m_m, other=-1)
    hit = o_n[None, :] == lab[:, None]  # [BLOCK_M, BLOCK_N]
    zl = tl.sum(tl.where(hit, z, 0.0), axis=1)
    n0 = chunk * Vc + tile_n * BLOCK_N
    tl.store(zl_ptr + o_m, zl, mask=m_m & (lab >= n0) & (lab < n0 + BLOCK_N))
    o_st = tile_n * Tb + o_m  # stats [n_cols, Tb]
    tl.store(sm_ptr + o_st, b_m, mask=m_m)
    if not WRITE_P:
        tl.store(ss_ptr + o_st, tl.sum(tl.exp(z - b_m[:, None]), axis=1), mask=m_m)  # 0 past V
    else:
        r_ref = _lagged_max(mrun_ptr, chunk, Tb, o_m, m_m, BLOCK_M)
        b_r = tl.where(b_m <= r_ref + TAU, r_ref, b_m)
        b_p = tl.exp(z - b_r[:, None])  # [BLOCK_M, BLOCK_N], 0 past V; <= e^TAU
        # one exp per logit: s = Σ exp(z - m) from the P terms. The factor is clamped at e^80 (f32
        # overflow): a tile 80 below the running max adds < 256 e^-80 to S >= 1, whatever s says
        b_s = tl.sum(b_p, axis=1) * tl.exp(tl.minimum(b_r - b_m, 80.0))
        tl.store(ss_ptr + o_st, b_s, mask=m_m)
        if SOFTCAP:
            # d softcap(x) / dx = 1 - (z / c)^2, folded into P so B needs no extra pass
            zc = tl.where(m_n[None, :], z / softcap, 0.0)
            b_p = b_p * (1.0 - zc * zc)
        o_pn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        p_p = p_ptr + o_m[:, None] * Vc + o_pn[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(p_p, b_p.to(p_ptr.dtype.element_ty), mask=m_m[:, None] & (o_pn < Vc)[None, :])


@triton.jit
def _lagged_max(mrun_ptr, chunk, Tb, o_m, m_m, BLOCK_M: tl.constexpr):
    """Running row max after chunk ``chunk - 1`` (-inf for chunk 0): the lazy reference of P."""
    r_ref = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if chunk >= 1:
        r_ref = tl.load(mrun_ptr + ((chunk - 1) % 2) * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg")
    return r_ref


@triton.jit
def _acc_tile_load(acc_ptr, o_m, m_m, o_h, m_h, H):
    """The stored ``acc [BLOCK_M, BLOCK_H]`` tile (written by another program: ``.cg``)."""
    return tl.load(acc_ptr + o_m[:, None] * H + o_h[None, :], mask=m_m[:, None] & m_h[None, :], other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _pw_loop(acc, p_p, p_w, sm_ptr, o_m, m_m, m_h, o_k, v0, V, Tb, k_end, r_ref, m_new, stride_wv,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, TAU: tl.constexpr,
             RESCALE: tl.constexpr):
    """``acc += P[:, :k_end] @ W[v0:v0 + k_end, h-tile]``. RESCALE: each P tile first brought from its
    own reference (``r_ref``, or its tile max when that was more than TAU above) to ``m_new``."""
    for k0 in range(0, k_end, BLOCK_K):
        if RESCALE:
            b_m = tl.load(sm_ptr + (k0 // BLOCK_N) * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg")
            sc = tl.exp(tl.where(b_m <= r_ref + TAU, r_ref, b_m) - m_new)  # factor <= 1
        m_k = (v0 + k0 + o_k) < V
        b_p = tl.load(p_p, mask=m_m[:, None], other=0.0, cache_modifier=".cg")
        if RESCALE:
            b_p = (b_p.to(tl.float32) * sc[:, None]).to(b_p.dtype)
        b_w = tl.load(p_w, mask=m_k[:, None] & m_h[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(b_p, b_w, acc, input_precision="ieee")
        else:
            acc = tl.dot(b_p, b_w, acc)
        p_p += BLOCK_K
        p_w += BLOCK_K * stride_wv
    return acc


@triton.jit
def _b_tile(
    tile_m, tile_h, chunk, w_ptr, p_ptr, sm_ptr, ss_ptr, acc_ptr, mrun_ptr, srun_ptr,
    Tb, H, V, Vc, stride_wv, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    DO_PW: tl.constexpr, IEEE: tl.constexpr, TAU: tl.constexpr,
):
    """Chunk ``chunk`` into the running stats (and, DO_PW, into ``acc [Tb, H]``): one ``[BLOCK_M, BLOCK_H]`` tile.

    Data written by other programs is loaded with ``.cg`` (L2, never a stale L1 line).
    """
    run_new = chunk % 2  # running stats [2, Tb]: written here, read as "old" by chunk + 1 and as R by A(chunk + 1)
    run_old = (chunk + 1) % 2
    v0 = chunk * Vc
    width = tl.minimum(Vc, V - v0)  # columns of this chunk
    n_cols = tl.cdiv(width, BLOCK_N)
    o_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < Tb
    r_ref = _lagged_max(mrun_ptr, chunk, Tb, o_m, m_m, BLOCK_M)
    m_new = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    n_far = 0  # (row, tile) pairs whose P used the tile's own max instead of r_ref
    for c in range(0, n_cols):
        b_m = tl.load(sm_ptr + c * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_new, b_m)
        n_far += tl.sum(((b_m > r_ref + TAU) & m_m).to(tl.int32), axis=0)
    m_old = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if chunk > 0:
        m_old = tl.load(mrun_ptr + run_old * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_new, m_old)
    if DO_PW:
        o_h = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        o_k = tl.arange(0, BLOCK_K)
        p_p = p_ptr + o_m[:, None] * Vc + o_k[None, :]  # [BLOCK_M, BLOCK_K]
        p_w = w_ptr + (v0 + o_k).to(tl.int64)[:, None] * stride_wv + o_h[None, :] * stride_wh  # [BLOCK_K, BLOCK_H]
        # K runs to the end of the chunk's last A tile: P is 0 past V there (z = -inf), so only W's
        # rows need a mask, and P's loads keep no mask along their contiguous axis (a mask built
        # from a runtime width there would split them into 2-byte loads outside the async pipeline)
        k_end = n_cols * BLOCK_N
        if (n_far == 0) & (chunk > 0):
            # common case: P's reference is r_ref = m_old, the running max acc is relative to, so the
            # MMA accumulates straight onto the stored acc and one rescale follows (no second
            # [BLOCK_M, BLOCK_H] f32 tile in registers)
            acc = _acc_tile_load(acc_ptr, o_m, m_m, o_h, m_h, H)
            acc = _pw_loop(acc, p_p, p_w, sm_ptr, o_m, m_m, m_h, o_k, v0, V, Tb, k_end, r_ref, m_new,
                           stride_wv, BLOCK_N, BLOCK_K, IEEE, TAU, False)
            acc = acc * tl.exp(r_ref - m_new)[:, None]
        else:
            # chunk 0, or some (row, tile) of P has its own reference: rescale P per K step to
            # m_new, onto the stored acc brought to m_new first
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            if chunk > 0:
                acc = _acc_tile_load(acc_ptr, o_m, m_m, o_h, m_h, H) * tl.exp(m_old - m_new)[:, None]
            acc = _pw_loop(acc, p_p, p_w, sm_ptr, o_m, m_m, m_h, o_k, v0, V, Tb, k_end, r_ref, m_new,
                           stride_wv, BLOCK_N, BLOCK_K, IEEE, TAU, True)
        # the [BLOCK_M, BLOCK_H] pointers are rebuilt here, not kept across the K loop (128 more
        # registers per thread: the kernel spilled)
        tl.store(acc_ptr + o_m[:, None] * H + o_h[None, :], acc, mask=m_m[:, None] & m_h[None, :])
    if tile_h == 0:
        s_new = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(0, n_cols):
            b_m = tl.load(sm_ptr + c * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg")
            s_new += tl.load(ss_ptr + c * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg") * tl.exp(b_m - m_new)
        if chunk > 0:
            s_new += tl.load(srun_ptr + run_old * Tb + o_m, mask=m_m, other=0.0, cache_modifier=".cg") * tl.exp(m_old - m_new)
        tl.store(mrun_ptr + run_new * Tb + o_m, m_new, mask=m_m)
        tl.store(srun_ptr + run_new * Tb + o_m, s_new, mask=m_m)


@triton.jit
def _tile_of(t, n_m, n_n, GROUP: tl.constexpr):
    """Tile ``t`` in grouped order -> (row tile, column tile): GROUP row tiles walk the column tiles
    together, so a weight tile is reused from L2 by the row tiles of its group."""
    per_group = GROUP * n_n
    first = (t // per_group) * GROUP
    size = tl.minimum(n_m - first, GROUP)
    return first + (t % per_group) % size, (t % per_group) // size


@triton.jit
def _wait_count(cnt_ptr, target, err_ptr, SPIN: tl.constexpr):
    """Spin until ``*cnt_ptr >= target`` (acquire). After ``SPIN`` reads give up and raise the error flag."""
    c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    n = 0
    while (c < target) & (n < SPIN):
        c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        n += 1
    if c < target:
        tl.atomic_xchg(err_ptr, 1)


@triton.jit
def _done(cnt_ptr):
    """Publish a finished tile: every warp's stores first (barrier), then a release increment."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


@triton.jit
def _mm2_segment(p_src, w_src, pm, pn, k_lo, k_hi, M, N, K, stride_p, stride_w,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """``P[pm-tile, k_lo*BK : k_hi*BK] @ W[k_lo*BK : k_hi*BK, pn-tile]`` -> ``[BM, BN]`` f32. TMA: ``p_src``
    and ``w_src`` are tensor descriptors (blocks [BM, BK] and [BK, BN]; out-of-bounds parts read as
    zero), else pointers (masked loads)."""
    part = tl.zeros((BM, BN), tl.float32)
    if TMA:
        for k in range(k_lo, k_hi):
            a = p_src.load([pm * BM, k * BK])
            b = w_src.load([k * BK, pn * BN])
            part = tl.dot(a, b, part)
    else:
        o_m = pm * BM + tl.arange(0, BM)
        o_n = pn * BN + tl.arange(0, BN)
        o_k = k_lo * BK + tl.arange(0, BK)
        m_m = o_m < M
        m_n = o_n < N
        p_p = p_src + o_m.to(tl.int64)[:, None] * stride_p + o_k[None, :]  # [BM, BK]
        p_w = w_src + o_k.to(tl.int64)[:, None] * stride_w + o_n[None, :]  # [BK, BN]
        for k in range(k_lo, k_hi):
            m_k = o_k < K
            a = tl.load(p_p, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
            part = tl.dot(a, b, part)
            o_k += BK
            p_p += BK
            p_w += BK * stride_w
    return part


@triton.jit
def _mm2_add_store(acc_ptr, part, m0, n0, M, N, m_read, stride_acc, BM: tl.constexpr, BN: tl.constexpr):
    """``acc[m0:m0+BM, n0:n0+BN] = acc (rows < m_read, else 0) + part`` (rows < M, columns < N). acc as
    stored, maybe by another program: ``.cg`` loads, never a stale L1 line."""
    o_m = m0 + tl.arange(0, BM)
    o_n = n0 + tl.arange(0, BN)
    p_acc = acc_ptr + o_m.to(tl.int64)[:, None] * stride_acc + o_n[None, :]
    old = tl.load(p_acc, mask=(o_m < m_read)[:, None] & (o_n < N)[None, :], other=0.0, cache_modifier=".cg")
    tl.store(p_acc, old + part, mask=(o_m < M)[:, None] & (o_n < N)[None, :])


@triton.jit
def _range_of(g, n_r, total):
    """The stream-K range holding iteration ``g``: the largest ``q`` with ``q * total // n_r <= g``."""
    return ((g.to(tl.int64) * n_r + n_r - 1) // total).to(tl.int32)


# the chunk's width (K) and the T-block's rows (M) keep Triton's integer specialization: the
# pointer path's loads stay vectorized, and only the last chunk / T-block adds a variant
@triton.jit(do_not_specialize=["n_progs"])
def _mm2_streamk_kernel(
    p_src, w_src, acc_ptr, sync_ptr, err_ptr,
    M, N, K, stride_p, stride_w, stride_acc, n_progs,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    ACCUMULATE: tl.constexpr, TMA: tl.constexpr, KALIGN: tl.constexpr, SPIN: tl.constexpr,
):
    """Stream-K ``acc[M, N] (=|+=) P[M, K] @ W[K, N]`` (f32 accumulation, f32 ``acc``), deterministic.

    The ``total = n_tiles * KI`` iterations (``BM x BN`` tiles in grouped order, ``KI = cdiv(K, BK)``
    K steps each; iteration ``g = tile * KI + k``) are cut into ``n_r = min(n_progs, total)`` ranges
    (never empty), range ``r`` = ``[r * total // n_r, (r + 1) * total // n_r)``: every program the same
    number of K steps (+-1). A program draws a ticket from a counter when it starts, which names its
    range, and computes one f32 partial tile per (tile, range) segment.

    Fix-up without a workspace: a tile split over several ranges gets its segments added into
    ``acc`` one after the other in a fixed order. The first writes ``acc = (ACCUMULATE ? acc : 0) +
    part`` and publishes ``flags[tile] += 1`` (barrier + release); the next waits (acquire) for
    ``flags[tile] >= 1``, adds its part, publishes; ...; the last waits for the count of segments
    before it (a difference of range indices: no range is empty), adds, and zeroes the flag for the
    next launch. A wait is only ever for a range whose ticket was drawn earlier, by a program that
    has started: no deadlock even if not all programs are resident. The summation order of a tile
    depends on (M, N, K, n_progs) only: bitwise reproducible, no float atomics. A wait that spins
    ``SPIN`` reads raises ``err``.

    KALIGN (the order): ranges are drawn first to last; a range that ends inside a tile it starts
    computes that tile's head (K steps from 0) first, then the rest in tile order; segments add in
    increasing K order. All programs then stream the same K window at once (with fewer tiles than
    programs, within ``KI - total / n_r`` steps of each other), so P and W slabs are shared in L2
    as in a data-parallel GEMM. Otherwise: ranges drawn last to first, segments in tile order,
    adding in decreasing K order (the tile's last segment, first in its range, adds first); every
    program at a different K offset.

    ``sync_ptr`` (int32, zero before the first launch, zero again after each): ``[0]`` the ticket
    counter (reset by the program drawing the last ticket), ``[1 + tile]`` the per-tile flags.
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    if ticket == n_progs - 1:  # every program has drawn its ticket: the counter is free for the next launch
        tl.atomic_xchg(sync_ptr, 0)
    flags_ptr = sync_ptr + 1
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    KI = tl.cdiv(K, BK)
    total = (n_m * n_n).to(tl.int64) * KI
    n_r = tl.minimum(total, n_progs)  # no empty ranges: the fix-up counts on every range holding a step
    if KALIGN:
        r = ticket
    else:
        r = n_progs - 1 - ticket
    if r < n_r:
        start = (r * total // n_r).to(tl.int32)
        end = ((r + 1) * total // n_r).to(tl.int32)
        h0 = ((end - 1) // KI) * KI  # first step of the range's last tile
        if KALIGN:
            head = (h0 > start) & (h0 + KI > end)  # that tile starts inside this range and ends past it
        else:
            head = h0 < 0  # never
        g = tl.where(head, h0, start)  # head: [h0, end) first, then [start, h0)
        stop = end
        while g < stop:
            tile = g // KI
            t0 = tile * KI
            k_lo = g - t0
            g_hi = tl.minimum(stop, t0 + KI)
            pm, pn = _tile_of(tile, n_m, n_n, GROUP)
            part = _mm2_segment(p_src, w_src, pm, pn, k_lo, g_hi - t0, M, N, K, stride_p, stride_w, BM, BN, BK, TMA)
            if KALIGN:
                n_wait = r - _range_of(t0, n_r, total)  # segments of this tile that add before this one
                final = g_hi == t0 + KI  # this segment adds last
            else:
                n_wait = _range_of(t0 + KI - 1, n_r, total) - r
                final = k_lo == 0
            if n_wait > 0:
                _wait_count(flags_ptr + tile, n_wait, err_ptr, SPIN)
            # read acc unless this is the tile's first add in a launch that overwrites (n_wait >= 0 always)
            m_read = tl.where(n_wait >= (0 if ACCUMULATE else 1), M, 0)
            # two halves of BN / 2 columns: the stored tile and the partial one never both whole in registers
            lo, hi = tl.split(tl.permute(tl.reshape(part, (BM, 2, BN // 2)), (0, 2, 1)))
            _mm2_add_store(acc_ptr, lo, pm * BM, pn * BN, M, N, m_read, stride_acc, BM, BN // 2)
            _mm2_add_store(acc_ptr, hi, pm * BM, pn * BN + BN // 2, M, N, m_read, stride_acc, BM, BN // 2)
            if not final:
                _done(flags_ptr + tile)  # the tile's next segment (another range) waits for this one
            elif n_wait > 0:
                tl.atomic_xchg(flags_ptr + tile, 0)  # the tile's last add: its flag is free for the next launch
            wrap = head & (g_hi == end)  # KALIGN: the head is done, now the range's start
            g = tl.where(wrap, start, g_hi)
            stop = tl.where(wrap, h0, stop)


# per-launch integers vary every call: specializing on them would recompile the kernel
@triton.jit(do_not_specialize=["Tb", "n_chunks"])
def _ce_block_kernel(
    h_ptr, w_ptr, rows_ptr, lab_ptr, p_ptr, sm_ptr, ss_ptr, zl_ptr, acc_ptr, mrun_ptr, srun_ptr,
    sync_ptr, err_ptr,
    Tb, H, V, Vc, softcap, n_chunks,
    stride_ht, stride_hh, stride_wv, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
    IEEE_A: tl.constexpr, IEEE_B: tl.constexpr, WRITE_P: tl.constexpr, TAU: tl.constexpr,
    SPIN: tl.constexpr,
):
    """One tile of a T-block: each program claims the next of A(0) | B(0) A(1) | B(1) A(2) | ... | B(last).

    One program per tile, not a persistent loop: around an outer loop LLVM hoists every tile's
    thread-index arithmetic out of it and the live ranges spilled registers (616 bytes of stack vs
    344 now, sm_90). ``sync_ptr`` (int32, zeroed): ``[0]`` the tile counter, then ``done_a [n_chunks, n_tm]`` and
    ``done_b [n_chunks, n_tm]`` (finished tiles per chunk and row tile). The last chunk's A tiles
    past ``V`` are claimed and counted but compute nothing, so every chunk counts the same.
    """
    n_tm = tl.cdiv(Tb, BLOCK_M)
    n_tn = tl.cdiv(Vc, BLOCK_N)
    if WRITE_P:
        n_th = tl.cdiv(H, BLOCK_H)
    else:
        n_th = 1
    n_a = n_tm * n_tn
    n_b = n_tm * n_th
    per = n_a + n_b
    total = n_chunks * per
    done_a = sync_ptr + 1
    done_b = done_a + n_chunks * n_tm
    # claim order = start order: every tile this one waits for is held by a started program
    t = tl.atomic_add(sync_ptr, 1)
    if t < total:
        u = t + n_b  # as if step -1 had n_b (absent) B tiles: every step is then [B(s), A(s + 1)]
        step = u // per - 1
        r = u - (step + 1) * per
        if r < n_b:
            chunk = step
            tile_m = r // n_th
            _wait_count(done_a + chunk * n_tm + tile_m, n_tn, err_ptr, SPIN)  # P and stats of chunk
            if chunk > 0:
                _wait_count(done_b + (chunk - 1) * n_tm + tile_m, n_th, err_ptr, SPIN)  # acc, running stats
            _b_tile(
                tile_m, r % n_th, chunk, w_ptr, p_ptr, sm_ptr, ss_ptr, acc_ptr, mrun_ptr, srun_ptr,
                Tb, H, V, Vc, stride_wv, stride_wh,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_H, WRITE_P, IEEE_B, TAU,
            )
            _done(done_b + chunk * n_tm + tile_m)
        else:
            chunk = step + 1
            tile_m, tile_n = _tile_of(r - n_b, n_tm, n_tn, GROUP_M)
            if chunk > 0:
                # B(chunk - 1) of these rows has read the P rows and stats this tile overwrites
                _wait_count(done_b + (chunk - 1) * n_tm + tile_m, n_th, err_ptr, SPIN)
            if chunk * Vc + tile_n * BLOCK_N < V:
                _a_tile(
                    tile_m, tile_n, chunk, h_ptr, w_ptr, rows_ptr, lab_ptr, p_ptr, sm_ptr, ss_ptr, zl_ptr, mrun_ptr,
                    Tb, H, V, Vc, softcap,
                    stride_ht, stride_hh, stride_wv, stride_wh,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SOFTCAP, DOT_DTYPE, IEEE_A, WRITE_P, TAU,
                )
            _done(done_a + chunk * n_tm + tile_m)

@triton.jit
def _rescale_row_span(p_ptr, stride, o_r, m_r, alpha, n, BLOCK: tl.constexpr, CAST: tl.constexpr):
    """``x[o_r, :n] *= alpha[:, None]`` (rows ``o_r`` of a row-major buffer; CAST: stored in p_ptr's dtype)."""
    o_c = tl.arange(0, BLOCK)
    for c0 in range(0, n, BLOCK):
        m = m_r[:, None] & ((c0 + o_c) < n)[None, :]
        q = p_ptr + o_r[:, None] * stride + (c0 + o_c)[None, :]
        x = tl.load(q, mask=m, other=0.0).to(tl.float32) * alpha[:, None]
        if CAST:
            x = x.to(p_ptr.dtype.element_ty)
        tl.store(q, x, mask=m)


# ``width`` stays specialized: a mask built from a width Triton knows to be a multiple of 16 keeps
# 16-byte loads and stores (unspecialized, every access split into 2-byte ones: 4x slower)
@triton.jit(do_not_specialize=["tb", "v0", "first"])
def _ce_rows_kernel(
    s_ptr, lab_ptr, acc_ptr, ref_ptr, mmax_ptr, srun_ptr, zl_ptr,
    tb, H, v0, width, stride_s, softcap, first,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SOFTCAP: tl.constexpr, TAU: tl.constexpr,
    WRITE_P: tl.constexpr, PREFETCH: tl.constexpr, REVERSE: tl.constexpr,
):
    """Split schedule, ``BLOCK_R`` supervised rows per program, one pass over the logits chunk
    ``S[rows, :width]`` (columns ``v0..``, raw, before softcap): fold it into the rows' running stats
    and (WRITE_P) overwrite it in place with ``P = exp(z - r) * softcap'(z)``.

    ``r`` is a row's reference (its ``acc`` row and sum are relative to it). It moves only when a
    column tile's max exceeds it by more than ``TAU`` (rare after the first tile of the first chunk);
    then the row's sum, the P tiles already written and (after the first chunk) its ``acc`` row are
    rescaled here, before the next ``acc += P @ W[chunk]``. ``mmax`` = the exact running max (for
    ``correct``); ``zl`` = the label's logit when the label lies in this chunk.
    """
    pid = tl.program_id(0)
    if REVERSE:  # programs start in id order: the first ones take the rows the matmul wrote last
        pid = tl.num_programs(0) - 1 - pid
    o_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < tb
    o_r64 = o_r.to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    if first != 0:
        r = tl.where(m_r, float("-inf"), 0.0)  # rows past tb keep a finite reference (no inf - inf)
        s_run = tl.zeros((BLOCK_R,), tl.float32)
        m_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    else:
        r = tl.load(ref_ptr + o_r, mask=m_r, other=0.0)
        s_run = tl.load(srun_ptr + o_r, mask=m_r, other=0.0)
        m_max = tl.load(mmax_ptr + o_r, mask=m_r, other=0.0)
    lab = tl.load(lab_ptr + o_r, mask=m_r, other=-1)
    in_chunk = m_r & (lab >= v0) & (lab < v0 + width)
    # the label's logit: one gather per row, before P overwrites the chunk
    zl = tl.load(s_ptr + o_r64 * stride_s + (lab - v0), mask=in_chunk, other=0.0).to(tl.float32)
    if SOFTCAP:
        zl = softcap * _tanh(zl / softcap)
    p_rows = s_ptr + o_r64[:, None] * stride_s  # [BLOCK_R, 1]
    s_vec = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # per-lane sums: one cross-warp reduction per row, at the end
    if PREFETCH:
        z_next = tl.load(p_rows + o_c[None, :], mask=m_r[:, None] & (o_c < width)[None, :], other=float("-inf"))
    for c0 in range(0, width, BLOCK_C):
        m_c = (c0 + o_c) < width
        m = m_r[:, None] & m_c[None, :]
        if PREFETCH:  # the next tile's load is in flight while this one is reduced and stored
            z = z_next.to(tl.float32)  # [BLOCK_R, BLOCK_C]
            o_n = c0 + BLOCK_C + o_c
            z_next = tl.load(p_rows + o_n[None, :], mask=m_r[:, None] & (o_n < width)[None, :], other=float("-inf"))
        else:
            z = tl.load(p_rows + (c0 + o_c)[None, :], mask=m, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z = tl.where(m, softcap * _tanh(z / softcap), float("-inf"))  # tanh(-inf) = -1: re-mask padding
        t_max = tl.max(z, axis=1)  # the tile's one cross-warp reduction
        m_max = tl.maximum(m_max, t_max)
        move = (t_max > r + TAU) & m_r
        if tl.sum(move.to(tl.int32), axis=0) > 0:
            # a logit far above the reference (always on the first tile of the first chunk): the
            # moved rows take the tile max; what is already relative to the old one is rescaled
            alpha = tl.where(move, tl.exp(tl.minimum(r - t_max, 0.0)), 1.0)  # 0 from r = -inf
            r = tl.where(move, t_max, r)
            s_run = s_run * alpha
            s_vec = s_vec * alpha[:, None]
            if WRITE_P:
                _rescale_row_span(s_ptr, stride_s, o_r64, move, alpha, c0, BLOCK_C, True)
                if first == 0:
                    _rescale_row_span(acc_ptr, H, o_r64, move, alpha, H, BLOCK_C, False)
        e = tl.exp(z - r[:, None])  # 0 past width; <= e^TAU
        s_vec += e
        if WRITE_P:
            if SOFTCAP:
                zc = tl.where(m, z / softcap, 0.0)
                e = e * (1.0 - zc * zc)
            tl.store(p_rows + (c0 + o_c)[None, :], e.to(s_ptr.dtype.element_ty), mask=m)
    tl.store(zl_ptr + o_r, zl, mask=in_chunk)
    tl.store(ref_ptr + o_r, r, mask=m_r)
    tl.store(srun_ptr + o_r, s_run + tl.sum(s_vec, axis=1), mask=m_r)
    tl.store(mmax_ptr + o_r, m_max, mask=m_r)


@triton.jit(do_not_specialize=["Tb"])
def _ce_finalize_kernel(
    w_ptr, rows_ptr, lab_ptr, tw_ptr, zl_ptr, acc_ptr, mrun_ptr, srun_ptr, mmax_ptr, err_ptr,
    dh_ptr, lse_ptr, loss_ptr, correct_ptr,
    Tb, H, softcap, stride_wv, stride_wh, stride_dt, stride_dh,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_DH: tl.constexpr, RETURN_CORRECT: tl.constexpr,
):
    """``lse``, ``w * CE``, ``correct`` per supervised row; ``dh_unit[rows] = w * (acc / S - softcap'(z_l) W[label])``.

    ``acc`` and the sum ``S`` are relative to ``mrun`` (lse = mrun + log S); ``mmax`` is the row's
    exact max (``correct`` = label logit >= it): the same pointer as ``mrun`` in the fused schedule.

    A raised error flag (a dependency wait that gave up) turns ``lse`` and the loss into NaN.
    """
    tile_m = tl.program_id(0)
    tile_h = tl.program_id(1)
    o_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < Tb
    rows = tl.load(rows_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    m_run = tl.load(mrun_ptr + o_m, mask=m_m, other=0.0)
    s_run = tl.load(srun_ptr + o_m, mask=m_m, other=1.0)
    zl = tl.load(zl_ptr + o_m, mask=m_m, other=0.0)
    tw = tl.load(tw_ptr + o_m, mask=m_m, other=0.0)
    if tile_h == 0:
        lse = m_run + tl.log(s_run)
        lse = tl.where(tl.load(err_ptr) != 0, float("nan"), lse)
        tl.store(lse_ptr + rows, lse, mask=m_m)
        tl.store(loss_ptr + o_m, tw * (lse - zl), mask=m_m)
        if RETURN_CORRECT:
            m_max = tl.load(mmax_ptr + o_m, mask=m_m, other=0.0)
            tl.store(correct_ptr + rows, (zl >= m_max).to(tl.int8), mask=m_m)
    if NEED_DH:
        o_h = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        m_a = m_m[:, None] & m_h[None, :]
        lab = tl.load(lab_ptr + o_m, mask=m_m, other=0).to(tl.int64)
        b_a = tl.load(acc_ptr + o_m[:, None] * H + o_h[None, :], mask=m_a, other=0.0)  # [BLOCK_M, BLOCK_H]
        b_wl = tl.load(w_ptr + lab[:, None] * stride_wv + o_h[None, :] * stride_wh, mask=m_a, other=0.0).to(tl.float32)
        d_l = tl.full((BLOCK_M,), 1.0, tl.float32)
        if SOFTCAP:
            d_l = 1.0 - (zl / softcap) * (zl / softcap)
        b_dh = tw[:, None] * (b_a / s_run[:, None] - d_l[:, None] * b_wl)
        tl.store(dh_ptr + rows[:, None] * stride_dt + o_h[None, :] * stride_dh, b_dh.to(dh_ptr.dtype.element_ty), mask=m_a)


@triton.jit(do_not_specialize=["Tc", "v0", "width"])
def _ce_dlogits_kernel(
    h_ptr, w_ptr, rows_ptr, lab_ptr, tw_ptr, lse_ptr, d_ptr, grad_ptr,
    Tc, H, V, v0, width, softcap,
    stride_ht, stride_hh, stride_wv, stride_wh, stride_dt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """``dlogits [Tc, width]`` of the chunk at ``v0`` with the final lse: ``g w (softmax - onehot) softcap'``."""
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    z, o_m, m_m, o_n, m_n = _logits_tile(
        h_ptr, w_ptr, rows_ptr, Tc, H, V, tile_m * BLOCK_M, v0 + tile_n * BLOCK_N, softcap,
        stride_ht, stride_hh, stride_wv, stride_wh,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SOFTCAP, DOT_DTYPE, IEEE,
    )
    rows = tl.load(rows_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=m_m, other=0.0)
    lab = tl.load(lab_ptr + o_m, mask=m_m, other=-1)
    g = tl.load(grad_ptr)
    tw = tl.load(tw_ptr + o_m, mask=m_m, other=0.0) * g
    b_d = tl.exp(z - lse[:, None]) - tl.where(o_n[None, :] == lab[:, None], 1.0, 0.0)  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        zc = tl.where(m_n[None, :], z / softcap, 0.0)
        b_d = b_d * (1.0 - zc * zc)
    b_d = b_d * tw[:, None]
    o_dn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(d_ptr + o_m[:, None] * stride_dt + o_dn[None, :], b_d.to(d_ptr.dtype.element_ty),
             mask=m_m[:, None] & (o_dn < width)[None, :])


@triton.jit(do_not_specialize=["Tc", "v0"])
def _ce_dlogits_rows_kernel(
    d_ptr, lab_ptr, tw_ptr, lse_ptr, grad_ptr,
    Tc, v0, width, stride_d, softcap,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Split schedule's ``dW``: the logits chunk ``D [Tc, width]`` (cuBLAS, raw; ``lse [Tc]`` from the
    same calls) becomes ``dlogits = g w (softmax - onehot) softcap'`` in place."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < Tc
    lse = tl.load(lse_ptr + o_r, mask=m_r, other=0.0)
    lab = tl.load(lab_ptr + o_r, mask=m_r, other=-1)
    tw = tl.load(tw_ptr + o_r, mask=m_r, other=0.0) * tl.load(grad_ptr)
    p_rows = d_ptr + o_r.to(tl.int64)[:, None] * stride_d
    o_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, width, BLOCK_C):
        m = m_r[:, None] & ((c0 + o_c) < width)[None, :]
        z = tl.load(p_rows + (c0 + o_c)[None, :], mask=m, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        b_d = tl.exp(z - lse[:, None]) - tl.where((v0 + c0 + o_c)[None, :] == lab[:, None], 1.0, 0.0)
        if SOFTCAP:
            b_d = b_d * (1.0 - (z / softcap) * (z / softcap))
        tl.store(p_rows + (c0 + o_c)[None, :], (b_d * tw[:, None]).to(d_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T", "V"])
def _ce_compact_kernel(
    tw_ptr, lab_ptr, rows_ptr, rows32_ptr, labc_ptr, twc_ptr, lse_ptr, correct_ptr, err_ptr, den_ptr, count_ptr,
    T, V, BLOCK: tl.constexpr, RETURN_CORRECT: tl.constexpr,
):
    """One program: the supervised tokens (``tw > 0``) in order -> ``rows``/``rows32 [:Tc]``, their labels
    (int32) and weights, then the other tokens (weight 0, labels as given, never read as indices) from
    the back; ``count = (Tc, supervised labels outside [0, V))`` for the host; ``den = Σ tw``;
    ``lse``/``correct``/``err`` zeroed. Replaces a sort, ~10 gathers and casts and 4 memsets before the
    op's one host sync (each one a launch the GPU waits for at the start of every call)."""
    n_sup = tl.zeros((), tl.int32)
    n_bad = tl.zeros((), tl.int32)
    den = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(0, T, BLOCK):
        o = t0 + tl.arange(0, BLOCK)
        m = o < T
        w = tl.load(tw_ptr + o, mask=m, other=0.0).to(tl.float32)
        den += w
        sup = (w > 0) & m
        lab = tl.load(lab_ptr + o, mask=m, other=0)
        n_bad += tl.sum((((lab < 0) | (lab >= V)) & sup).to(tl.int32), axis=0)
        s32 = sup.to(tl.int32)
        u32 = (m & ~sup).to(tl.int32)
        # supervised rows in order from the front (exclusive prefix), the others from the back: the
        # whole buffer is a permutation of [0, T), so rows past the count (unknown before the host
        # reads it) still index hidden in bounds (the split schedule's first chunk runs before that)
        pos = tl.where(sup, n_sup + tl.cumsum(s32, axis=0) - s32, T - 1 - (t0 - n_sup) - (tl.cumsum(u32, axis=0) - u32))
        tl.store(rows_ptr + pos, o.to(tl.int64), mask=m)
        tl.store(rows32_ptr + pos, o, mask=m)
        tl.store(labc_ptr + pos, lab.to(tl.int32), mask=m)
        tl.store(twc_ptr + pos, tl.where(sup, w, 0.0), mask=m)
        tl.store(lse_ptr + o, tl.zeros((BLOCK,), tl.float32), mask=m)
        if RETURN_CORRECT:
            tl.store(correct_ptr + o, tl.zeros((BLOCK,), tl.int8), mask=m)
        n_sup += tl.sum(s32, axis=0)
    tl.store(den_ptr, tl.sum(den, axis=0))
    tl.store(err_ptr, 0)
    tl.store(count_ptr, n_sup.to(tl.int64))
    tl.store(count_ptr + 1, n_bad.to(tl.int64))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    for name, t in (("hidden", hidden), ("lm_head_weight", weight)):
        if t.dtype not in _TL_DTYPE:
            raise TypeError(
                f"decayed_cross_entropy(backend='triton') supports float32/float16/bfloat16 {name}, "
                f"got {t.dtype}; use backend='torch' for float64"
            )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")


def _dot_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # mixed inputs meet in float32 (the naive reference computes them in float32 too)
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32


def _tau(p_dtype: torch.dtype) -> float:
    """How far above its reference a P entry may be: e^60 fits bf16/fp32, e^10 fits fp16 (max 65504)."""
    return 10.0 if p_dtype == torch.float16 else 60.0


def _plan(Tc: int, H: int, V: int, p_bytes: int, cfg: CEConfig, write_p: bool) -> tuple[int, int]:
    """Rows per T-block ``Tb`` and columns per chunk ``Vc`` (a multiple of block_n) within the budget."""
    bm, bn = cfg.block_m, cfg.block_n
    v_pad = triton.cdiv(V, bn) * bn
    if not write_p:
        return Tc, min(v_pad, cfg.stats_cols * bn)
    tb_cap = max(bm, (cfg.budget // 2) // (4 * H) // bm * bm)
    n_blocks = triton.cdiv(Tc, tb_cap)
    Tb = min(Tc, triton.cdiv(triton.cdiv(Tc, n_blocks), bm) * bm)
    free = cfg.budget - Tb * H * 4
    Vc = max(bn, free // (Tb * p_bytes) // bn * bn)
    return Tb, min(Vc, v_pad)


_WAVE_TILE = (128, 256)  # the bf16 output tile cuBLAS uses on the H200 (CEConfig.big_stash_rows)


def _plan_split(Tc: int, H: int, V: int, itemsize: int, cfg: CEConfig, need_dh: bool, gather: bool) -> tuple[int, int]:
    """Split schedule: rows per T-block ``Tb`` and logits columns per chunk ``Vc`` (a multiple of 64)
    within the budget: ``acc [Tb, H]`` f32 (need_dh) + gathered ``h [Tb, H]`` (gather) + ``S [Tb, Vc]``.
    The last block may be shorter (its chunks are then wider: ``_block_cols``)."""
    bm = cfg.block_m
    per_row = (4 * H if need_dh else 0) + (itemsize * H if gather else 0)
    if cfg.split_rows:
        assert cfg.split_rows % bm == 0, (cfg.split_rows, bm)
        Tb = min(Tc, cfg.split_rows)
    elif need_dh:  # as tall as chunks of w_chunk_bytes allow; no short stub of a last block
        min_cols = min(V, cfg.w_chunk_bytes // (H * itemsize))
        tb_max = max(bm, min(cfg.max_rows, cfg.budget // (per_row + itemsize * min_cols)) // bm * bm)
        n_blocks = triton.cdiv(Tc, tb_max)
        tail = Tc - (n_blocks - 1) * tb_max
        even = not cfg.rows_tail or 4 * tail < tb_max
        Tb = min(Tc, triton.cdiv(triton.cdiv(Tc, n_blocks), bm) * bm if even else tb_max)
    else:  # forward only: S is the one big buffer, one block unless the gathered rows need more
        tb_cap = max(bm, int(cfg.budget * cfg.rows_share) // max(per_row, 1) // bm * bm)
        Tb = min(Tc, triton.cdiv(triton.cdiv(Tc, triton.cdiv(Tc, tb_cap)), bm) * bm)
    Vc = max(64, (cfg.budget - Tb * per_row) // (Tb * itemsize) // 64 * 64)
    return Tb, min(Vc, V)


def _stash_budget(stash: int, cfg: CEConfig) -> int:
    """The split schedule's chunk budget next to a d hidden stash of ``stash`` bytes (CEConfig.peak_cap)."""
    room = cfg.peak_cap - stash - _MiB  # 1 MiB for the per-row vectors (rows, labels, lse, ...)
    if cfg.peak_cap and room >= cfg.budget_min:
        return room
    grown = max(cfg.budget, min(int(cfg.budget_per_stash * stash), 1 << 30))  # < 2^31 elements per buffer
    # the stash is the returned gradient: beyond it, the chunks stay within the cap (2 MiB: the per-row
    # vectors, and the allocator rounds the chunk buffer up to 2 MiB)
    return min(grown, max(cfg.peak_cap - 2 * _MiB, cfg.budget_min)) if cfg.peak_cap else grown


def _split_plan(T: int, Tc: int, H: int, V: int, itemsize: int, cfg: CEConfig, need_dh: bool) -> tuple[int, int]:
    """The split schedule's ``(Tb, Vc)`` for ``Tc`` of ``T`` rows supervised: ``_plan_split`` within the
    chunk budget, which with a d hidden stash ``[T, H]`` is ``_stash_budget``'s. A stash of at least the
    cap: T-blocks of at most ``big_stash_rows``, and chunks cut to a width whose first-matmul output
    tiles fill whole waves on the device's SMs, where the budget allows one (CEConfig.big_stash_rows)."""
    if not need_dh:
        return _plan_split(Tc, H, V, itemsize, cfg, need_dh, Tc != T)
    stash = T * H * itemsize
    big = bool(cfg.peak_cap) and stash >= cfg.peak_cap
    cfg = dataclasses.replace(cfg, budget=_stash_budget(stash, cfg),
                              max_rows=min(cfg.max_rows, cfg.big_stash_rows) if big else cfg.max_rows)
    Tb, Vc = _plan_split(Tc, H, V, itemsize, cfg, need_dh, Tc != T)
    if big and Vc < V:  # row tiles x column tiles a multiple of the SM count
        step = _WAVE_TILE[1] * cfg.sms // math.gcd(triton.cdiv(Tb, _WAVE_TILE[0]), cfg.sms)
        Vc = Vc // step * step or Vc
    return Tb, Vc


def _block_cols(tb: int, Tb: int, Vc: int, V: int) -> int:
    """Logits columns per chunk for a T-block of ``tb <= Tb`` rows: a shorter last block fills the same
    ``Tb x Vc`` buffer with wider chunks (fewer, so W is read in fewer, longer matmuls), kept even."""
    if tb >= Tb or Vc >= V:
        return Vc
    cap = min(V, Tb * Vc // tb // 64 * 64)
    return min(cap, triton.cdiv(triton.cdiv(V, triton.cdiv(V, cap)), 64) * 64)


def _mm_f32(acc: torch.Tensor, p: torch.Tensor, w: torch.Tensor, accumulate: bool) -> None:
    """``acc (=|+=) p @ w`` into the f32 ``acc`` with f32 accumulation (cuBLAS ``out_dtype`` on CUDA)."""
    if acc.is_cuda:
        if accumulate:
            torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(p, w, out_dtype=torch.float32, out=acc)
    else:  # CPU (the interpreter tests): no out_dtype kernel there
        prod = p.float() @ w.float()
        acc.add_(prod) if accumulate else acc.copy_(prod)


def _mm2_sync(M: int, N: int, cfg: CEConfig, device) -> torch.Tensor:
    """The stream-K kernel's zeroed int32 scratch for ``acc [<= M, N]``: claim counter + one flag per
    tile. Every launch leaves it zero again, so one serves all the chunks and T-blocks of a call."""
    return torch.zeros(1 + triton.cdiv(M, cfg.mm2_block_m) * triton.cdiv(N, cfg.mm2_block_n), dtype=torch.int32,
                       device=device)


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (and sm_90+ on CUDA)."""
    if ts[0].is_cuda and torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in ts)


def _mm2_streamk(acc: torch.Tensor, p: torch.Tensor, w: torch.Tensor, accumulate: bool, cfg: CEConfig,
                 n_progs: Optional[int] = None, sync: Optional[torch.Tensor] = None, err: Optional[torch.Tensor] = None,
                 tma: Optional[bool] = None) -> None:
    """``acc (=|+=) p @ w`` (``acc [M, N]`` f32, ``p [M, K]``, ``w [K, N]`` 16-bit, rows contiguous) by the
    deterministic stream-K kernel, ``n_progs`` persistent programs (default ``cfg.mm2_progs``, 0 = the
    SM count). ``sync``: ``_mm2_sync``'s scratch (allocated here when None; left zeroed); ``err``: the
    int32 flag a given-up wait raises; ``tma``: force tensor-descriptor loads on/off (None: when allowed)."""
    M, K = p.shape
    N = w.shape[1]
    assert w.shape[0] == K and acc.shape == (M, N) and acc.dtype == torch.float32 and p.dtype == w.dtype
    assert p.stride(1) == 1 and w.stride(1) == 1 and acc.stride(1) == 1
    assert cfg.mm2_order in ("kalign", "tile"), cfg.mm2_order
    bm, bn, bk = cfg.mm2_block_m, cfg.mm2_block_n, cfg.mm2_block_k
    if n_progs is None:
        n_progs = cfg.mm2_progs or (torch.cuda.get_device_properties(p.device).multi_processor_count if p.is_cuda else 4)
    if sync is None:
        sync = _mm2_sync(M, N, cfg, p.device)
    assert sync.numel() >= 1 + triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if err is None:
        err = torch.zeros(1, dtype=torch.int32, device=p.device)
    if tma is None:
        tma = cfg.mm2_tma and _tma_ok(p, w)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        p_src, w_src = TensorDescriptor.from_tensor(p, [bm, bk]), TensorDescriptor.from_tensor(w, [bk, bn])
    else:
        p_src, w_src = p, w
    _mm2_streamk_kernel[(n_progs,)](
        p_src, w_src, acc, sync, err, M, N, K, p.stride(0), w.stride(0), acc.stride(0), n_progs,
        BM=bm, BN=bn, BK=bk, GROUP=8, ACCUMULATE=bool(accumulate), TMA=bool(tma), KALIGN=cfg.mm2_order == "kalign",
        SPIN=1 << 24, num_warps=cfg.mm2_warps, num_stages=cfg.mm2_stages,
    )


def _finalize(weight, blk, z_lab, acc, run, err, dh, lse, loss, correct, softcap: float, cfg: CEConfig,
              need_dh: bool, return_correct: bool) -> None:
    """``_ce_finalize_kernel`` for one T-block: ``blk`` = (rows, labels, token weights) of its ``tb``
    rows, ``run`` = (reference, sum relative to it, exact max) per row; writes ``lse``, ``loss``,
    ``correct`` and ``dh`` rows."""
    rows, labels, tw = blk
    tb, H = rows.numel(), weight.shape[1]
    grid = (triton.cdiv(tb, cfg.finalize_m), triton.cdiv(H, cfg.finalize_h) if need_dh else 1)
    _ce_finalize_kernel[grid](
        weight, rows, labels, tw, z_lab, acc, *run, err,
        dh, lse, loss, correct.view(torch.int8),
        tb, H, softcap, weight.stride(0), weight.stride(1),
        dh.stride(0) if need_dh else 0, dh.stride(1) if need_dh else 0,
        BLOCK_M=cfg.finalize_m, BLOCK_H=cfg.finalize_h, SOFTCAP=softcap > 0,
        NEED_DH=need_dh, RETURN_CORRECT=return_correct, num_warps=4,
    )


def _rows_block(cfg: CEConfig, width: int) -> int:
    """Columns per step of the split schedule's row passes (``rows_block`` 0: the whole chunk row)."""
    return cfg.rows_block or triton.next_power_of_2(width)


def _rows_pass(s: torch.Tensor, labels: torch.Tensor, acc: Optional[torch.Tensor], stats: torch.Tensor, v0: int,
               cfg: CEConfig, softcap: float) -> None:
    """``_ce_rows_kernel`` over the logits chunk ``s [tb, width]`` (columns ``v0..``); ``stats [4, >= tb]``
    f32 = reference, running sum, running max, label logit per row (started at ``v0 == 0``). With an
    ``acc [>= tb, H]`` the chunk becomes P in place (and acc rows are rescaled when needed); without,
    only the stats are kept."""
    tb, width = s.shape
    _ce_rows_kernel[(triton.cdiv(tb, cfg.rows_m),)](
        s, labels, s if acc is None else acc, stats[0], stats[2], stats[1], stats[3],
        tb, 1 if acc is None else acc.shape[-1], v0, width, s.stride(0), softcap, int(v0 == 0),
        BLOCK_R=cfg.rows_m, BLOCK_C=_rows_block(cfg, width), SOFTCAP=softcap > 0,
        TAU=_tau(s.dtype), WRITE_P=acc is not None, PREFETCH=cfg.rows_prefetch, REVERSE=cfg.rows_reverse,
        num_warps=cfg.rows_warps,
    )


@dataclass
class _SplitRun:
    """One split-schedule call: its plan (``_split_plan``), buffers, and how many columns of its first
    T-block were queued before the supervised count was known (``_split_speculate``)."""

    plan: tuple  # (Tb, Vc, gather, rows of the first T-block): ``_split_key``
    s_buf: torch.Tensor  # S / P chunks [Tb * Vc]
    h_buf: Optional[torch.Tensor]  # gathered rows [Tb, H] (gather)
    acc: torch.Tensor  # [Tb, H] f32 (need_dh)
    stats: torch.Tensor  # [4, Tb] f32: reference, running sum, running max, label logit
    sk_sync: Optional[torch.Tensor]  # the stream-K kernel's scratch (cfg.mm2 == "streamk")
    done: int = 0


def _split_key(T: int, Tc: int, H: int, V: int, itemsize: int, cfg: CEConfig, need_dh: bool) -> tuple:
    """The split schedule's plan for ``Tc`` of ``T`` rows supervised: ``(Tb, Vc, gather, rows of the first
    T-block)``. Rows are gathered per T-block unless every token is supervised (then plain slices)."""
    Tb, Vc = _split_plan(T, Tc, H, V, itemsize, cfg, need_dh)
    return Tb, Vc, Tc != T, min(Tb, Tc)


def _split_setup(hidden: torch.Tensor, weight: torch.Tensor, Tc: int, cfg: CEConfig, need_dh: bool) -> _SplitRun:
    (T, H), V, dev = hidden.shape, weight.shape[0], hidden.device
    plan = _split_key(T, Tc, H, V, hidden.element_size(), cfg, need_dh)
    Tb, Vc, gather, _ = plan
    return _SplitRun(
        plan, _empty((Tb * Vc,), hidden.dtype, dev), _empty((Tb, H), hidden.dtype, dev) if gather else None,
        _empty((Tb, H) if need_dh else (1,), torch.float32, dev), _empty((4, Tb), torch.float32, dev),
        _mm2_sync(Tb, H, cfg, dev) if need_dh and cfg.mm2 == "streamk" else None,  # zero again after every launch
    )


def _split_chunks(run: _SplitRun, weight, h_blk, l_blk, v_from: int, v_to: int, cfg: CEConfig, sc: float,
                  need_dh: bool, err) -> None:
    """Queue one T-block's chunks (``h_blk [tb, H]``, labels ``l_blk``) over columns ``[v_from, v_to)``:
    ``S = h @ W[chunk]^T``, the row pass (S becomes P in place), ``acc (=|+=) P @ W[chunk]``."""
    tb, V = h_blk.shape[0], weight.shape[0]
    Tb, Vc = run.plan[:2]
    vc = _block_cols(tb, Tb, Vc, V)
    acc = run.acc[:tb]
    for v0 in range(v_from, v_to, vc):
        width = min(vc, V - v0)
        s = run.s_buf[:tb * width].view(tb, width)  # contiguous for cuBLAS, also the last chunk
        w_chunk = weight[v0:v0 + width]
        torch.mm(h_blk, w_chunk.t(), out=s)
        _rows_pass(s, l_blk, run.acc if need_dh else None, run.stats, v0, cfg, sc)
        if run.sk_sync is not None:
            _mm2_streamk(acc, s, w_chunk, v0 > 0, cfg, sync=run.sk_sync, err=err)
        elif need_dh:
            _mm_f32(acc, s, w_chunk, accumulate=v0 > 0)


def _split_rows(run: _SplitRun, hidden, rows, t0: int, tb: int) -> torch.Tensor:
    """T-block ``[t0, t0 + tb)``'s rows of hidden: gathered into ``h_buf``, or a plain slice."""
    return torch.index_select(hidden, 0, rows[t0:t0 + tb], out=run.h_buf[:tb]) if run.plan[2] else hidden[t0:t0 + tb]


_TC_SEEN: dict = {}  # _tc_key -> the supervised count the last such call had


def _tc_key(hidden: torch.Tensor, weight: torch.Tensor, need_dh: bool) -> tuple:
    return hidden.device, *hidden.shape, weight.shape[0], hidden.dtype, need_dh


def _split_speculate(hidden, weight, c: _Compacted, cfg: CEConfig, softcap: float, need_dh: bool) -> Optional[_SplitRun]:
    """Before the host waits for the supervised count: set up the plan the last call of this shape had
    and queue its first T-block's first ``cfg.spec_chunks`` chunks, so the GPU works while the host
    wakes up from the sync and plans (the gap was ~0.3 ms a call at the key shape). The rows gathered
    are ``c.rows[:tb]``: the supervised ones first, then others (a permutation, so always in bounds).
    ``_split_adopt`` keeps the run when the count gives the same plan; otherwise that work is wasted."""
    V = weight.shape[0]
    Tc = _TC_SEEN.get(_tc_key(hidden, weight, need_dh), hidden.shape[0])
    if not cfg.spec_chunks or Tc == 0:
        return None
    run = _split_setup(hidden, weight, Tc, cfg, need_dh)
    Tb, Vc, _, tb = run.plan
    h_blk = _split_rows(run, hidden, c.rows, 0, tb)
    run.done = min(V, cfg.spec_chunks * _block_cols(tb, Tb, Vc, V))
    _split_chunks(run, weight, h_blk, c.lab_c[:tb], 0, run.done, cfg, float(softcap), need_dh, c.err)
    return run


def _split_adopt(run: Optional[_SplitRun], hidden, weight, Tc: int, cfg: CEConfig, need_dh: bool) -> Optional[_SplitRun]:
    """After the count: ``run`` if its plan is the one for ``Tc`` (else None: the caller sets up anew),
    and remember ``Tc`` for this shape's next call."""
    (T, H), V = hidden.shape, weight.shape[0]
    if len(_TC_SEEN) > 256:
        _TC_SEEN.clear()
    _TC_SEEN[_tc_key(hidden, weight, need_dh)] = Tc
    if run is None or Tc == 0 or run.plan != _split_key(T, Tc, H, V, hidden.element_size(), cfg, need_dh):
        return None
    return run


def _forward_split(hidden, weight, rows, rows32, lab_c, tw_c, cfg: CEConfig, softcap: float, return_correct: bool,
                   need_dh: bool, lse, correct, dh, err, run: Optional[_SplitRun] = None) -> torch.Tensor:
    """The split schedule (16-bit ``hidden`` and ``weight`` of one dtype); fills ``lse``, ``correct``, ``dh``
    and returns ``num``. Per T-block and vocabulary chunk: ``S = h @ W[chunk]^T`` (cuBLAS, in the
    inputs' dtype, the precision of a plain torch lm_head), ``_ce_rows_kernel`` (stats, and ``S``
    becomes ``P`` in place), ``acc += P @ W[chunk]`` (cuBLAS, or ``cfg.mm2 == "streamk"``: the stream-K
    kernel; f32 accumulate). Rows are gathered per T-block unless every token is supervised. ``run``:
    ``_split_speculate``'s, its first chunks already queued (``_split_adopt`` checked its plan)."""
    V = weight.shape[0]
    Tc = rows.numel()
    if run is None:
        run = _split_setup(hidden, weight, Tc, cfg, need_dh)
    Tb = run.plan[0]
    ref, s_run, m_max, z_lab = run.stats
    loss_c = _empty((Tc,), torch.float32, hidden.device)
    sc = float(softcap)
    for t0 in range(0, Tc, Tb):
        tb = min(Tb, Tc - t0)
        r_blk, l_blk, w_blk = rows32[t0:t0 + tb], lab_c[t0:t0 + tb], tw_c[t0:t0 + tb]
        v_from = run.done if t0 == 0 else 0
        if v_from and run.plan[2]:  # gathered before the count
            h_blk = run.h_buf[:tb]
        else:
            h_blk = _split_rows(run, hidden, rows, t0, tb)
        _split_chunks(run, weight, h_blk, l_blk, v_from, V, cfg, sc, need_dh, err)
        _finalize(weight, (r_blk, l_blk, w_blk), z_lab, run.acc, (ref, s_run, m_max), err, dh, lse, loss_c[t0:t0 + tb],
                  correct, sc, cfg, need_dh, return_correct)
    return loss_c.sum()


@dataclass
class _Compacted:
    """``_compact``'s outputs, all ``[T]``: ``rows`` (int64) / ``rows32``, labels (int32) and weights (f32),
    supervised first (``_ce_compact_kernel``); ``den`` (0-dim), zeroed ``lse``, ``correct`` (empty unless
    asked) and ``err [1]``; ``count`` = (Tc, bad labels), being copied to the host (``_host_copy``)."""

    rows: torch.Tensor
    rows32: torch.Tensor
    lab_c: torch.Tensor
    tw_c: torch.Tensor
    den: torch.Tensor
    lse: torch.Tensor
    correct: torch.Tensor
    err: torch.Tensor
    count: tuple

    def first(self, Tc: int) -> tuple:
        """The supervised rows' ``rows [Tc]``, ``rows32``, labels and weights."""
        return self.rows[:Tc], self.rows32[:Tc], self.lab_c[:Tc], self.tw_c[:Tc]


def _compact(labels: torch.Tensor, tw: torch.Tensor, V: int, return_correct: bool = False) -> _Compacted:
    """One launch (``_ce_compact_kernel``) and the count's copy to the host, not waited for: the caller
    may queue work before ``_count`` waits (the split schedule's first chunk, ``_split_speculate``)."""
    T, dev = tw.numel(), tw.device
    i64, i32, f32 = torch.int64, torch.int32, torch.float32
    rows, rows32 = torch.empty(T, dtype=i64, device=dev), torch.empty(T, dtype=i32, device=dev)
    lab_c, tw_c = torch.empty(T, dtype=i32, device=dev), torch.empty(T, dtype=f32, device=dev)
    den, lse = torch.empty((), dtype=f32, device=dev), torch.empty(T, dtype=f32, device=dev)
    correct = torch.empty(T if return_correct else 0, dtype=torch.bool, device=dev)
    err, count = torch.empty(1, dtype=i32, device=dev), torch.empty(2, dtype=i64, device=dev)
    _ce_compact_kernel[(1,)](
        tw.contiguous(), labels.contiguous(), rows, rows32, lab_c, tw_c, lse, correct.view(torch.int8), err, den, count,
        T, V, BLOCK=1024, RETURN_CORRECT=return_correct, num_warps=4,
    )
    return _Compacted(rows, rows32, lab_c, tw_c, den, lse, correct, err, _host_copy(count))


def _count(c: _Compacted, labels: torch.Tensor, tw: torch.Tensor, V: int) -> int:
    """The op's ONE host sync: wait for ``c.count`` -> ``Tc``; it also validates the supervised labels
    (``set_validation``: "sync" and "async" raise the ValueError here, since the count is read anyway;
    "off" skips it)."""
    Tc, n_bad = _host_wait(c.count)
    if n_bad and validation_mode() != "off":
        raise_range_error("labels", labels, 0, V, where=tw > 0)
    return Tc


def _supervised(labels: torch.Tensor, tw: torch.Tensor, V: int, return_correct: bool = False):
    """``_compact`` and ``_count`` in one -> ``Tc``, ``rows [Tc]`` int64, ``rows32``, their labels (int32)
    and weights (f32), ``den = Σ tw`` (0-dim), and zeroed ``lse [T]`` f32, ``correct [T]`` bool (empty
    unless return_correct) and ``err [1]`` int32 for the forward to fill."""
    c = _compact(labels, tw, V, return_correct)
    Tc = _count(c, labels, tw, V)
    return (Tc, *c.first(Tc), c.den, c.lse, c.correct, c.err)


def _host_copy(t: torch.Tensor) -> tuple:
    """``t``'s copy into pinned host memory, queued with an event after it (``_host_wait`` waits for it)."""
    if not t.is_cuda:
        return (t, None)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)  # queued on t's device's current stream (not necessarily the current device)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(t.device))
    return (host, ev)


def _host_wait(pending: tuple) -> list:
    """The host waits for ``_host_copy``'s copy only (not for what was queued after it) -> ``tolist()``."""
    host, ev = pending
    if ev is not None:
        ev.synchronize()
    return host.tolist()


def _forward(hidden, weight, labels, token_weights, softcap: float, return_correct: bool, need_dh: bool):
    _check_inputs(hidden, weight)
    dev = hidden.device
    T, H = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    # the finalize writes every supervised row of dh: zeros only for the rest, after the sync (the
    # count's kernel no longer waits behind a T x H fill; none when every token is supervised)
    dh = _empty(hidden.shape, hidden.dtype, dev) if need_dh else hidden.new_empty((0,))
    dot_dtype = _dot_dtype(hidden, weight)
    cfg = _config(dev, dot_dtype)
    split = cfg.schedule == "split" and hidden.dtype == weight.dtype != torch.float32
    c = _compact(labels, token_weights, V, return_correct)
    run = _split_speculate(hidden, weight, c, cfg, softcap, need_dh) if split else None
    # the one host sync: Tc sizes every grid below
    Tc = _count(c, labels, token_weights, V)
    rows, rows32, lab_c, tw_c = c.first(Tc)
    den, lse, correct, err = c.den, c.lse, c.correct, c.err
    if split:
        run = _split_adopt(run, hidden, weight, Tc, cfg, need_dh)
    if need_dh and Tc < T:
        dh.zero_()
    if Tc == 0:
        return torch.zeros((), dtype=f32, device=dev), den, lse, correct, dh
    if split:
        num = _forward_split(hidden, weight, rows, rows32, lab_c, tw_c, cfg, softcap, return_correct, need_dh,
                             lse, correct, dh, err, run)
        return num, den, lse, correct, dh
    p_dtype = weight.dtype  # P meets W in the second matmul
    Tb, Vc = _plan(Tc, H, V, p_dtype.itemsize, cfg, need_dh)
    n_chunks = triton.cdiv(V, Vc)
    n_cols = triton.cdiv(Vc, cfg.block_n)
    p_buf = _empty((Tb, Vc) if need_dh else (1,), p_dtype, dev)
    s_max = _empty((n_cols, Tb), f32, dev)
    s_sum = _empty((n_cols, Tb), f32, dev)
    z_lab = _empty((Tb,), f32, dev)
    acc = _empty((Tb, H) if need_dh else (1,), f32, dev)
    m_run = _empty((2, Tb), f32, dev)
    s_run = _empty((2, Tb), f32, dev)
    loss_c = _empty((Tc,), f32, dev)
    sc = float(softcap)
    common = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SOFTCAP=sc > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    even_k = H % cfg.block_k == 0
    n_th = triton.cdiv(H, cfg.block_h) if need_dh else 1
    sync = torch.zeros(1 + 2 * n_chunks * triton.cdiv(Tb, cfg.block_m), dtype=torch.int32, device=dev)
    for t0 in range(0, Tc, Tb):
        tb = min(Tb, Tc - t0)
        r_blk, l_blk, w_blk = rows32[t0:t0 + tb], lab_c[t0:t0 + tb], tw_c[t0:t0 + tb]
        n_tm = triton.cdiv(tb, cfg.block_m)
        if t0:
            sync.zero_()
        # one program per tile; a program claims its tile when it starts, so whatever it waits for
        # is held by a program that is already running (the interpreter runs them in claim order)
        total = n_chunks * n_tm * (n_cols + n_th)
        _ce_block_kernel[(total,)](
            hidden, weight, r_blk, l_blk, p_buf, s_max, s_sum, z_lab, acc, m_run, s_run, sync, err,
            tb, H, V, Vc, sc, n_chunks,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            BLOCK_H=cfg.block_h, GROUP_M=8, EVEN_K=even_k, DOT_DTYPE=_TL_DTYPE[dot_dtype],
            IEEE_A=dot_dtype == f32, IEEE_B=p_dtype == f32, WRITE_P=need_dh, TAU=_tau(p_dtype),
            SPIN=1 << 24, **common,
        )
        last = (n_chunks - 1) % 2
        m_fin = m_run.view(-1)[last * tb:(last + 1) * tb]  # the kernels index [2, tb], not [2, Tb]
        s_fin = s_run.view(-1)[last * tb:(last + 1) * tb]
        _finalize(weight, (r_blk, l_blk, w_blk), z_lab, acc, (m_fin, s_fin, m_fin), err, dh, lse, loss_c[t0:t0 + tb],
                  correct, sc, cfg, need_dh, return_correct)
    return loss_c.sum(), den, lse, correct, dh


def decayed_ce_fwd(hidden, weight, labels, token_weights, opts):
    """-> ``num`` (0-dim f32), ``den`` (0-dim f32), ``lse [T]`` f32 (0 where unsupervised), ``correct [T]`` bool or empty."""
    num, den, lse, correct, _ = _forward(hidden, weight, labels, token_weights, opts.softcap, opts.return_correct, False)
    return num, den, lse, correct


def decayed_ce_fwd_with_grad(hidden, weight, labels, token_weights, opts):
    """As ``decayed_ce_fwd``, plus ``dh_unit [T, H]`` (hidden's dtype): ``d num / d hidden`` (scale by grad_num)."""
    return _forward(hidden, weight, labels, token_weights, opts.softcap, opts.return_correct, True)


def _dweight(grad_num, hidden, weight, labels, token_weights, lse, softcap: float) -> torch.Tensor:
    """``dW = Σ_t g w_t (softmax_t - onehot_t) softcap'_t h_t^T``, one vocabulary chunk at a time."""
    dev = hidden.device
    T, H = hidden.shape
    V = weight.shape[0]
    Tc, rows, rows32, lab_c, tw_c = _supervised(labels, token_weights, V)[:5]  # host sync for the count, as in the forward
    if Tc == 0:
        return torch.zeros_like(weight)
    dot_dtype = _dot_dtype(hidden, weight)
    cfg = _config(dev, dot_dtype)
    h_c = hidden[rows].to(dot_dtype)  # [Tc, H]: the K operand of dW = D^T @ h
    bn = cfg.block_n
    Vc = max(bn, cfg.budget // 2 // (Tc * dot_dtype.itemsize) // bn * bn)
    Vc = min(Vc, triton.cdiv(V, bn) * bn)
    # the split schedule's lse comes from logits rounded to the inputs' dtype: dlogits must see the same
    split = cfg.schedule == "split" and hidden.dtype == weight.dtype != torch.float32
    d_buf = _empty((Tc * Vc,), dot_dtype, dev)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev)  # contiguous: mm writes row slices
    mixed = dot_dtype != weight.dtype
    dw_chunk = _empty((Vc, H), dot_dtype, dev) if mixed else None  # f32 product, cast per chunk
    g = grad_num.to(torch.float32).reshape(1)
    sc = float(softcap)
    if split:
        # which rounding of a logit cuBLAS returns depends on the call's shape, and the forward's
        # chunks differ from these: lse is recomputed from exactly the calls the pass below repeats
        stats = _empty((4, Tc), torch.float32, dev)
        for v0 in range(0, V, Vc):
            d = d_buf[:Tc * min(Vc, V - v0)].view(Tc, -1)
            torch.mm(h_c, weight[v0:v0 + d.shape[1]].t(), out=d)
            _rows_pass(d, lab_c, None, stats, v0, cfg, sc)
        lse_c = stats[0] + torch.log(stats[1])
    for v0 in range(0, V, Vc):
        width = min(Vc, V - v0)
        d = d_buf[:Tc * width].view(Tc, width)
        if split:
            torch.mm(h_c, weight[v0:v0 + width].t(), out=d)
            _ce_dlogits_rows_kernel[(triton.cdiv(Tc, cfg.rows_m),)](
                d, lab_c, tw_c, lse_c, g, Tc, v0, width, d.stride(0), sc,
                BLOCK_R=cfg.rows_m, BLOCK_C=_rows_block(cfg, width), SOFTCAP=sc > 0, num_warps=cfg.rows_warps,
            )
        else:
            grid = (triton.cdiv(Tc, cfg.block_m), triton.cdiv(width, bn))
            _ce_dlogits_kernel[grid](
                hidden, weight, rows32, lab_c, tw_c, lse, d, g,
                Tc, H, V, v0, width, sc,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), d.stride(0),
                BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=cfg.block_k, EVEN_K=H % cfg.block_k == 0,
                SOFTCAP=sc > 0, DOT_DTYPE=_TL_DTYPE[dot_dtype], IEEE=dot_dtype == torch.float32,
                num_warps=cfg.num_warps, num_stages=min(cfg.num_stages, 3),  # 3: the depth checked on the H200
            )
        if mixed:
            torch.mm(d.t(), h_c, out=dw_chunk[:width])
            dw[v0:v0 + width].copy_(dw_chunk[:width])
        else:
            torch.mm(d.t(), h_c, out=dw[v0:v0 + width])
    return dw


def decayed_ce_bwd(grad_num, hidden, weight, labels, token_weights, lse, opts, need_dhidden: bool, need_dweight: bool):
    """-> ``dhidden`` like hidden (empty if not needed), ``dweight`` like weight (empty if not needed)."""
    _check_inputs(hidden, weight)
    dh = hidden.new_empty((0,))
    dw = weight.new_empty((0,))
    if need_dhidden:
        # the forward-with-grad pass gives d num / d hidden; backward only scales it
        dh_unit = _forward(hidden, weight, labels, token_weights, opts.softcap, False, True)[4]
        dh = dh_unit * grad_num.to(torch.float32)
    if need_dweight:
        dw = _dweight(grad_num, hidden, weight, labels, token_weights, lse, opts.softcap)
    return dh, dw
