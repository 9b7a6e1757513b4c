"""The one selection path: a pruned weight never returns while the target rises, on every strategy.

Each case prunes once, then prunes further with adversarial scores under which every pruned entry scores highest:
a selection that forgot the entries pruned before would revive them. Streamed and exact strategies, shape and
score-dependent plans (caps, sensitivity), block and N:M patterns, and 2 sharded (FSDP2) ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pat_callbacks.core.pruner import Pruner
from tests.core.test_selection import _on_two_ranks

CASES = {
    "streamed uniform": ({"allocation": "uniform"}, False),
    "streamed global": ({"allocation": "global"}, False),
    "streamed global_raw": ({"allocation": "global_raw"}, False),
    "streamed erk": ({"allocation": "erk"}, False),
    "streamed 2:4": ({"pattern": "2:4"}, False),
    "streamed pinned": ({"allocation": "global", "layer_sparsity": {"0.weight": 0.4}}, False),
    "exact uniform": ({"allocation": "uniform"}, True),
    "exact global": ({"allocation": "global"}, True),
    "exact erk": ({"allocation": "erk"}, True),
    "exact pinned": ({"allocation": "global", "layer_sparsity": {"0.weight": 0.4}}, True),
    "exact 2:4": ({"pattern": "2:4"}, True),
    "exact caps": ({"allocation": "global", "max_sparsity": 0.9}, False),
    "exact floors": ({"allocation": "global_raw", "min_sparsity": 0.2}, False),
    "exact sensitivity": ({"allocation": "sensitivity"}, False),
    "exact blocks": ({"pattern": "block:2x2"}, False),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _adversarial(pruner: Pruner, seed: int = 1) -> dict[str, torch.Tensor]:
    """Scores under which every pruned entry scores highest (it would be the first kept)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name, param in pruner.params.items():
        shape = param.to_local().shape if hasattr(param, "to_local") else param.shape
        noise = torch.rand(shape, generator=generator)
        scores[name] = torch.where(pruner.masks[name], noise, 10.0 + noise)
    return scores


@pytest.mark.parametrize("case", list(CASES))
def test_a_pruned_weight_never_returns_while_the_target_rises(case):
    options, force_exact = CASES[case]
    model = _model()
    pruner = Pruner(model, **options)
    if options.get("allocation") == "sensitivity":
        pruner.sensitivities = {name: float(i + 1) for i, name in enumerate(pruner.params)}
    if force_exact:
        pruner._streamable = lambda sparsity: False  # the whole-tensor strategy
    nm = "pattern" in options and ":" in options["pattern"] and not options["pattern"].startswith("block")
    first, second = (0.25, 0.5) if nm else (0.3, 0.6)
    assert pruner.prune_to(first, final_target=second)
    before = {name: ~mask.clone() for name, mask in pruner.masks.items()}
    assert pruner.prune_to(second, final_target=second, scores=_adversarial(pruner))
    weights = dict(model.named_parameters())
    for name, pruned_before in before.items():
        assert bool((~pruner.masks[name])[pruned_before].all()), f"{case}: {name} revived pruned entries"
        assert bool((weights[name][pruned_before] == 0).all())
    zeros = sum(int((weights[n] == 0).sum()) for n in pruner.params)
    total = sum(p.numel() for p in pruner.params.values())
    assert abs(zeros / total - second) < 0.03, (case, zeros / total)  # block/N:M round per block or group


def _sharded_worker(rank: int, world: int, port: int, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for allocation, force_exact in (("uniform", False), ("global", False), ("uniform", True), ("global", True)):
            model = _model()
            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            pruner = Pruner(model, allocation=allocation)
            assert pruner.group is not None
            if force_exact:
                pruner._streamable = lambda sparsity: False
            pruner.prune_to(0.3)
            before = {name: ~mask.clone() for name, mask in pruner.masks.items()}
            pruner.prune_to(0.6, scores=_adversarial(pruner, seed=1 + rank))
            kept_out = all(bool((~pruner.masks[n])[b].all()) for n, b in before.items())
            zeros = sum(int((p.to_local() == 0).sum()) for p in pruner.params.values())
            counts = torch.tensor([zeros])
            dist.all_reduce(counts)
            total = sum(p.numel() for p in pruner.params.values())
            results.append((allocation, force_exact, kept_out, round(int(counts) / total, 4)))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_a_pruned_weight_never_returns_on_sharded_ranks():
    results = _on_two_ranks(_sharded_worker, 29_700 + os.getpid() % 1000)
    for rank, rows in results.items():
        for allocation, force_exact, kept_out, sparsity in rows:
            assert kept_out, (rank, allocation, force_exact)
            assert abs(sparsity - 0.6) < 2e-3, (rank, allocation, force_exact, sparsity)  # uniform rounds per layer


# ------------------------------------------------------------------------------------- what one update returns
def _update(pruner: Pruner, sparsity: float, **kwargs):
    plan = pruner.planner.plan(sparsity)
    return pruner.selection.update(plan, sparsity, **{"stream": True, "keep_pruned": True, **kwargs})


def test_an_update_says_whether_it_streamed_fell_back_or_was_skipped():
    from pat_callbacks.core.updates import BELOW_PRUNED, NON_FINITE, UpdateResult

    model = _model()
    pruner = Pruner(model)
    streamed = _update(pruner, 0.5)
    assert isinstance(streamed, UpdateResult) and not streamed.exact and streamed.fallback is None
    assert streamed.skipped is None and streamed.entries.keys() == pruner.params.keys()
    pruner.set_masks({n: torch.arange(p.shape[0]).view(-1, 1).expand(p.shape) < 1 for n, p in pruner.params.items()})
    fell_back = _update(pruner, 0.3)  # below what the masks prune: a streamed pass cannot decide
    assert fell_back.exact and fell_back.fallback == BELOW_PRUNED and fell_back.entries is None
    exact = _update(pruner, 0.3, stream=False)
    assert exact.exact and exact.fallback is None
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        skipped = _update(pruner, 0.9)
    assert skipped == UpdateResult(skipped=NON_FINITE)
