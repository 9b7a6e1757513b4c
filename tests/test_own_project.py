"""The wheel on its own: build it, install it (not editable) into a fresh venv, run examples/own_project from it.

The fresh venv gets pat-callbacks only from the wheel; its third-party dependencies (torch, Lightning, Hydra, ...)
come from this environment's site-packages through a ``.pth`` line (processed like a path entry, so this
environment's editable-install hook for the repository is not run). The example runs from a copy outside the
repository, so neither the repository's ``pat_callbacks/`` nor its ``hydra_plugins/`` folder can be imported: the
shipped configs, the search-path plugin and the schemas must all come from the installed wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_project"

pytestmark = pytest.mark.wheel


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"{run.args}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this checkout installed; returns its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # build from a copy: no build/ or *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pat_callbacks", "hydra_plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    _ok(
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, "."], source)
    )
    (wheel,) = dist.glob("pat_callbacks-*.whl")

    env_dir = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp))
    python = env_dir / "bin" / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp))
    site = Path(
        _ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)).stdout.strip()
    )
    (site / "_pat_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the example outside the repository."""
    copy = tmp_path_factory.mktemp("own") / "own_project"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "outputs", "multirun"))
    return copy


def test_the_package_and_its_configs_come_from_the_wheel(venv, project):
    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"  # the project's own conf
        "    cfg = compose('config', overrides=['+pruning=cubic', '+pruning@dst=rigl'])\n"
        "import pat_callbacks, hydra_plugins.pat_callbacks_searchpath as plugin\n"
        "print(pat_callbacks.__file__); print(plugin.__file__)\n"
        "print(cfg.pruning._target_, cfg.pruning.schedule, cfg.dst._target_, cfg.dst.seed)\n"
    )
    run = _ok(_run([venv, "-c", script, project / "conf"], project))
    package, plugin, composed = run.stdout.strip().splitlines()
    env_dir = venv.parent.parent
    assert Path(package).is_relative_to(env_dir) and Path(plugin).is_relative_to(env_dir)
    assert not Path(package).is_relative_to(ROOT)
    # composed from the shipped pruning/*.yaml with the project's own config; rigl needs no `seed` key of the app
    assert composed == "pat_callbacks.GradualPruning cubic pat_callbacks.DynamicSparseTraining 0"


def test_own_project_prunes_with_the_shipped_cubic_config(venv, project):
    run = _ok(
        _run(
            [
                venv,
                "train.py",
                "+pruning=cubic",
                "trainer.max_steps=60",
                "trainer.val_check_interval=30",
                "pruning.update_every=5",
                "hydra.run.dir=outputs/cubic",
            ],
            project,
        )
    )
    printed = re.search(r"reached sparsity (\S+) \((\d+) of (\d+) pruned weights are zero\)", run.stdout)
    assert printed is not None, run.stdout[-2000:]
    assert float(printed[1]) == pytest.approx(0.9, abs=0.001) and int(printed[3]) == 64 * 64 * 2 + 64 * 10
    written = json.loads((project / "outputs" / "cubic" / "sparsity.json").read_text())
    assert written["sparsity"] == pytest.approx(0.9, abs=0.005) and written["pruned_weights"] == 64 * 64 * 2 + 64 * 10
    summary = json.loads((project / "outputs" / "cubic" / "logs" / "version_0" / "metrics.json").read_text())
    assert summary["sparsity"] == pytest.approx(written["sparsity"]) and summary["global_step"] == 60
    assert {"train/loss", "val/acc", "test/acc"} <= set(summary["metrics"])

    # pat-report, installed with the wheel, reads the own project's run
    report = _ok(_run([venv.parent / "pat-report", "outputs", "--out", "report", "--no-plots"], project))
    assert "| 0.9 | 1 |" in report.stdout and "test acc %" in report.stdout, report.stdout
