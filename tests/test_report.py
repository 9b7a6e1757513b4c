"""pat-report on real (tiny) train.py runs: tables and the three plots."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pat_callbacks.config import register_configs
from pat_callbacks.report import collect_runs, main, summary_table
from pat_callbacks.run import CONF_DIR, run_training

ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    runs = {"0": [], "1": ["+pruning=cubic", "pruning.final_sparsity=0.5"], "2": ["+pruning=cubic"]}
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
    assert sorted(r["method"] for r in runs) == ["cubic/magnitude/uniform"] * 2 + ["dense"]
    table = summary_table(runs)
    assert "| cubic/magnitude/uniform | 0.5 | 1 |" in table and "| dense | 0 | 1 |" in table
    assert "| cubic/magnitude/uniform | 0.9 | 1 |" in table


def test_pat_report_writes_tables_and_plots(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path)])
    assert "| cubic/magnitude/uniform | 0.9 |" in (tmp_path / "report.md").read_text()
    for name in ("accuracy_vs_sparsity.png", "schedule.png", "layer_sparsity.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "wrote" in capsys.readouterr().out


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No metrics\.json at or below"):
        collect_runs([tmp_path])
