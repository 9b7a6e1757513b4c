"""init_weights: a run starts from trained weights (Lightning checkpoint, state_dict of the model or of its net,
bench/pretrain.py's record), strictly matched; a missing file or another architecture fails before training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir

from pat_callbacks.app.config import register_configs
from pat_callbacks.app.models import MLP, Classifier
from pat_callbacks.app.run import CONF_DIR, run_training
from pat_callbacks.app.weights import load_initial_weights

register_configs()
TINY = ["trainer=tiny", "trainer.max_steps=10", "num_threads=1", "~logger"]


class SaveStartWeights(pl.Callback):
    """Writes the model's state_dict as fit starts (after init_weights, before any pruning) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.path)


def _compose(overrides: list[str], tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    return cfg


@pytest.mark.parametrize("form", ["lightning", "model", "net", "pretrain_record"])
def test_every_accepted_file_form_loads_exactly(tmp_path, form):
    torch.manual_seed(1)
    source = Classifier(MLP(6, (5,), 3))
    saved = {
        "lightning": {"state_dict": source.state_dict(), "epoch": 0, "global_step": 7},
        "model": source.state_dict(),
        "net": source.net.state_dict(),
        "pretrain_record": {"state_dict": source.net.state_dict(), "model": {"dim": 5}, "val_bpc": 1.0},
    }[form]
    torch.save(saved, tmp_path / "w.pt")
    torch.manual_seed(2)
    model = Classifier(MLP(6, (5,), 3))
    where = load_initial_weights(model, tmp_path / "w.pt")
    assert where == ("net" if form in ("net", "pretrain_record") else "model")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_another_architecture_is_an_error_naming_keys_or_shapes(tmp_path):
    torch.save(Classifier(MLP(6, (5,), 3)).net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"(?s)does not fit the model: .*size mismatch"):
        load_initial_weights(Classifier(MLP(6, (4,), 3)), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"match neither the model's nor model.net's; missing \['layers.4.bias'"):
        load_initial_weights(Classifier(MLP(6, (5, 5), 3)), tmp_path / "w.pt")
    torch.save({"state_dict": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_initial_weights(Classifier(MLP(6, (5,), 3)), tmp_path / "bad.pt")


def test_train_py_starts_one_shot_pruning_from_the_given_checkpoint(tmp_path):
    first = _compose([*TINY, "model=mlp", "datamodule=digits", "model.net.in_features=64"], tmp_path / "a")
    run_training(first, output_dir=tmp_path / "a")
    trained = tmp_path / "a" / "checkpoints" / "last.ckpt"
    overrides = [
        *TINY,
        "model=mlp",
        "datamodule=digits",
        "model.net.in_features=64",
        "seed=5",  # another initialisation: only init_weights can make the start equal the checkpoint
        f"init_weights={trained}",
        "+pruning=wanda",
        "pruning.calibration_batches=2",
        f"+callbacks.start._target_={__name__}.SaveStartWeights",
        f"+callbacks.start.path={tmp_path / 'start.pt'}",
    ]
    metrics = run_training(_compose(overrides, tmp_path / "b"), output_dir=tmp_path / "b")
    start = torch.load(tmp_path / "start.pt")
    expected = torch.load(trained, weights_only=True)["state_dict"]
    assert all(torch.equal(start[k], v) for k, v in expected.items())
    assert metrics["method"] == "one_shot/wanda" and metrics["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_missing_init_weights_file_fails_before_training(tmp_path):
    cfg = _compose([*TINY, f"init_weights={tmp_path / 'none.ckpt'}", "+pruning=wanda"], tmp_path)
    with pytest.raises(ValueError, match=r"init_weights='.*none.ckpt' is not a file"):
        run_training(cfg, output_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


class NotATensor:
    """An object a weights-only load refuses to rebuild."""


def test_a_checkpoint_with_arbitrary_objects_is_refused_with_the_way_out(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match=r"init_weights='.*objects.pt' holds objects that a weights-only load"):
        load_initial_weights(Classifier(MLP(6, (5,), 3)), tmp_path / "objects.pt")


def test_resuming_wins_over_init_weights_and_says_so(tmp_path, caplog):
    base = [*TINY, "model=mlp", "datamodule=digits", "model.net.in_features=64"]
    run_training(_compose(base, tmp_path / "a"), output_dir=tmp_path / "a")
    trained = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = _compose([*base, "trainer.max_steps=12", f"ckpt_path={trained}", f"init_weights={trained}"], tmp_path)
    with caplog.at_level("WARNING", logger="pat_callbacks.app.run"):
        metrics = run_training(resumed, output_dir=tmp_path / "b")
    assert metrics["resumed_at_step"] == 10
    assert "is not loaded: resuming from ckpt_path" in caplog.text


def test_a_misfit_leaves_the_model_as_it_was_and_names_every_shape(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(Classifier(MLP(4, (3,), 2)).net.state_dict(), path)
    model = Classifier(MLP(4, (3,), 5))  # the first layer fits, the last does not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"net.pt.*size mismatch.*layers\.2\.weight: file \(2, 3\), model \(5, 3\)"):
        load_initial_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n"])
def test_an_empty_or_text_file_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"init_weights='.*weights\.pt' is not a file torch\.load can read"):
        load_initial_weights(Classifier(MLP(4, (3,), 2)), path)
