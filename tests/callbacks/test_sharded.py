"""FSDP2 (Lightning's ModelParallelStrategy, fully_shard in configure_model) on 2 CPU ranks with gloo, and models
built in configure_model in one process. Weights are checked whole (gathered in the worker, for the test only)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.core.patterns import prune_count
from tests.conftest import make_trainer, run_gloo_worker


def _worker(out: Path, cases: str, resume_from: Path | None = None) -> None:
    run_gloo_worker("tests.sharded_worker", cases, str(out), *([str(resume_from)] if resume_from is not None else []))


CASES = ("uniform", "global_taylor", "two_four", "rigl")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    _worker(out, ",".join((*CASES, "distill")))
    return out


@pytest.fixture(scope="module")
def resumed_runs(sharded_runs, tmp_path_factory) -> Path:
    """Every case resumed from its own end-of-epoch checkpoint at step 10: mid-schedule (pruning and RigL both update
    again at step 12), in a new pair of processes."""
    out = tmp_path_factory.mktemp("resumed")
    _worker(out, ",".join(CASES), resume_from=sharded_runs / "{case}-ckpt" / "step=10.ckpt")
    return out


def _load(out: Path, case: str) -> dict:
    return torch.load(out / f"{case}.pt", weights_only=False)


def test_uniform_reaches_the_target_in_every_full_layer(sharded_runs):
    result = _load(sharded_runs, "uniform")
    for name, weight in result["weights"].items():
        assert int((weight == 0).sum()) == prune_count(weight.numel(), 0.8), name  # exact, over both ranks' rows
        assert torch.equal(result["masks"][name], weight != 0)  # the masks the ranks hold are the real zeros
        assert result["reported"]["layers"][name] == pytest.approx(int((weight == 0).sum()) / weight.numel())


@pytest.mark.parametrize("case", ["global_taylor", "rigl"])
def test_one_overall_threshold_across_layers_and_ranks(sharded_runs, case):
    result = _load(sharded_runs, case)
    weights = result["weights"]
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == prune_count(total, 0.8)
    assert result["reported"]["sparsity"] == pytest.approx(zeros / total)
    assert len({round(v, 3) for v in result["reported"]["layers"].values()}) > 1  # not a per-layer split


def test_distillation_from_a_given_teacher_on_sharded_ranks(sharded_runs):
    result, plain = _load(sharded_runs, "distill"), _load(sharded_runs, "uniform")
    assert result["reported"]["distill_loss"] > 0
    for name, weight in result["weights"].items():
        assert int((weight == 0).sum()) == prune_count(weight.numel(), 0.8), name
        assert torch.equal(result["masks"][name], weight != 0), name
        assert not torch.equal(weight, plain["weights"][name]), name  # the same run without KD trains otherwise
    refusal = result["reported"]["refusal"]
    assert "sharded by FSDP2" in refusal and "'0.weight'" in refusal and "Distillation(teacher=...)" in refusal


def test_two_four_holds_in_every_row_of_every_shard(sharded_runs):
    result = _load(sharded_runs, "two_four")
    for name in ("net.0.weight", "net.2.weight"):
        groups = result["weights"][name].reshape(-1, 4)
        assert ((groups == 0).sum(1) == 2).all(), name


@pytest.mark.parametrize("case", CASES)
def test_resume_from_a_sharded_checkpoint_continues_exactly(sharded_runs, resumed_runs, case):
    # Bit-exact, as a dense run is, because the DataModules split their epoch-seeded order over the ranks themselves
    # (Lightning's DistributedSamplerWrapper would reshuffle it by an epoch one too high after the resume) and the
    # worker's module has a validation_step (see tests/sharded_worker.py).
    full, resumed = _load(sharded_runs, case), _load(resumed_runs, f"{case}-resumed")
    saved = full["snapshots"]["checkpoint"]
    assert all(torch.equal(saved[name], resumed["snapshots"]["start"][name]) for name in saved)  # masks restored
    for name, weight in full["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
        assert torch.equal(resumed["masks"][name], full["masks"][name]), name


class BuiltInConfigureModel(pl.LightningModule):
    """Lightning's pattern for large models: layers are created in configure_model, after callbacks' setup."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradualPruning(final_sparsity=0.8, start_step=0, end_step=10, update_every=5),
        lambda: DynamicSparseTraining(sparsity=0.8, update_every=5, stop_step=10),
    ],
)
def test_a_model_built_in_configure_model_is_pruned(tmp_path, digits, make):
    pruning = make()
    module = BuiltInConfigureModel()
    make_trainer(tmp_path, [pruning], max_steps=12).fit(module, datamodule=digits)
    weights = [module.net[0].weight, module.net[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == prune_count(sum(w.numel() for w in weights), 0.8)
