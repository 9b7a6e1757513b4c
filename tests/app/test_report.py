"""pat-report on real (tiny) train.py runs and on runs of any Lightning project: tables, plots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from pat_callbacks import GradualPruning
from pat_callbacks.app.config import register_configs
from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.app.report import collect_runs, main, plot_layer_sparsity, summary_table
from pat_callbacks.app.run import CONF_DIR, run_training
from pat_callbacks.callbacks.summary import PruningSummary
from tests.conftest import make_module, make_trainer

ROOT = Path(__file__).resolve().parents[2]
register_configs()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    runs = {"0": [], "1": ["+pruning=cubic", "pruning.sparsity=0.5"], "2": ["+pruning=cubic"]}
    for name, extra in runs.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=["trainer=tiny", "trainer.max_steps=30", "num_threads=1", *extra]
                + (["pruning.update_every=5"] if extra else []),
            )
        cfg.callbacks.checkpoint.dirpath = str(root / name / "checkpoints")
        run_training(cfg, output_dir=root / name)
    return root


def test_collect_and_summarise_a_multirun_directory(sweep):
    runs = collect_runs([sweep])
    assert sorted(r["method"] for r in runs) == ["cubic/taylor/global"] * 2 + ["dense"]
    table = summary_table(runs)
    assert "| cubic/taylor/global | 0.5 | 1 |" in table and "| dense | 0 | 1 |" in table
    assert "| cubic/taylor/global | 0.9 | 1 |" in table


def _image(path: Path) -> np.ndarray:
    """The PNG's RGB pixels, after checking it is a real picture: a plot's size and more than a few colours."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300, (path, image.size)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, (path, len(colours))  # lines, text, antialiasing: not a blank or flat image
    assert (pixels < 128).any(axis=2).mean() > 0.005, path  # some dark ink (axes, text, markers)
    return pixels


def test_pat_report_writes_tables_and_plots(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path)])
    assert "| cubic/taylor/global | 0.9 |" in (tmp_path / "report.md").read_text()
    for name in ("accuracy_vs_sparsity.png", "schedule.png", "layer_sparsity.png"):
        _image(tmp_path / name)
    assert "wrote" in capsys.readouterr().out


def test_layer_plot_has_one_panel_per_run(sweep, tmp_path):
    runs = collect_runs([sweep])
    one = _image(plot_layer_sparsity(runs[:1], tmp_path / "one.png"))
    three = _image(plot_layer_sparsity(runs, tmp_path / "three.png"))
    assert three.shape[1] > 2 * one.shape[1]  # three panels side by side


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory) -> Path:
    """A sweep of an own Lightning project: dense, 0.5 and 0.8 with PruningSummary; one run with only a CSV log."""
    root = tmp_path_factory.mktemp("own")
    for name, target in {"0": None, "1": 0.5, "2": 0.8, "3": 0.8}.items():
        callbacks = [] if target is None else [GradualPruning(target, start_step=0, end_step=20, update_every=5)]
        if name != "3":
            callbacks.append(PruningSummary())
        logger = CSVLogger(root / name, name="logs")
        trainer = make_trainer(root / name, callbacks, max_steps=30, logger=logger, log_every_n_steps=5)
        module, data = make_module(), DigitsDataModule(batch_size=64)
        trainer.fit(module, datamodule=data)
        trainer.test(module, datamodule=data, verbose=False)
    return root


def test_pat_report_reads_pruning_summary_and_csv_logs_of_an_own_project(own_runs, tmp_path):
    runs = {run["name"]: run for run in collect_runs([own_runs])}
    assert set(runs) == {f"{i}/logs/version_0" for i in range(4)}
    assert [runs[f"{i}/logs/version_0"]["source"] for i in range(4)] == ["metrics.json"] * 3 + ["metrics.csv"]
    assert runs["0/logs/version_0"]["method"] == "dense"
    assert runs["2/logs/version_0"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    csv_run = runs["3/logs/version_0"]
    assert csv_run["method"] == "pruned" and csv_run["target_sparsity"] == pytest.approx(0.8)
    assert csv_run["sparsity"] == pytest.approx(0.8, abs=0.01) and len(csv_run["layer_sparsity"]) == 3
    main([str(own_runs), "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "test acc %" in report and "| dense | 0 | 1 |" in report and "| pruned | 0.8 | 1 |" in report
    for name in ("accuracy_vs_sparsity.png", "schedule.png", "layer_sparsity.png"):
        _image(tmp_path / name)


def test_accuracy_plot_draws_a_dashed_dense_baseline(tmp_path):
    import matplotlib.pyplot as plt

    from pat_callbacks.app.report import plot_accuracy_vs_sparsity

    runs = [{"method": "dense", "test_acc": 0.9}, {"method": "cubic", "test_acc": 0.8, "sparsity": 0.9}]
    captured = {}
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        (ax,) = fig.axes
        captured.update(title=ax.get_title(), x=ax.get_xlabel(), y=ax.get_ylabel(), lines=ax.get_lines())
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        _image(plot_accuracy_vs_sparsity(runs, tmp_path / "a.png"))
    finally:
        plt.Figure.savefig = original
    assert captured["title"].startswith("Test acc vs reached sparsity")
    assert "(%" in captured["x"] and captured["y"] == "test acc (%)"
    dashed = [line for line in captured["lines"] if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [90.0, 90.0]


def test_accuracy_plot_without_a_dense_run_or_without_an_accuracy(tmp_path):
    from pat_callbacks.app.report import plot_accuracy_vs_sparsity

    runs = [{"method": "cubic", "metrics": {"val/acc": 0.8}, "sparsity": 0.9}]
    assert plot_accuracy_vs_sparsity(runs, tmp_path / "a.png") is not None
    assert plot_accuracy_vs_sparsity([{"method": "cubic", "metrics": {"loss": 1.0}}], tmp_path / "b.png") is None


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pat_callbacks.app.report", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_directory_exits_1_naming_it(tmp_path):
    missing = tmp_path / "no_such_run"
    run = _report(str(missing))
    assert run.returncode == 1
    assert run.stderr.strip() == f"pat-report: error: no such file or directory: {missing}"


def test_corrupt_metrics_json_exits_1_naming_it(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text('{"method": "cubic", "test_acc": 0.')
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path)])
    message = str(excinfo.value.code)
    assert message.startswith(f"pat-report: error: {tmp_path / '0' / 'metrics.json'} is not valid JSON")
    assert "\n" not in message


@pytest.mark.parametrize("content", [None, "epoch,step,train/loss\n"])
def test_nothing_to_read_exits_1_naming_the_directory(tmp_path, content):
    (tmp_path / "logs").mkdir()
    if content is not None:  # a CSV log with a header and no rows
        (tmp_path / "logs" / "metrics.csv").write_text(content)
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path)])
    assert str(excinfo.value.code) == (
        f"pat-report: error: nothing to read at or below {tmp_path}: no metrics.json, no metrics.csv with rows"
    )


def test_unknown_metric_exits_1(sweep):
    with pytest.raises(SystemExit) as excinfo:
        main([str(sweep), "--metric", "val/top5"])
    assert str(excinfo.value.code) == f"pat-report: error: no run at or below {sweep} logged 'val/top5'"


def test_metrics_json_written_by_train_py_and_pruning_summary_in_one_run_dir_count_once(tmp_path):
    run = tmp_path / "run"
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"method": "cubic", "test_acc": 0.9, "sparsity": 0.9}))
    (run / "logs" / "version_0" / "metrics.csv").write_text("epoch,step,train/loss\n0,1,2.0\n")
    assert [r["source"] for r in collect_runs([tmp_path])] == ["metrics.json"]
