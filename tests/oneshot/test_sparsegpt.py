"""SparseGPT: exact mask counts, zeros exact, N:M, lower reconstruction error than magnitude at the same count, and a
clear refusal under FSDP2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.core.patterns import nm_mask, prune_count, unstructured_mask
from pat_callbacks.oneshot import one_shot_prune, refuse_sharded, sparsegpt_prune

torch.set_num_threads(1)


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven scales (what makes the OBS update pay off)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mixing) * (0.2 + 2.8 * torch.rand(d, generator=g))


def _error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.t() - x @ w_hat.t()).norm())


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
def test_unstructured_count_is_exact_and_error_beats_magnitude_at_that_count(sparsity):
    x = _correlated_inputs(1024, 256)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    new, mask = sparsegpt_prune(w, x.t() @ x, sparsity)  # 2 blocks of 128 columns: the count spread over them
    pruned = int((~mask).sum())
    assert pruned == prune_count(w.numel(), sparsity)
    assert int((new == 0).sum()) == pruned  # the zeros are exactly the mask
    magnitude = w * unstructured_mask(w.abs(), sparsity)
    assert int((magnitude == 0).sum()) == pruned
    assert _error(w, new, x) < 0.8 * _error(w, magnitude, x)


def test_two_four_holds_and_error_beats_magnitude_two_four():
    x = _correlated_inputs(1024, 256)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    new, _ = sparsegpt_prune(w, x.t() @ x, 0.5, nm=(2, 4))
    assert ((new == 0).view(32, 64, 4).sum(-1) == 2).all()
    magnitude = w * nm_mask(w.abs(), 2, 4)
    assert _error(w, new, x) < 0.8 * _error(w, magnitude, x)


def test_the_input_weight_is_left_untouched_and_dead_inputs_keep_their_weights():
    x = _correlated_inputs(128, 8)
    x[:, 3] = 0.0  # an input that never fires
    w = torch.randn(4, 8)
    before = w.clone()
    new, mask = sparsegpt_prune(w, x.t() @ x, 0.5)
    assert torch.equal(w, before)
    assert int((new == 0).sum()) == int((~mask).sum()) == 16


def test_one_shot_prune_writes_updated_weights_and_exact_zeros_through_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [_correlated_inputs(64, 16, seed=s) for s in range(4)]
    dense = [p.detach().clone() for p in (model[0].weight, model[2].weight)]
    result = one_shot_prune(model, "sparsegpt", 0.6, calibration=batches)
    for param, before in zip((model[0].weight, model[2].weight), dense, strict=True):
        zeros = param == 0
        assert int(zeros.sum()) == prune_count(param.numel(), 0.6)
        assert not torch.equal(param[~zeros], before[~zeros])  # the OBS update moved the kept weights
    assert result.sparsity == pytest.approx(0.6, abs=1 / 640) and result.passes == 2  # one per layer group


def test_refused_under_fsdp2_with_a_clear_message(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"method='sparsegpt' is not supported with sharded \(FSDP2\)"):
            refuse_sharded({"w": sharded})
    finally:
        dist.destroy_process_group()


def test_not_positive_definite_says_what_to_do():
    with pytest.raises(RuntimeError, match="larger `damping`"):
        sparsegpt_prune(torch.ones(2, 2), torch.tensor([[1.0, 2.0], [2.0, -5.0]]), 0.5, damping=1e-6)


def test_sparsegpt_prunes_tied_weights_in_index_order():
    from pat_callbacks.oneshot.sparsegpt import sparsegpt_prune

    weight, hessian = torch.ones(3, 8), torch.eye(8)  # every weight ties: the first ones in each row / block go
    _, mask = sparsegpt_prune(weight, hessian, 0.5, block_size=8)
    assert (~mask).reshape(-1).nonzero().reshape(-1).tolist() == list(range(12))
    _, mask = sparsegpt_prune(weight, hessian, 0.0, nm=(2, 4), block_size=8)
    assert mask.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]] * 3
