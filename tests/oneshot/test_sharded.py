"""Wanda on FSDP2 shards equals Wanda in one process on both ranks' batches; SparseGPT is refused with its reason."""

from __future__ import annotations

import torch

from pat_callbacks.oneshot import one_shot_prune
from tests.conftest import run_gloo_worker
from tests.oneshot.fsdp_worker import _batches, _model


def test_sharded_wanda_matches_one_process_and_sparsegpt_is_refused(tmp_path):
    store = tmp_path / "store"  # the rendezvous file: removed before each attempt
    run_gloo_worker("tests.oneshot.fsdp_worker", str(tmp_path), before_attempt=lambda: store.unlink(missing_ok=True))
    assert "method='sparsegpt' is not supported with sharded (FSDP2)" in (tmp_path / "sparsegpt.txt").read_text()
    sharded = torch.load(tmp_path / "wanda.pt")
    reference = _model()
    result = one_shot_prune(reference, "wanda", 0.5, calibration=_batches(0) + _batches(1))
    for name, weight in sharded["weights"].items():
        assert torch.equal(weight == 0, reference.get_parameter(name) == 0), name
    assert sharded["sparsity"] == result.sparsity
