"""d2kernels.layout against hand-built cases for every rule of docs/semantics.md."""
import math

import pytest
import torch

from d2kernels import layout as L

IDS = torch.arange(100, 112)[None]  # tokens 100..111 make positions easy to read


def test_anchor_needs_loss_mask_at_a_and_a_plus_1():
    lm = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    # candidates: a=1 (1,2), a=6 (6,7), a=7 (7,8); a=2 fails (3 off), a=4 fails (5 off), a=8 fails (9 off)
    a, keep = L.sample_anchors(lm, 8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 8) and keep.dtype == torch.bool
    assert a[keep].tolist() == [1, 6, 7]
    assert keep.tolist() == [[True] * 3 + [False] * 5]
    assert a[~keep].eq(0).all()


def test_anchors_sorted_distinct_and_subsampled():
    g = torch.Generator().manual_seed(1)
    lm = torch.ones(3, 50, dtype=torch.bool)
    a, keep = L.sample_anchors(lm, 10, generator=g)
    assert keep.all()
    for row in a:
        assert row.tolist() == sorted(set(row.tolist()))
        assert row.max() <= 48
    again, _ = L.sample_anchors(lm, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, again)


def test_anchor_sampling_is_uniform():
    g = torch.Generator().manual_seed(2)
    lm = torch.ones(4000, 11, dtype=torch.bool)  # 10 candidates, draw 3
    a, keep = L.sample_anchors(lm, 3, generator=g)
    counts = torch.bincount(a[keep], minlength=10).double()
    expected = 4000 * 3 / 10
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_no_candidates_and_short_sequences():
    a, keep = L.sample_anchors(torch.zeros(2, 9, dtype=torch.bool), 4)
    assert not keep.any() and a.eq(0).all()
    a, keep = L.sample_anchors(torch.ones(1, 1, dtype=torch.bool), 4)
    assert not keep.any()


def test_prefix_length_probabilities_b7():
    p_min, probs = L.prefix_length_probs(7, 0.9)
    assert p_min == 2
    assert [round(x, 3) for x in probs.tolist()] == [0.244, 0.22, 0.198, 0.178, 0.16]


@pytest.mark.parametrize("B,expected", [(1, 0), (2, 1), (3, 2)])
def test_prefix_length_degenerate_blocks(B, expected):
    p = L.sample_prefix_lengths(torch.ones(2, 5, dtype=torch.bool), B)
    assert p.eq(expected).all()


@pytest.mark.parametrize("B,base", [(7, 0.9), (16, 0.5), (5, 1.7)])
def test_prefix_lengths_follow_base_power(B, base):
    n = 60000
    p = L.sample_prefix_lengths(torch.ones(n, 1, dtype=torch.bool), B, base, generator=torch.Generator().manual_seed(3))
    p_min = min(2, B - 1)
    assert p.min() >= p_min and p.max() <= B - 1
    w = torch.tensor([base**k for k in range(p_min, B)], dtype=torch.float64)
    expected = n * w / w.sum()
    observed = torch.bincount(p.flatten() - p_min, minlength=B - p_min).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # chi-square with B - p_min - 1 dof; 99.99th percentile stays below 4 * dof + 20 for dof <= 13
    assert chi2 < 4 * (B - p_min - 1) + 20, chi2


def test_prefix_base_must_be_positive():
    with pytest.raises(ValueError, match="base"):
        L.sample_prefix_lengths(torch.ones(1, 1, dtype=torch.bool), 7, base=0.0)


def test_draft_token_ids_prefix_mask_and_sequence_end():
    anchors = torch.tensor([[2, 9, 0]])
    keep = torch.tensor([[True, True, False]])
    p = torch.tensor([[3, 4, 3]])
    ids = L.draft_token_ids(IDS, anchors, keep, p, 5, mask_token_id=7).view(3, 5)
    assert ids[0].tolist() == [102, 103, 104, 7, 7]
    assert ids[1].tolist() == [109, 110, 111, 7, 7]  # position 12 is past S=12: mask
    assert ids[2].tolist() == [7] * 5  # dummy block


def test_dflash_targets_shift_and_contiguous_run():
    lm = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    anchors, keep = torch.tensor([[1, 8]]), torch.tensor([[True, True]])
    labels, ev, off = L.draft_targets(IDS, lm, anchors, keep, None, 5, same_position=False)
    assert labels[0, 0].tolist() == [102, 103, 104, 105, 106]  # shifted by one
    assert ev[0, 0].tolist() == [True, True, True, False, False]  # t=5 unmasked-off breaks the run
    assert ev[0, 1].tolist() == [True, True, True, False, False]  # t=12 past the end
    assert labels[0, 1].tolist() == [109, 110, 111, -100, -100]
    assert off[0, 0].tolist() == [0, 1, 2, 3, 4]


def test_d2_targets_prefix_passes_through_and_decay_restarts():
    lm = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    anchors, keep = torch.tensor([[1, 4, 0]]), torch.tensor([[True, True, False]])
    p = torch.tensor([[3, 2, 2]])
    labels, ev, off = L.draft_targets(IDS, lm, anchors, keep, p, 6, same_position=True)
    # block 0: position 2 has loss_mask 0 but is a prefix slot: the run passes through it
    assert labels[0, 0].tolist() == [101, 102, 103, 104, 105, 106]
    assert ev[0, 0].tolist() == [False, False, False, True, True, True]
    assert off[0, 0].tolist() == [0, 0, 0, 0, 1, 2]
    # block 1: slots 2, 3 (positions 6, 7) supervised, position 8 breaks the run
    assert ev[0, 1].tolist() == [False, False, True, True, False, False]
    assert off[0, 1].tolist() == [0, 0, 0, 1, 2, 3]
    assert not ev[0, 2].any() and labels[0, 2].eq(-100).all()


def test_zlab_dflash_is_d2_with_prefix_one():
    lm = torch.ones(1, 12, dtype=torch.bool)
    anchors, keep = torch.tensor([[3]]), torch.tensor([[True]])
    labels, ev, off = L.draft_targets(IDS, lm, anchors, keep, torch.ones(1, 1, dtype=torch.long), 4, True)
    assert labels[0, 0].tolist() == [103, 104, 105, 106]
    assert ev[0, 0].tolist() == [False, True, True, True]
    assert off[0, 0].tolist() == [0, 0, 1, 2]


def test_decay_weights():
    ev = torch.tensor([True, True, False, True])
    off = torch.tensor([0, 1, 2, 3])
    w = L.decay_weights(ev, off, 4.0)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-0.25), 0.0, math.exp(-0.75)]))
    assert torch.equal(L.decay_weights(ev, off, None), ev.float())
    assert torch.equal(L.decay_weights(ev, off, 0.0), ev.float())


def test_layout_validation_errors():
    with pytest.raises(ValueError, match="block_size"):
        L.draft_token_ids(IDS, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.long), 0, 1)
    with pytest.raises(TypeError, match="integer"):
        L.draft_token_ids(IDS.float(), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.long), 2, 1)
    with pytest.raises(ValueError, match="keep"):
        L.draft_token_ids(IDS, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 2, dtype=torch.long), 2, 1)
    with pytest.raises(ValueError, match="num_anchors"):
        L.sample_anchors(torch.ones(1, 5), 0)


def test_layout_vectorized_matches_loops():
    """The vectorized rules against a direct per-slot loop of docs/semantics.md's text."""
    g = torch.Generator().manual_seed(5)
    Bt, S, N, B = 3, 23, 6, 5
    ids = torch.randint(0, 50, (Bt, S), generator=g)
    lm = torch.rand(Bt, S, generator=g) < 0.8
    a, keep = L.sample_anchors(lm, N, generator=g)
    p = L.sample_prefix_lengths(keep, B, generator=g)
    for same in (True, False):
        labels, ev, off = L.draft_targets(ids, lm, a, keep, p, B, same)
        for b in range(Bt):
            for n in range(N):
                run = True
                pp = int(p[b, n]) if same else 0
                for k in range(B):
                    t = int(a[b, n]) + k + (0 if same else 1)
                    valid = bool(keep[b, n]) and t < S and bool(lm[b, min(t, S - 1)])
                    run = run and (valid or k < pp)
                    assert bool(ev[b, n, k]) == (run and k >= pp)
                    assert int(off[b, n, k]) == (max(k - pp, 0) if same else k)
