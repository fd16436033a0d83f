"""Triton kernels and host launchers of ``varprefix_attention``.

Layout of the work. Blocks are visited in anchor order: the launchers sort the anchors of each
sample (dummies first, as -1) and the kernels read slots through that permutation, so the blocks
of one query tile have close anchors and their context key tiles are unmasked except near the
boundary. A query tile packs the ``G = Hq // Hkv`` heads of one GQA group over consecutive sorted
slots: row ``r`` is (sorted slot ``t0 + r // G``, head ``hkv * G + r % G``), so every K/V tile is
loaded once per group. The own-block (draft) keys of a tile are one short extra loop.

Backward, ``deterministic=True`` (the default; no atomics, bitwise repeatable), two launches:
- ``dq`` kernel: per query tile, like the forward; it also writes ``delta = rowsum(o * do)``.
- ``dk/dv`` kernel, two tile roles in one launch: context key tiles ``[j0, j0 + BLOCK_N)``, over
  exactly the sorted blocks whose anchor is ``> j0`` (a suffix in sorted order, found by binary
  search), masked only for the blocks whose anchor falls inside the tile; then draft key tiles
  (sorted draft slots), over the queries of the same blocks.
``deterministic=False`` (FlashAttention-2): a first pass writes ``delta`` and zeroes an fp32 ``dq``;
the same ``dk/dv`` kernel adds each tile pair's ``dq`` share atomically (5 matmuls per pair
instead of 7). On an H200 its atomics cost more than the two matmuls saved.

Softmax runs in base 2 (``qk_scale = scale * log2(e)``); ``lse`` is stored in natural log,
``-inf`` for dummy rows (no visible key). fp32 inputs use IEEE fp32 dots (no tf32).

Tile sizes come from ``pick_tiles`` (tests monkeypatch it); ``Tiles.split_ds`` (ds as hi + lo
halves) and ``Tiles.presort`` (off: measured no faster) are per-kernel options. The sort itself
usually comes from the caller (``sorted_blocks``, a ``VarPrefixLayout``'s tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["varprefix_attention_fwd", "varprefix_attention_bwd", "Tiles", "TILE_TABLES", "pick_tiles"]

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """Tile shape of one kernel: ``block_m`` query rows ((slot, head) pairs), ``block_n`` keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split_ds: bool = False  # 16-bit inputs: ds as hi + lo halves (one more dot, ~fp32-accurate dk/dq)
    presort: bool = False  # context dk/dv: copy q, do to sorted slot order first (no gathered loads)


# Per kernel kind, by head_dim bucket (the smallest key >= D; fp32 above 128 uses the next bucket:
# its tiles take twice the shared memory). The 128 row was swept on an H200 (bf16, B=7, G=4; see
# benchmarks/RESULTS_attention.md); the others are sized to fit and were checked for correctness.
TILE_TABLES = {
    64: {"fwd": Tiles(128, 64, 4, 3), "dq": Tiles(128, 64, 4, 3),
         "dkdv": Tiles(64, 128, 8, 3), "dkdv_draft": Tiles(64, 32, 4, 2, True),
         "dkdv_atomic": Tiles(32, 128, 8, 3), "dkdv_draft_atomic": Tiles(64, 32, 8, 2)},
    128: {"fwd": Tiles(128, 64, 8, 3), "dq": Tiles(128, 64, 8, 3),
          "dkdv": Tiles(32, 128, 8, 3), "dkdv_draft": Tiles(64, 32, 8, 2),
          "dkdv_atomic": Tiles(64, 128, 8, 2), "dkdv_draft_atomic": Tiles(64, 32, 8, 2)},
    256: {"fwd": Tiles(64, 64, 4, 2), "dq": Tiles(64, 32, 4, 2),
          "dkdv": Tiles(32, 64, 4, 2), "dkdv_draft": Tiles(32, 32, 4, 1, True),
          "dkdv_atomic": Tiles(32, 64, 8, 2), "dkdv_draft_atomic": Tiles(32, 32, 4, 1)},
    512: {"fwd": Tiles(32, 32, 4, 1), "dq": Tiles(32, 16, 4, 1),
          "dkdv": Tiles(16, 32, 8, 1), "dkdv_draft": Tiles(16, 16, 4, 1, True),
          "dkdv_atomic": Tiles(16, 32, 8, 1), "dkdv_draft_atomic": Tiles(16, 16, 4, 1)},
    1024: {"fwd": Tiles(16, 16, 4, 1), "dq": Tiles(16, 16, 4, 1),
           "dkdv": Tiles(16, 16, 8, 1), "dkdv_draft": Tiles(16, 16, 4, 1, True),
           "dkdv_atomic": Tiles(16, 16, 8, 1), "dkdv_draft_atomic": Tiles(16, 16, 4, 1)},
}


def fit_group(t: Tiles, G: int) -> Tiles:
    """``t`` with at least 16 query rows and one whole GQA group per tile row block."""
    return Tiles(max(t.block_m, 16 * ((G + 15) // 16)), t.block_n, t.num_warps, t.num_stages, t.split_ds, t.presort)


def pick_tiles(kind: str, D: int, B: int, G: int, dtype: torch.dtype) -> Tiles:
    """Tile sizes of kernel ``kind`` in ("fwd", "dq", "dkdv", "dkdv_draft", "dkdv_atomic",
    "dkdv_draft_atomic") for head_dim ``D``."""
    bucket = next((k for k in TILE_TABLES if D <= k), 1024)
    if dtype == torch.float32 and bucket > 128:
        bucket = min(2 * bucket, 1024)
    t = TILE_TABLES[bucket][kind]
    if dtype == torch.float32 and bucket == 128 and kind in ("dq", "dkdv", "dkdv_atomic"):
        t = Tiles(t.block_m, t.block_n, t.num_warps, 2, t.split_ds, t.presort)  # fp32: fewer stages fit
    return fit_group(t, G)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, m_rows, m_d, ROWS_MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile, masking only what may be out of bounds."""
    if ROWS_MASKED:
        if EVEN_D:
            x = tl.load(ptrs, mask=m_rows[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=m_d[None, :], other=0.0)
    return x


@triton.jit
def _count_le(ptr, n, x):
    """Number of entries ``<= x`` in the sorted int array ``ptr[0:n]`` (binary search)."""
    lo = tl.zeros([], tl.int32)  # not ``0``: a Python int would change type inside the loop
    hi = tl.zeros([], tl.int32) + n
    while lo < hi:
        mid = (lo + hi) // 2
        le = tl.load(ptr + mid) <= x
        lo = tl.where(le, mid + 1, lo)
        hi = tl.where(le, hi, mid)
    return lo


@triton.jit
def _query_rows(SANC, PERM, b_n, t0, NB, G: tl.constexpr, BLK: tl.constexpr, SLOTS: tl.constexpr,
                BLOCK_M: tl.constexpr, SORTED: tl.constexpr = False):
    """Rows of a query tile starting at sorted slot ``t0``: (sorted block, slot, head, anchor, flags).

    SORTED: the query-side tensors are already in sorted slot order, so ``slot`` is ``t``."""
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // G  # [BLOCK_M] sorted slot
    valid = (r // G < SLOTS) & (t < NB)
    sb = tl.where(valid, t // BLK, 0)  # [BLOCK_M] sorted block
    sanc = tl.load(SANC + b_n + sb)
    kept = valid & (sanc >= 0)
    anc = tl.where(kept, sanc, 0)
    if SORTED:
        slot = t
    else:
        slot = tl.load(PERM + b_n + sb) * BLK + t % BLK  # [BLOCK_M] slot in memory
    return sb, slot, r % G, anc, valid, kept


@triton.jit
def _ctx_bounds(anc, kept, S, BLOCK_N: tl.constexpr):
    """Context key tiles of a query tile: ``[0, full_end)`` visible to every kept row (no mask),
    ``[full_end, a_max)`` the boundary tiles (mask ``key < anchor``)."""
    a_max = tl.max(anc, 0)
    a_min = tl.minimum(tl.min(tl.where(kept, anc, S), 0), a_max)
    return (a_min // BLOCK_N) * BLOCK_N, a_max


@triton.jit
def _block_span(first, count, NB, BLK: tl.constexpr):
    """Sorted slots ``[lo, hi)`` of the whole blocks that sorted slots ``[first, first + count)`` touch."""
    return (first // BLK) * BLK, tl.minimum(((tl.minimum(first + count, NB) - 1) // BLK + 1) * BLK, NB)


@triton.jit
def _draft_keys(KD, VD, PERM, b_n, base_k, base_v, stride_kdt, stride_vdt, tk, hi, o_d, m_d,
                BLK: tl.constexpr, EVEN_D: tl.constexpr):
    """Draft keys at sorted slots ``tk [BLOCK_N]`` (``< hi``), gathered from memory order:
    -> ``m_k``, sorted block ``sbk``, ``k``, ``v [BLOCK_N, BLOCK_D]``."""
    m_k = tk < hi
    sbk = tl.where(m_k, tk // BLK, 0)
    slot_k = tl.load(PERM + b_n + sbk) * BLK + tk % BLK  # [BLOCK_N] slot in memory
    k = _load_rows(KD + base_k + slot_k[:, None] * stride_kdt + o_d[None, :], m_k, m_d, True, EVEN_D)
    v = _load_rows(VD + base_v + slot_k[:, None] * stride_vdt + o_d[None, :], m_k, m_d, True, EVEN_D)
    return m_k, sbk, slot_k, k, v


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _varprefix_fwd_kernel(
    Q, KC, VC, KD, VD, O, LSE, SANC, PERM,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_kdb, stride_kdt, stride_kdh,
    stride_vdb, stride_vdt, stride_vdh,
    stride_ob, stride_ot, stride_oh,
    S, N, NB, HKV, qk_scale,
    G: tl.constexpr, BLK: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # latest anchors (most work) first
    b = (pid_bh // HKV).to(tl.int64)
    hkv = pid_bh % HKV
    t0 = tile * SLOTS
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    sb, slot, head, anc, valid, kept = _query_rows(SANC, PERM, b * N, t0, NB, G, BLK, SLOTS, BLOCK_M)
    hq = hkv * G + head  # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)

    p_q = Q + b * stride_qb + slot[:, None] * stride_qt + hq[:, None] * stride_qh + o_d[None, :]
    q = _load_rows(p_q, valid, m_d, True, EVEN_D)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Context keys j < anchor: unmasked tiles below the smallest anchor, then the boundary.
    full_end, a_max = _ctx_bounds(anc, kept, S, BLOCK_N)
    p_kc = KC + b * stride_kcb + hkv * stride_kch + o_n[:, None] * stride_kcs + o_d[None, :]
    p_vc = VC + b * stride_vcb + hkv * stride_vch + o_n[:, None] * stride_vcs + o_d[None, :]
    for j in range(0, full_end, BLOCK_N):
        k = _load_rows(p_kc + j * stride_kcs, o_n, m_d, False, EVEN_D)  # [BLOCK_N, BLOCK_D]
        v = _load_rows(p_vc + j * stride_vcs, o_n, m_d, False, EVEN_D)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, None, False, DOT_PREC)
    for j in range(full_end, a_max, BLOCK_N):
        kn = j + o_n  # [BLOCK_N] context position
        k = _load_rows(p_kc + j * stride_kcs, kn < S, m_d, True, EVEN_D)
        v = _load_rows(p_vc + j * stride_vcs, kn < S, m_d, True, EVEN_D)
        vis = kn[None, :] < anc[:, None]  # [BLOCK_M, BLOCK_N]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC)

    # Own-block draft keys: the sorted slots of the blocks this tile touches.
    d_lo, d_hi = _block_span(t0, SLOTS, NB, BLK)
    for j in range(d_lo, d_hi, BLOCK_N):
        m_k, sbk, _, k, v = _draft_keys(KD, VD, PERM, b * N, b * stride_kdb + hkv * stride_kdh,
                                        b * stride_vdb + hkv * stride_vdh, stride_kdt, stride_vdt,
                                        j + o_n, d_hi, o_d, m_d, BLK, EVEN_D)
        vis = (sbk[None, :] == sb[:, None]) & m_k[None, :] & kept[:, None]
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC)

    # Dummy rows may have summed unmasked tiles above: their output is defined as 0.
    l_safe = tl.where(kept, l_i, 1.0)
    o = tl.where(kept[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(kept, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    p_o = O + b * stride_ob + slot[:, None] * stride_ot + hq[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, o.to(O.dtype.element_ty), mask=valid[:, None] & m_d[None, :])
    tl.store(LSE + (b * (HKV * G) + hq) * NB + slot, lse, mask=valid)


@triton.jit
def _dot_split(x, y, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``x @ y`` with fp32 ``x`` rounded to ``y``'s dtype; SPLIT adds the rounding remainder."""
    x_hi = x.to(y.dtype)
    r = tl.dot(x_hi, y, input_precision=DOT_PREC)
    if SPLIT:
        r += tl.dot((x - x_hi.to(tl.float32)).to(y.dtype), y, input_precision=DOT_PREC)
    return r


@triton.jit
def _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, MASKED: tl.constexpr, SPLIT: tl.constexpr,
             DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    return dq + _dot_split(ds, k, SPLIT, DOT_PREC)


@triton.jit
def _varprefix_bwd_dq_kernel(
    Q, KC, VC, KD, VD, O, DO, LSE, DELTA, DQ, SANC, PERM,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_kdb, stride_kdt, stride_kdh,
    stride_vdb, stride_vdt, stride_vdh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    S, N, NB, HKV, scale, qk_scale,
    G: tl.constexpr, BLK: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hkv = pid_bh % HKV
    t0 = tile * SLOTS
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    sb, slot, head, anc, valid, kept = _query_rows(SANC, PERM, b * N, t0, NB, G, BLK, SLOTS, BLOCK_M)
    hq = hkv * G + head
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)

    q = _load_rows(Q + b * stride_qb + slot[:, None] * stride_qt + hq[:, None] * stride_qh + o_d[None, :],
                   valid, m_d, True, EVEN_D)  # [BLOCK_M, BLOCK_D]
    do = _load_rows(DO + b * stride_dob + slot[:, None] * stride_dot + hq[:, None] * stride_doh + o_d[None, :],
                    valid, m_d, True, EVEN_D)
    o = _load_rows(O + b * stride_ob + slot[:, None] * stride_ot + hq[:, None] * stride_oh + o_d[None, :],
                   valid, m_d, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    p_row = (b * (HKV * G) + hq) * NB + slot
    tl.store(DELTA + p_row, delta, mask=valid)
    # +inf for dummy rows makes every p exactly 0 there, so they get and give no gradient.
    lse2 = tl.where(kept, tl.load(LSE + p_row, mask=valid, other=0.0) * 1.4426950408889634, float("inf"))

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, a_max = _ctx_bounds(anc, kept, S, BLOCK_N)
    p_kc = KC + b * stride_kcb + hkv * stride_kch + o_n[:, None] * stride_kcs + o_d[None, :]
    p_vc = VC + b * stride_vcb + hkv * stride_vch + o_n[:, None] * stride_vcs + o_d[None, :]
    for j in range(0, full_end, BLOCK_N):
        k = _load_rows(p_kc + j * stride_kcs, o_n, m_d, False, EVEN_D)  # [BLOCK_N, BLOCK_D]
        v = _load_rows(p_vc + j * stride_vcs, o_n, m_d, False, EVEN_D)
        dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, None, False, SPLIT, DOT_PREC)
    for j in range(full_end, a_max, BLOCK_N):
        kn = j + o_n
        k = _load_rows(p_kc + j * stride_kcs, kn < S, m_d, True, EVEN_D)
        v = _load_rows(p_vc + j * stride_vcs, kn < S, m_d, True, EVEN_D)
        vis = kn[None, :] < anc[:, None]
        dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, True, SPLIT, DOT_PREC)

    d_lo, d_hi = _block_span(t0, SLOTS, NB, BLK)
    for j in range(d_lo, d_hi, BLOCK_N):
        m_k, sbk, _, k, v = _draft_keys(KD, VD, PERM, b * N, b * stride_kdb + hkv * stride_kdh,
                                        b * stride_vdb + hkv * stride_vdh, stride_kdt, stride_vdt,
                                        j + o_n, d_hi, o_d, m_d, BLK, EVEN_D)
        vis = (sbk[None, :] == sb[:, None]) & m_k[None, :]
        dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, True, SPLIT, DOT_PREC)

    p_dq = DQ + b * stride_dqb + slot[:, None] * stride_dqt + hq[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None] & m_d[None, :])


@triton.jit
def _dkdv_step(dk, dv, k, v, kn, sbk, Q, DO, LSE, DELTA, SANC, PERM, DQ, b, hkv, t0,
               stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
               stride_dqb, stride_dqt, stride_dqh,
               N, NB, HKV, scale, qk_scale, t_end, m_d,
               G: tl.constexpr, BLK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr,
               DOT_PREC: tl.constexpr, SORTED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """One query tile's share of ``dk, dv [BLOCK_N, BLOCK_D]``; ATOMIC_DQ also adds its share of
    ``dq`` into the fp32 buffer ``DQ`` (the 5th matmul of a FlashAttention-2 backward).

    MODE 0: context keys fully visible; 1: context keys, visible iff ``kn < anchor``;
    2: draft keys, visible iff same sorted block ``sbk``.
    """
    sb, slot, head, anc, valid, kept = _query_rows(SANC, PERM, b * N, t0, t_end, G, BLK, SLOTS, BLOCK_M, SORTED)
    hq = hkv * G + head
    o_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + slot[:, None] * stride_qt + hq[:, None] * stride_qh + o_d[None, :],
                   valid, m_d, True, EVEN_D)  # [BLOCK_M, BLOCK_D]
    do = _load_rows(DO + b * stride_dob + slot[:, None] * stride_dot + hq[:, None] * stride_doh + o_d[None, :],
                    valid, m_d, True, EVEN_D)
    p_row = (b * (HKV * G) + hq) * NB + slot
    lse2 = tl.where(kept, tl.load(LSE + p_row, mask=valid, other=0.0) * 1.4426950408889634, float("inf"))
    delta = tl.load(DELTA + p_row, mask=valid, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.exp2(s_t - lse2[None, :])
    if MODE == 1:
        p_t = tl.where(kn[:, None] < anc[None, :], p_t, 0.0)
    if MODE == 2:
        p_t = tl.where(sbk[:, None] == sb[None, :], p_t, 0.0)
    dv += _dot_split(p_t, do, SPLIT, DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot_split(ds_t, q, SPLIT, DOT_PREC)
    if ATOMIC_DQ:
        dq = _dot_split(tl.trans(ds_t), k, SPLIT, DOT_PREC) * scale  # [BLOCK_M, BLOCK_D]
        p_dq = DQ + b * stride_dqb + slot[:, None] * stride_dqt + hq[:, None] * stride_dqh + o_d[None, :]
        tl.atomic_add(p_dq, dq, mask=valid[:, None] & m_d[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_ctx_tile(
    Q, KC, VC, DO, LSE, DELTA, DK, DV, SANC, PERM, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    S, N, NB, HKV, scale, qk_scale, pid_bh, tile,
    G: tl.constexpr, BLK: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, SORTED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """``dk, dv`` of context keys ``[tile * BLOCK_N, +BLOCK_N)`` (and their dq share if ATOMIC_DQ)."""
    j0 = tile * BLOCK_N  # early key tiles are seen by most blocks: launched first
    b = (pid_bh // HKV).to(tl.int64)
    hkv = pid_bh % HKV
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)
    kn = j0 + o_n  # [BLOCK_N] context position
    m_k = kn < S
    k = _load_rows(KC + b * stride_kcb + hkv * stride_kch + kn[:, None] * stride_kcs + o_d[None, :],
                   m_k, m_d, True, EVEN_D)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(VC + b * stride_vcb + hkv * stride_vch + kn[:, None] * stride_vcs + o_d[None, :],
                   m_k, m_d, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Blocks with anchor > j0 see part of this tile; those with anchor >= j0 + BLOCK_N see all of it.
    t_lo = _count_le(SANC + b * N, N, j0) * BLK
    t_full = _count_le(SANC + b * N, N, j0 + BLOCK_N - 1) * BLK
    t_mid = t_lo + (t_full - t_lo + SLOTS - 1) // SLOTS * SLOTS
    for t0 in range(t_lo, t_mid, SLOTS):
        dk, dv = _dkdv_step(dk, dv, k, v, kn, kn, Q, DO, LSE, DELTA, SANC, PERM, DQ, b, hkv, t0,
                            stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                            stride_dqb, stride_dqt, stride_dqh, N, NB, HKV, scale, qk_scale, NB, m_d,
                            G, BLK, SLOTS, BLOCK_M, BLOCK_D, EVEN_D, 1, SPLIT, DOT_PREC, SORTED, ATOMIC_DQ)
    for t0 in range(t_mid, NB, SLOTS):
        dk, dv = _dkdv_step(dk, dv, k, v, kn, kn, Q, DO, LSE, DELTA, SANC, PERM, DQ, b, hkv, t0,
                            stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                            stride_dqb, stride_dqt, stride_dqh, N, NB, HKV, scale, qk_scale, NB, m_d,
                            G, BLK, SLOTS, BLOCK_M, BLOCK_D, EVEN_D, 0, SPLIT, DOT_PREC, SORTED, ATOMIC_DQ)

    m_st = m_k[:, None] & m_d[None, :]
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + kn[:, None] * stride_dks + o_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=m_st)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + kn[:, None] * stride_dvs + o_d[None, :],
             dv.to(DV.dtype.element_ty), mask=m_st)


@triton.jit
def _dkdv_draft_tile(
    Q, KD, VD, DO, LSE, DELTA, DK, DV, SANC, PERM, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kdb, stride_kdt, stride_kdh,
    stride_vdb, stride_vdt, stride_vdh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    N, NB, HKV, scale, qk_scale, pid_bh, tile,
    G: tl.constexpr, BLK: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """``dk, dv`` of draft keys at sorted slots ``[tile * BLOCK_N, +BLOCK_N)`` (and their dq share)."""
    j0 = tile * BLOCK_N  # first sorted draft slot of this key tile
    b = (pid_bh // HKV).to(tl.int64)
    hkv = pid_bh % HKV
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    tk = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] sorted slot of the key
    m_k, sbk, slot_k, k, v = _draft_keys(KD, VD, PERM, b * N, b * stride_kdb + hkv * stride_kdh,
                                         b * stride_vdb + hkv * stride_vdh, stride_kdt, stride_vdt,
                                         tk, NB, o_d, m_d, BLK, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Only the queries of the same blocks see these keys.
    q_lo, q_hi = _block_span(j0, BLOCK_N, NB, BLK)
    for t0 in range(q_lo, q_hi, SLOTS):
        dk, dv = _dkdv_step(dk, dv, k, v, tk, sbk, Q, DO, LSE, DELTA, SANC, PERM, DQ, b, hkv, t0,
                            stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                            stride_dqb, stride_dqt, stride_dqh, N, NB, HKV, scale, qk_scale, q_hi, m_d,
                            G, BLK, SLOTS, BLOCK_M, BLOCK_D, EVEN_D, 2, SPLIT, DOT_PREC, False, ATOMIC_DQ)

    m_st = m_k[:, None] & m_d[None, :]
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + slot_k[:, None] * stride_dkt + o_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=m_st)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + slot_k[:, None] * stride_dvt + o_d[None, :],
             dv.to(DV.dtype.element_ty), mask=m_st)


@triton.jit
def _varprefix_bwd_dkdv_kernel(
    Q, KC, VC, KD, VD, DO, LSE, DELTA, DKC, DVC, DKD, DVD, SANC, PERM, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_kdb, stride_kdt, stride_kdh,
    stride_vdb, stride_vdt, stride_vdh,
    stride_dob, stride_dot, stride_doh,
    stride_dkcb, stride_dkcs, stride_dkch,
    stride_dvcb, stride_dvcs, stride_dvch,
    stride_dkdb, stride_dkdt, stride_dkdh,
    stride_dvdb, stride_dvdt, stride_dvdh,
    stride_dqb, stride_dqt, stride_dqh,
    S, N, NB, HKV, scale, qk_scale, CTX_TILES,
    G: tl.constexpr, BLK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, SORTED: tl.constexpr,
    SLOTS_C: tl.constexpr, BLOCK_MC: tl.constexpr, BLOCK_NC: tl.constexpr, SPLIT_C: tl.constexpr,
    SLOTS_D: tl.constexpr, BLOCK_MD: tl.constexpr, BLOCK_ND: tl.constexpr, SPLIT_D: tl.constexpr,
):
    """Context key tiles (programs ``< CTX_TILES``, heaviest first), then draft key tiles: one
    launch for every dk/dv (the host cost of a launch is tens of microseconds)."""
    pid_bh = tl.program_id(0)
    tile = tl.program_id(1)
    if tile < CTX_TILES:
        _dkdv_ctx_tile(Q, KC, VC, DO, LSE, DELTA, DKC, DVC, SANC, PERM, DQ,
                       stride_qb, stride_qt, stride_qh, stride_kcb, stride_kcs, stride_kch,
                       stride_vcb, stride_vcs, stride_vch, stride_dob, stride_dot, stride_doh,
                       stride_dkcb, stride_dkcs, stride_dkch, stride_dvcb, stride_dvcs, stride_dvch,
                       stride_dqb, stride_dqt, stride_dqh, S, N, NB, HKV, scale, qk_scale, pid_bh, tile,
                       G, BLK, HEAD_DIM, SLOTS_C, BLOCK_MC, BLOCK_NC, BLOCK_D, SPLIT_C, DOT_PREC, SORTED, ATOMIC_DQ)
    else:
        _dkdv_draft_tile(Q, KD, VD, DO, LSE, DELTA, DKD, DVD, SANC, PERM, DQ,
                         stride_qb, stride_qt, stride_qh, stride_kdb, stride_kdt, stride_kdh,
                         stride_vdb, stride_vdt, stride_vdh, stride_dob, stride_dot, stride_doh,
                         stride_dkdb, stride_dkdt, stride_dkdh, stride_dvdb, stride_dvdt, stride_dvdh,
                         stride_dqb, stride_dqt, stride_dqh, N, NB, HKV, scale, qk_scale, pid_bh, tile - CTX_TILES,
                         G, BLK, HEAD_DIM, SLOTS_D, BLOCK_MD, BLOCK_ND, BLOCK_D, SPLIT_D, DOT_PREC, ATOMIC_DQ)


@triton.jit
def _varprefix_bwd_prep_kernel(
    O, DO, DELTA, DQ,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    NB, HQ, ROWS,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Atomic backward's first pass over rows (b, slot, head): ``delta = rowsum(o * do)`` and the
    fp32 ``dq`` accumulator zeroed."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] row = (b * NB + slot) * HQ + h
    m_r = r < ROWS
    b = (r // (NB * HQ)).to(tl.int64)
    t = (r // HQ) % NB
    h = r % HQ
    o_d = tl.arange(0, BLOCK_D)
    m = m_r[:, None] & (o_d < HEAD_DIM)[None, :]
    o = tl.load(O + (b * stride_ob + t * stride_ot + h * stride_oh)[:, None] + o_d[None, :], mask=m, other=0.0)
    do = tl.load(DO + (b * stride_dob + t * stride_dot + h * stride_doh)[:, None] + o_d[None, :], mask=m, other=0.0)
    tl.store(DELTA + (b * HQ + h) * NB + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_r)
    tl.store(DQ + (b * stride_dqb + t * stride_dqt + h * stride_dqh)[:, None] + o_d[None, :],
             tl.zeros([BLOCK_R, BLOCK_D], tl.float32), mask=m)


@triton.jit
def _rank_sort_kernel(ANC, KEEP, SANC, PERM, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Stable sort of one sample's keys (anchor, -1 for dummies) by rank counting: N is small."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    m_i = i < N
    key_i = tl.where(tl.load(KEEP + b * N + i, mask=m_i, other=0) != 0,
                     tl.load(ANC + b * N + i, mask=m_i, other=0).to(tl.int32), -1)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        m_j = j < N
        key_j = tl.where(tl.load(KEEP + b * N + j, mask=m_j, other=0) != 0,
                         tl.load(ANC + b * N + j, mask=m_j, other=0).to(tl.int32), -1)
        before = (key_j[None, :] < key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & m_j[None, :]).to(tl.int32), 1)  # [BLOCK_I, BLOCK_J] -> [BLOCK_I]
    tl.store(SANC + b * N + rank, key_i, mask=m_i)
    tl.store(PERM + b * N + rank, i, mask=m_i)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocator of every buffer the kernels fill (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    # Kernels take any strides except on head_dim, which must be unit for wide loads.
    return t if t.stride(-1) == 1 else t.contiguous()


def _sort_blocks(anchors: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sanc [Bt, N]`` int32 anchors in ascending order (dummies first, as -1) and ``perm [Bt, N]``
    int32 (sorted position -> block); stable, in one launch."""
    Bt, N = anchors.shape
    sanc = torch.empty((Bt, N), dtype=torch.int32, device=anchors.device)
    perm = torch.empty((Bt, N), dtype=torch.int32, device=anchors.device)
    anchors = anchors.contiguous()
    keep = keep.contiguous().view(torch.uint8)
    _rank_sort_kernel[(Bt, triton.cdiv(N, 64))](anchors, keep, sanc, perm, N, BLOCK_I=64, BLOCK_J=128)
    return sanc, perm


def _common(q, k_ctx, anchors, block_size):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, got {q.dtype}")
    Bt, NB, Hq, D = q.shape
    S, Hkv = k_ctx.shape[1], k_ctx.shape[2]
    G = Hq // Hkv
    N = anchors.shape[1]
    block_d = max(16, triton.next_power_of_2(D))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 operands
    return Bt, NB, Hq, D, S, Hkv, G, N, block_d, prec


def _s(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_dkdv(q, k_ctx, v_ctx, k_draft, v_draft, do, lse, delta, dk_ctx, dv_ctx, dk_draft, dv_draft,
                 sanc, perm, dq_acc, S, N, NB, Hkv, scale, qk_scale, common, deterministic, split_ok,
                 cfg, cfg_d, ctx_tiles, tiles, sorted_q):
    """Programs ``[0, ctx_tiles)`` do context key tiles, ``[ctx_tiles, tiles)`` draft key tiles."""
    G = common["G"]
    _varprefix_bwd_dkdv_kernel[(q.shape[0] * Hkv, tiles)](
        q, k_ctx, v_ctx, k_draft, v_draft, do, lse, delta, dk_ctx, dv_ctx, dk_draft, dv_draft, sanc, perm, dq_acc,
        *_s(q), *_s(k_ctx), *_s(v_ctx), *_s(k_draft), *_s(v_draft), *_s(do),
        *_s(dk_ctx), *_s(dv_ctx), *_s(dk_draft), *_s(dv_draft), *_s(dq_acc),
        S, N, NB, Hkv, float(scale), qk_scale, ctx_tiles,
        ATOMIC_DQ=not deterministic, SORTED=sorted_q, **common,
        SLOTS_C=cfg.block_m // G, BLOCK_MC=cfg.block_m, BLOCK_NC=cfg.block_n, SPLIT_C=cfg.split_ds and split_ok,
        SLOTS_D=cfg_d.block_m // G, BLOCK_MD=cfg_d.block_m, BLOCK_ND=cfg_d.block_n,
        SPLIT_D=cfg_d.split_ds and split_ok,
        num_warps=max(cfg.num_warps, cfg_d.num_warps), num_stages=cfg.num_stages,
    )


def varprefix_attention_fwd(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size: int, scale: float,
                            sorted_blocks=None):
    """``o [Bt, NB, Hq, D]`` (q.dtype) and ``lse [Bt, Hq, NB]`` float32 (natural log, -inf on dummies).

    ``sorted_blocks``: ``(sanc, perm)`` of ``_sort_blocks(anchors, keep)`` when the caller has them."""
    q, k_ctx, v_ctx, k_draft, v_draft = map(_rows_contig, (q, k_ctx, v_ctx, k_draft, v_draft))
    Bt, NB, Hq, D, S, Hkv, G, N, block_d, prec = _common(q, k_ctx, anchors, block_size)
    o = _empty((Bt, NB, Hq, D), q.dtype, q.device)
    lse = _empty((Bt, Hq, NB), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    sanc, perm = sorted_blocks if sorted_blocks is not None else _sort_blocks(anchors, keep)
    cfg = pick_tiles("fwd", D, block_size, G, q.dtype)
    slots = cfg.block_m // G
    grid = (Bt * Hkv, triton.cdiv(NB, slots))
    _varprefix_fwd_kernel[grid](
        q, k_ctx, v_ctx, k_draft, v_draft, o, lse, sanc, perm,
        *_s(q), *_s(k_ctx), *_s(v_ctx), *_s(k_draft), *_s(v_draft), *_s(o),
        S, N, NB, Hkv, float(scale) * LOG2E,
        G=G, BLK=block_size, HEAD_DIM=D, SLOTS=slots,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def varprefix_attention_bwd(do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep,
                            block_size: int, scale: float, sorted_blocks=None, deterministic: bool = True):
    """``(dq, dk_ctx, dv_ctx, dk_draft, dv_draft)``, each shaped and typed like its input.

    ``deterministic``: dq by its own kernel per query tile (bitwise repeatable, 7 matmuls per tile
    pair); else FlashAttention-2's way, dq added atomically in fp32 by the dk/dv kernels (5)."""
    do, q, k_ctx, v_ctx, k_draft, v_draft, o = map(_rows_contig, (do, q, k_ctx, v_ctx, k_draft, v_draft, o))
    lse = lse.contiguous()
    Bt, NB, Hq, D, S, Hkv, G, N, block_d, prec = _common(q, k_ctx, anchors, block_size)
    dev = q.device
    # The atomic dq accumulates in fp32: the output itself for fp32 inputs, a buffer otherwise.
    acc_dq = not deterministic and q.dtype != torch.float32
    dq = _empty(q.shape, torch.float32 if acc_dq else q.dtype, dev)
    dk_ctx = _empty(k_ctx.shape, k_ctx.dtype, dev)
    dv_ctx = _empty(v_ctx.shape, v_ctx.dtype, dev)
    dk_draft = _empty(k_draft.shape, k_draft.dtype, dev)
    dv_draft = _empty(v_draft.shape, v_draft.dtype, dev)
    if q.numel() == 0 or k_ctx.numel() == 0:
        return tuple(t.zero_() for t in (dq.to(q.dtype), dk_ctx, dv_ctx, dk_draft, dv_draft))
    sanc, perm = sorted_blocks if sorted_blocks is not None else _sort_blocks(anchors, keep)
    delta = _empty((Bt, Hq, NB), torch.float32, dev)
    qk_scale = float(scale) * LOG2E
    split_ok = q.dtype != torch.float32  # fp32 operands are never rounded
    common = dict(G=G, BLK=block_size, HEAD_DIM=D, BLOCK_D=block_d, DOT_PREC=prec)
    suffix = "" if deterministic else "_atomic"

    if deterministic:
        dq_acc = q  # unused by the dk/dv kernels
        cfg = pick_tiles("dq", D, block_size, G, q.dtype)
        slots = cfg.block_m // G
        _varprefix_bwd_dq_kernel[(Bt * Hkv, triton.cdiv(NB, slots))](
            q, k_ctx, v_ctx, k_draft, v_draft, o, do, lse, delta, dq, sanc, perm,
            *_s(q), *_s(k_ctx), *_s(v_ctx), *_s(k_draft), *_s(v_draft), *_s(o), *_s(do), *_s(dq),
            S, N, NB, Hkv, float(scale), qk_scale,
            SLOTS=slots, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.split_ds and split_ok, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        dq_acc = dq
        rows = Bt * NB * Hq
        block_r = max(1, 8192 // block_d)
        _varprefix_bwd_prep_kernel[(triton.cdiv(rows, block_r),)](
            o, do, delta, dq_acc, *_s(o), *_s(do), *_s(dq_acc), NB, Hq, rows,
            HEAD_DIM=D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8,
        )

    cfg = pick_tiles("dkdv" + suffix, D, block_size, G, q.dtype)
    cfg_d = pick_tiles("dkdv_draft" + suffix, D, block_size, G, q.dtype)
    presort = cfg.presort and deterministic  # the atomic dq adds at the slots' memory order
    q_s, do_s, lse_s, delta_s = q, do, lse, delta
    if presort:
        idx = (perm.long()[:, :, None] * block_size + torch.arange(block_size, device=dev)).reshape(Bt, NB)
        rows = torch.arange(Bt, device=dev)[:, None]
        q_s, do_s = q[rows, idx], do[rows, idx]  # [Bt, NB, Hq, D] in sorted slot order
        lse_s, delta_s = (t.gather(2, idx[:, None, :].expand(Bt, Hq, NB)) for t in (lse, delta))
    ctx_tiles = triton.cdiv(S, cfg.block_n)
    if presort:  # the draft tiles read the unsorted q/do: their own launch
        _launch_dkdv(q_s, k_ctx, v_ctx, k_draft, v_draft, do_s, lse_s, delta_s, dk_ctx, dv_ctx, dk_draft,
                     dv_draft, sanc, perm, dq_acc, S, N, NB, Hkv, scale, qk_scale, common, deterministic, split_ok,
                     cfg, cfg_d, ctx_tiles, ctx_tiles, True)
        ctx_tiles, q_s, do_s, lse_s, delta_s = 0, q, do, lse, delta
    _launch_dkdv(q_s, k_ctx, v_ctx, k_draft, v_draft, do_s, lse_s, delta_s, dk_ctx, dv_ctx, dk_draft, dv_draft,
                 sanc, perm, dq_acc, S, N, NB, Hkv, scale, qk_scale, common, deterministic, split_ok,
                 cfg, cfg_d, ctx_tiles, ctx_tiles + triton.cdiv(NB, cfg_d.block_n), False)
    if acc_dq:
        dq = dq.to(q.dtype)
    return dq, dk_ctx, dv_ctx, dk_draft, dv_draft
