"""Exact resume in a new process, and recovery from a process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.resume_worker import RESUME_STEP, RUNS, run

ROOT = Path(__file__).resolve().parents[2]


def test_resumed_runs_in_a_new_process_end_bit_for_bit_like_uninterrupted_ones(tmp_path):
    expected = {name: run(name, tmp_path) for name in RUNS}
    args = [f"{name}={tmp_path / name / f'step={RESUME_STEP[name]}.ckpt'}" for name in RUNS]
    done = subprocess.run(
        [sys.executable, "-m", "tests.resume_worker", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUNS:
        resumed = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert resumed.keys() == expected[name].keys(), name
        different = [key for key in resumed if not torch.equal(resumed[key], expected[name][key])]
        assert not different, f"{name}: {different}"


def _train_py(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    args = [
        "trainer.max_steps=3000",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
        "+pruning=cubic",
        "pruning.sparsity=0.8",
        "callbacks.checkpoint.every_n_train_steps=100",  # the shipped 500, more often here
        f"hydra.run.dir={tmp_path}",
    ]
    process = _train_py(args)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and process.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # being written
                step = 0
            if step >= 900:  # mid-schedule (300..2099)
                break
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert 900 <= step < 3000
    assert not (tmp_path / "metrics.json").exists()

    resumed = _train_py([*args, "ckpt_path=last"])
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 3000
    assert metrics["sparsity"] == pytest.approx(0.8, abs=0.001)


def test_the_taylor_case_resumes_mid_accumulation(tmp_path):
    """Lost criterion history must be able to show: the Taylor checkpoint holds an unfinished accumulation."""
    run("taylor_global", tmp_path)
    checkpoint = torch.load(tmp_path / "taylor_global" / f"step={RESUME_STEP['taylor_global']}.ckpt", weights_only=True)
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith("GradualPruning")]
    counts = {name: int(values["count"]) for name, values in state["criterion_state"].items() if "count" in values}
    assert counts and all(count >= 2 for count in counts.values()), counts


def test_the_windowed_taylor_case_is_interrupted_inside_its_window(tmp_path):
    """The checkpoint of the windowed run holds a started window: step 22's bfloat16 history, which a resume must keep
    (the resume above ends bit for bit like the uninterrupted run)."""
    run("taylor_window", tmp_path)
    checkpoint = torch.load(tmp_path / "taylor_window" / f"step={RESUME_STEP['taylor_window']}.ckpt", weights_only=True)
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith("GradualPruning")]
    history = {name: values for name, values in state["criterion_state"].items() if values}
    assert history and all(int(values["count"]) == 1 for values in history.values()), history
    assert all(values["sum"].dtype == torch.bfloat16 for values in history.values())
