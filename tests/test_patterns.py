import torch

from pat_callbacks.patterns import prune_count, unstructured_mask


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
