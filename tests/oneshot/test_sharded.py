"""Wanda on FSDP2 shards equals Wanda in one process on both ranks' batches; SparseGPT is refused with its reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pat_callbacks.oneshot import one_shot_prune
from tests.oneshot.fsdp_worker import _batches, _model

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_wanda_matches_one_process_and_sparsegpt_is_refused(tmp_path):
    launch = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
    env = {key: value for key, value in os.environ.items() if key not in launch}
    for _attempt in range(2):  # gloo's threads can abort at interpreter exit ("terminate called without an active
        # exception") after the work is done: one more run then, any other failure fails at once
        (tmp_path / "store").unlink(missing_ok=True)  # the rendezvous file of the last attempt
        done = subprocess.run(
            [sys.executable, "-m", "tests.oneshot.fsdp_worker", str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "method='sparsegpt' is not supported with sharded (FSDP2)" in (tmp_path / "sparsegpt.txt").read_text()
    sharded = torch.load(tmp_path / "wanda.pt")
    reference = _model()
    result = one_shot_prune(reference, "wanda", 0.5, calibration=_batches(0) + _batches(1))
    for name, weight in sharded["weights"].items():
        assert torch.equal(weight == 0, reference.get_parameter(name) == 0), name
    assert sharded["sparsity"] == result.sparsity
