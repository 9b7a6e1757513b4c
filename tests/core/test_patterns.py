import pytest
import torch

from pat_callbacks.core.patterns import (
    block_mask,
    lowest_k,
    nm_mask,
    parse_block,
    parse_nm,
    prune_count,
    unstructured_mask,
)


def test_unstructured_mask_prunes_exactly_the_lowest_scores():
    torch.manual_seed(0)
    scores = torch.rand(7, 9)
    for sparsity in (0.0, 0.1, 0.5, 0.8, 0.99):
        mask = unstructured_mask(scores, sparsity)
        n_prune = prune_count(scores.numel(), sparsity)
        assert int((~mask).sum()) == n_prune
        reference = torch.ones(63, dtype=torch.bool)
        reference[scores.flatten().argsort()[:n_prune]] = False  # naive full sort
        assert torch.equal(mask.flatten(), reference)


def test_already_zero_weights_stay_pruned_when_sparsity_grows():
    weights = torch.tensor([0.0, 0.0, 0.5, -0.1, 2.0, 0.3])
    mask = unstructured_mask(weights.abs(), 0.5)
    assert mask.tolist() == [False, False, True, False, True, True]


@pytest.mark.parametrize("n", [1000, 300_000])
@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.9, 0.98, 0.9999])
def test_lowest_k_is_exact_on_large_tensors(n, fraction):
    torch.manual_seed(n)
    values = torch.randn(n)
    k = round(fraction * n)
    mask = lowest_k(values, k)
    assert int(mask.sum()) == k
    if 0 < k < n:
        assert values[mask].max() <= values[~mask].min()


def test_lowest_k_with_heavy_ties_and_zeros():
    values = torch.cat([torch.zeros(200_000), torch.rand(100_000) + 1, torch.full((50_000,), 5.0)])
    for k in (1, 150_000, 200_000, 250_000, 320_000):
        mask = lowest_k(values, k)
        assert int(mask.sum()) == k
        assert values[mask].max() <= values[~mask].min()
    assert lowest_k(values, 200_000)[:200_000].all()  # all zeros pruned first


def test_already_pruned_weights_stay_pruned_in_a_large_layer():
    torch.manual_seed(0)
    weights = torch.randn(400_000)
    weights[:300_000] = 0.0
    mask = unstructured_mask(weights.abs(), 0.8)
    assert not mask[:300_000].any() and int((~mask).sum()) == 320_000


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    torch.manual_seed(0)
    scores = torch.rand(6, 3, 8)  # a conv-shaped weight: rows of 24
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    kept, dropped = scores.reshape(6, -1, m), scores.reshape(6, -1, m)
    assert (torch.where(groups, kept, torch.inf).amin(-1) >= torch.where(groups, -torch.inf, dropped).amax(-1)).all()


def test_nm_mask_with_fewer_pruned_per_group_and_bad_rows():
    scores = torch.arange(8.0).reshape(1, 8)
    assert nm_mask(scores, 2, 4, pruned_per_group=1).int().tolist() == [[0, 1, 1, 1, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"multiple of 4, but a tensor of shape \(2, 5\) has rows of 5"):
        nm_mask(torch.rand(2, 5), 2, 4)


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "two:four", (2,), "2-4"])
def test_parse_nm_refuses_bad_patterns(bad):
    with pytest.raises(ValueError, match="Expected `pattern` 'N:M' with 0 < N < M"):
        parse_nm(bad)


def test_block_mask_prunes_whole_blocks_by_summed_score():
    torch.manual_seed(0)
    scores = torch.rand(8, 2, 6)  # rows of 12
    mask = block_mask(scores, 0.5, (2, 4))
    blocks = mask.reshape(4, 2, 3, 4)
    per_block = blocks.sum(dim=(1, 3))
    assert set(per_block.flatten().tolist()) <= {0, 8}  # every block all kept or all pruned
    assert int((per_block == 0).sum()) == 6  # half of the 12 blocks
    summed = scores.reshape(4, 2, 3, 4).sum(dim=(1, 3))
    assert summed[per_block == 0].max() <= summed[per_block == 8].min()
    with pytest.raises(ValueError, match="divide into whole blocks"):
        block_mask(torch.rand(5, 4), 0.5, (2, 2))
    with pytest.raises(ValueError, match="Expected `pattern` 'block:RxC'"):
        parse_block("block:4")


def test_lowest_k_and_nm_masks_break_ties_in_index_order():
    values = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0, 1.0, 3.0])
    assert lowest_k(values, 3).tolist() == [False, True, True, True, False, False, False]
    assert lowest_k(values, 5).tolist() == [False, True, True, True, True, True, False]
    ties = torch.randint(0, 3, (64, 48), generator=torch.Generator().manual_seed(0)).float()
    flat = ties.reshape(-1)
    for k in (0, 1, 1000, 3072):
        expected = torch.zeros(flat.numel(), dtype=torch.bool)
        expected[torch.sort(flat, stable=True).indices[:k]] = True
        assert torch.equal(lowest_k(flat, k), expected)
    groups = ties.reshape(64, -1, 4)
    expected = torch.ones_like(groups, dtype=torch.bool)
    expected.scatter_(-1, torch.sort(groups, dim=-1, stable=True).indices[..., :2], False)
    assert torch.equal(nm_mask(ties, 2, 4), expected.reshape(ties.shape))
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[False, False, True, True]]


def test_block_masks_prune_tied_blocks_in_index_order():
    assert block_mask(torch.ones(2, 8), 0.5, (2, 2)).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_group_ranks_by_pairs_and_by_a_stable_sort_agree(monkeypatch, m):
    import pat_callbacks.core.patterns as patterns

    ties = torch.randint(0, 3, (32, 8 * m), generator=torch.Generator().manual_seed(m)).float()
    masks = []
    for limit in (0, 64):  # every group by a stable sort, then every group by pairs
        monkeypatch.setattr(patterns, "_PAIRWISE_GROUPS", limit)
        masks.append([nm_mask(ties, n, m) for n in range(1, m)])
    assert all(torch.equal(a, b) for a, b in zip(*masks, strict=True))
    groups = ties.reshape(32, -1, m)
    for n, mask in zip(range(1, m), masks[0], strict=True):
        expected = torch.ones_like(groups, dtype=torch.bool)
        expected.scatter_(-1, torch.sort(groups, dim=-1, stable=True).indices[..., : m - n], False)
        assert torch.equal(mask, expected.reshape(ties.shape))
