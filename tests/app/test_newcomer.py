"""What a newcomer meets first (issue 32): the README's resume command with the shipped config, the presets and
``--help`` examples on the default model, and the checkpoint folder of a rerun."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pat_callbacks.app.config import register_configs
from pat_callbacks.app.run import CONF_DIR, run_training
from tests.app.hf_folders import tiny_model_folder

register_configs()

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "trainer.max_steps=30", "num_threads=1"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _train_py(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_shipped_config_checkpoints_every_500_steps_into_one_file():
    checkpoint = _compose([]).callbacks.checkpoint
    assert checkpoint.every_n_train_steps == 500 and checkpoint.save_last and checkpoint.save_top_k == 0
    assert checkpoint.enable_version_counter is False  # a rerun into the same directory overwrites last.ckpt


def test_the_readme_resume_command_resumes_a_killed_train_py_mid_run(tmp_path):
    """README: ``python train.py +pruning=cubic ckpt_path=last hydra.run.dir=<same dir>`` after a SIGKILL, with
    nothing added to the shipped checkpoint config (only a shorter run: 1,000 steps, pruning window 100-700)."""
    readme = (ROOT / "README.md").read_text()
    assert "python train.py +pruning=cubic ckpt_path=last hydra.run.dir=<same dir>" in readme
    run = ["+pruning=cubic", "trainer.max_steps=1000", "trainer.enable_progress_bar=false", "num_threads=1"]
    first = _train_py([*run, f"hydra.run.dir={tmp_path}"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline, step = time.time() + 600, 0
    while time.time() < deadline and first.poll() is None and step == 0:
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # still being written
                step = 0
        time.sleep(0.1)
    assert first.poll() is None, "the run finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert step == 500 and not (tmp_path / "metrics.json").exists()

    rerun = _train_py([*run, "ckpt_path=last", f"hydra.run.dir={tmp_path}"])  # the README's rerun
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_at_step"] == 500 and metrics["global_step"] == 1000
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.001)
    assert "resumed at step 500" in output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_ckpt_path_last_with_nothing_to_resume_stops_and_says_so(tmp_path):
    cfg = _compose([*TINY, "+pruning=cubic", "ckpt_path=last"])
    cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: nothing to resume, no last.ckpt in .*checkpoints/"):
        run_training(cfg, output_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_a_rerun_into_the_same_directory_overwrites_last_ckpt(tmp_path):
    for _ in range(2):  # `make demo` twice
        cfg = _compose([*TINY])
        cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
        run_training(cfg, output_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30


# What an option needs beside the default model and data; `python train.py --help` shows each next to the option.
NEEDS: dict[str, list[str]] = {
    "model/char_gpt": ["datamodule=shakespeare"],
    "model/hf_gpt2": ["datamodule=shakespeare"],
    "datamodule/digits": ["model=mlp", "model.net.in_features=64"],
    "datamodule/shakespeare": ["model=char_gpt"],
    "pruning/two_four": ["model=mlp"],
    "model/hf_pretrained": ["datamodule=shakespeare_lines"],
    "datamodule/shakespeare_lines": ["model=hf_pretrained"],
    "recovery/distill_embeddings": ["model=hf_pretrained", "datamodule=shakespeare_lines"],
}
GROUPS = ("model", "datamodule", "pruning", "recovery")
CONF = ROOT / "pat_callbacks" / "conf"
OPTIONS = [f"{group}/{path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
FEW_STEPS = ["trainer.enable_progress_bar=false", "num_threads=1"]
SMALL_TEXT = ["datamodule.max_eval_windows=8", "datamodule.batch_size=4", "+trainer.limit_val_batches=1"]
SMALL_LINES = ["datamodule.val_size=8", "datamodule.test_size=8", "datamodule.batch_size=4"]


def _few_steps(overrides: list[str], steps: int = 8) -> list[str]:
    text = any(word in o for o in overrides for word in ("shakespeare", "recipe=lm_", "char_gpt", "hf_gpt2"))
    lines = any("shakespeare_lines" in o for o in overrides)  # no windows: a few held-out lines instead
    small = SMALL_LINES if lines else SMALL_TEXT if text else []
    return [*overrides, f"trainer.max_steps={steps}", *FEW_STEPS, *small]


def _help_text() -> str:
    return (ROOT / "pat_callbacks" / "conf" / "hydra" / "help" / "pat_callbacks_train.yaml").read_text()


def test_help_names_what_each_option_needs_beside_the_default_model():
    text = _help_text()
    for option, needs in NEEDS.items():
        name = option.split("/")[1]
        assert re.search(rf"{name} \((?:use )?with {re.escape(needs[0])}", text), (option, needs)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_group_option_runs_a_few_steps(tmp_path, monkeypatch, option):
    monkeypatch.chdir(ROOT)
    group, name = option.split("/")
    plus = "+" if group in ("pruning", "recovery") else ""
    overrides = [f"{plus}{group}={name}", *NEEDS.get(option, [])]
    if "model=char_gpt" in overrides or option == "model/char_gpt":
        overrides += ["model.net.dim=32"]
    if option == "model/hf_gpt2":
        overrides += ["model.net.config.n_embd=32"]
    if "model=hf_pretrained" in overrides or option == "model/hf_pretrained":  # a tiny folder: a GPT-2, or an encoder
        kind = "bert" if option == "recovery/distill_embeddings" else "gpt2"
        overrides += [f"model.path={tiny_model_folder(tmp_path / kind, kind)}", "datamodule.max_length=16"]
    cfg = _compose(_few_steps(overrides))
    cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["global_step"] == 8


def _help_examples() -> list[str]:
    return re.findall(r"^  python train\.py (.*?)\s*(?:#.*)?$", _help_text(), re.M)


def _readme_examples() -> list[str]:
    """The ``python train.py ...`` lines of the README's "This repository's train.py" block (no sweeps, no <dir>)."""
    section = (ROOT / "README.md").read_text().split("### This repository's `train.py`")[1]
    block = section.split("```bash\n")[1].split("```")[0]
    lines = re.findall(r"^python train\.py ?(.*?)\s*(?:#.*)?$", block, re.M)
    return [line for line in lines if not line.startswith("-m") and "<" not in line]


def test_help_examples_are_found():
    assert len(_help_examples()) >= 8


def test_readme_examples_are_found():
    assert len(_readme_examples()) >= 7


EXAMPLES = sorted({e for e in [*_help_examples(), *_readme_examples()] if not e.startswith("-m ")})


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_help_example_runs_a_few_steps(tmp_path, monkeypatch, example):
    """Each ``python train.py ...`` line of ``--help`` and of the README's train.py block as shown, for a few steps
    (sweeps: tests/app/test_train.py; the resume line: the SIGKILL test above)."""
    monkeypatch.chdir(ROOT)
    overrides = shlex.split(example)
    start = max((int(n) for n in re.findall(r"start_step=(\d+)", example)), default=0)
    steps = 8 + math.ceil(start / 0.7)  # a window from `start` to the default end (70% of training) fits
    cfg = _compose(_few_steps(overrides, steps))
    cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["global_step"] == steps


def test_the_optuna_sweep_runs_without_progress_bars():
    """Each trial's bar left `[A` fragments in the sweep's console; the trials' result lines remain."""
    assert _compose(["hparams_search=optuna"]).trainer.enable_progress_bar is False
