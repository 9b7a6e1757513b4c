"""No loader of the package, the bench or train.py runs code from a checkpoint (issue #24): every ``torch.load`` they
call passes ``weights_only=True``, and the resume path of train.py refuses a code-carrying checkpoint even with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set (which would turn torch's default off)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pat_callbacks.app.config import register_configs
from pat_callbacks.app.run import CONF_DIR, run_training

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["pat_callbacks", "bench", "hydra_plugins", "examples", "train.py"]


def _torch_loads(path: Path) -> list[ast.Call]:
    """Every call ``torch.load(...)`` in a file's code (not in its strings or comments)."""
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def _weights_only_true(call: ast.Call) -> bool:
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def test_every_torch_load_in_shipped_code_passes_weights_only_true():
    files = [p for name in SHIPPED for p in ([ROOT / name] if name.endswith(".py") else (ROOT / name).rglob("*.py"))]
    calls = {
        (path.relative_to(ROOT).as_posix(), call.lineno, _weights_only_true(call))
        for path in files
        for call in _torch_loads(path)
    }
    assert ("pat_callbacks/export/checkpoint.py", True) in {(path, ok) for path, _, ok in calls}  # the reader is seen
    assert all(ok for _, _, ok in calls), sorted(calls)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_train_py_resume_refuses_a_code_carrying_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default would now run the payload
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "callbacks": {}, "payload": _Payload(marker)}, crafted)
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", [f"ckpt_path={crafted}", "trainer=tiny", "trainer.max_steps=2", "~callbacks.checkpoint", "~logger"]
        )
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        run_training(cfg, output_dir=tmp_path / "run")
    assert not marker.exists()
