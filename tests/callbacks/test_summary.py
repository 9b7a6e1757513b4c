"""PruningSummary: metrics.json for any Lightning run, counted on the weights themselves."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from pat_callbacks import GradualPruning
from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.callbacks.summary import PruningSummary, pruning_callbacks, weight_matrices
from tests.callbacks.test_interplay import ReplaceLayer
from tests.conftest import make_module, make_trainer


class HalfZeroing(pl.Callback):
    """A stand-in pruning callback (duck-typed: a ``store`` with ``params``) that zeros half of the first layer."""

    method_name = "half"
    final_sparsity = 0.5

    def __init__(self) -> None:
        self.store = None

    def setup(self, trainer, pl_module, stage):
        weight = pl_module.net.layers[0].weight
        self.store = SimpleNamespace(params={"net.layers.0.weight": weight})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            self.store.params["net.layers.0.weight"].view(-1)[::2] = 0.0


def test_writes_into_the_csv_log_dir_with_fit_and_test_metrics(tmp_path):
    pruning, summary = HalfZeroing(), PruningSummary()
    trainer = make_trainer(tmp_path, [pruning, summary], max_steps=8, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    module, data = make_module(), DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.json"
    fitted = json.loads(path.read_text())
    assert fitted["stage"] == "fit" and fitted["global_step"] == 8 and fitted["fit_seconds"] > 0
    assert fitted["method"] == "half" and fitted["target_sparsity"] == 0.5
    assert fitted["sparsity"] == 0.5 and fitted["layer_sparsity"] == {"net.layers.0.weight": 0.5}
    assert "train/loss" in fitted["metrics"] and "test/acc" not in fitted["metrics"]
    trainer.test(module, datamodule=data, verbose=False)
    tested = json.loads(path.read_text())
    assert tested["stage"] == "test" and {"train/loss", "test/acc", "test/loss"} <= set(tested["metrics"])
    # every weight matrix of the MLP 64-32-32-10, pruned or not; counted on the weights
    matrices = {name: p for name, p in module.named_parameters() if p.ndim >= 2}
    assert set(tested["weight_layer_sparsity"]) == set(matrices)
    zeros = sum(int((p == 0).sum()) for p in matrices.values())
    assert tested["weight_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in matrices.values()))
    assert tested["weight_layer_sparsity"]["net.layers.0.weight"] == 0.5
    assert tested["weight_layer_sparsity"]["net.layers.2.weight"] == 0.0


def test_dense_run_without_logger_writes_into_default_root_dir(fit, tmp_path):
    fit([PruningSummary(filename="summary.json")], max_steps=3)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["method"] == "dense" and written["target_sparsity"] == 0.0 and written["sparsity"] == 0.0
    assert written["layer_sparsity"] == written["weight_layer_sparsity"]


def test_real_pruning_callback_reaches_its_target_on_the_weights(fit, tmp_path):
    from pat_callbacks import GradualPruning

    pruning = GradualPruning(final_sparsity=0.75, start_step=0, end_step=10, update_every=5)
    fit([pruning, PruningSummary()], max_steps=12)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert set(written["layer_sparsity"]) == set(pruning.store.params)
    assert written["target_sparsity"] == 0.75


def test_weight_matrices_are_one_definition_embeddings_included_tied_weights_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.again = self.body  # the same module twice
            self.head = nn.Linear(4, 10)
            self.head_t = nn.Linear(4, 4)
            self.head_t.weight = self.body.weight  # a tied parameter

    assert list(weight_matrices(Tied())) == ["embed.weight", "body.weight", "head.weight"]
    assert list(weight_matrices(Tied(), embeddings=False)) == ["body.weight", "head.weight"]


def test_pruning_callbacks_are_duck_typed():
    with_store = SimpleNamespace(store=SimpleNamespace(params={}))
    assert pruning_callbacks([with_store, SimpleNamespace(store=None), SimpleNamespace(store=[])]) == [with_store]


def test_bad_filename_is_refused():
    with pytest.raises(ValueError, match=r"`filename` to be a plain file name, but got 'logs/m.json'"):
        PruningSummary(filename="logs/m.json")


@pytest.mark.parametrize("filename", ["..", ".", "", "runs/metrics.json"])
def test_a_filename_that_is_not_a_plain_file_name_is_refused_at_construction(filename):
    with pytest.raises(ValueError, match="Expected `filename` to be a plain file name"):
        PruningSummary(filename=filename)


def test_the_summary_counts_a_target_replaced_mid_run_as_the_model_holds_it(fit, tmp_path):
    pruning = GradualPruning(sparsity=0.8, criterion="magnitude", verbose=False, start_step=0, end_step=10)
    with pytest.warns(UserWarning, match="was replaced"):
        _, module = fit([ReplaceLayer(12), pruning, PruningSummary(dirpath=tmp_path)], max_steps=20)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    live = module.net.layers[2].weight
    assert summary["layer_sparsity"]["net.layers.2.weight"] == float((live == 0).float().mean())


def test_a_nul_in_the_filename_or_dirpath_is_refused_at_construction_not_after_training():
    with pytest.raises(ValueError, match=r"plain file name, but got 'a\\x00b'.*without a NUL"):
        PruningSummary(filename="a\x00b")
    with pytest.raises(ValueError, match=r"`dirpath` to be a folder path, but got 'runs\\x00'"):
        PruningSummary(dirpath="runs\x00")
