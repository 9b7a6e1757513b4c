"""``PruningSummary``: a ``metrics.json`` for any Lightning run, the file ``pat-report`` reads.

Add it to any project's ``Trainer(callbacks=[...])``. At the end of ``fit`` and of ``test`` it writes into the run's
log directory (``trainer.log_dir``: the CSV or TensorBoard version folder, else ``default_root_dir``):

- ``sparsity`` / ``layer_sparsity``: exact zeros of the weights every pruning callback of the trainer targets
  (any callback with a ``store`` whose ``params`` maps names to parameters), overall and per tensor;
- ``weight_sparsity`` / ``weight_layer_sparsity``: exact zeros of every weight matrix of the model (see
  :func:`~pat_callbacks.core.targets.weight_matrices`: parameters with two or more dimensions, embeddings included,
  tied tensors once), pruned or not;
- ``method``, ``target_sparsity``: what the pruning callbacks aimed at (``"dense"`` and 0 without one);
- ``metrics``: every float in ``trainer.callback_metrics`` seen at the end of fit and test (later values win);
- ``global_step``, ``fit_seconds``, ``time`` (when the file was written) and ``stage``.

Zeros are counted on the parameters themselves, not read from masks, so the numbers hold whatever produced them.

Example:
    >>> import tempfile, json, pathlib
    >>> import lightning.pytorch as pl
    >>> from pat_callbacks import GradualPruning
    >>> from pat_callbacks.app.data import DigitsDataModule
    >>> from pat_callbacks.app.models import MLP, Classifier
    >>> _ = pl.seed_everything(0, verbose=False)
    >>> pruning = GradualPruning(sparsity=0.5, start_step=0, end_step=10, update_every=5)
    >>> root = tempfile.mkdtemp()
    >>> trainer = pl.Trainer(max_steps=12, callbacks=[pruning, PruningSummary()], logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ...                      default_root_dir=root)
    >>> trainer.fit(Classifier(MLP(64, (32,), 10)), datamodule=DigitsDataModule(batch_size=64))
    >>> summary = json.loads((pathlib.Path(root) / "metrics.json").read_text())
    >>> summary["sparsity"], summary["global_step"], sorted(summary["layer_sparsity"])
    (0.5, 12, ['net.layers.0.weight', 'net.layers.2.weight'])
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pat_callbacks.core.targets import weight_matrices

__all__ = ["PruningSummary", "pruning_callbacks", "weight_matrices"]


def pruning_callbacks(callbacks: Iterable[Any]) -> list[Any]:
    """The callbacks that prune: those with a ``store`` whose ``params`` is a mapping of names to parameters.

    Example:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> pruning = SimpleNamespace(store=SimpleNamespace(params={"w": torch.nn.Parameter(torch.ones(2, 2))}))
        >>> pruning_callbacks([pruning, SimpleNamespace(store=None), object()]) == [pruning]
        True"""
    return [c for c in callbacks if isinstance(getattr(getattr(c, "store", None), "params", None), Mapping)]


def _zeros(params: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Overall and per-tensor fraction of exact zeros; (0.0, {}) for no tensors."""
    per_layer = {name: int((p.detach() == 0).sum()) / max(p.numel(), 1) for name, p in params.items()}
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    return (zeros / total if total else 0.0), per_layer


def _live(params: Mapping[str, Tensor], model: Any) -> dict[str, Tensor]:
    """The model's own parameters under the targets' names (a layer replaced mid-run is counted as it is now; a
    target the model no longer has is left out), or ``params`` as given when the model cannot be asked.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> old = {"weight": model.weight}
        >>> model.weight = nn.Parameter(torch.zeros(2, 2))
        >>> bool((_live(old, model)["weight"] == 0).all())
        True
    """
    if not hasattr(model, "get_parameter"):
        return dict(params)
    live = {}
    for name in params:
        try:
            live[name] = model.get_parameter(name)
        except AttributeError:
            continue
    return live


def _target(callback: Any) -> float | None:
    for attr in ("sparsity", "final_sparsity"):
        value = getattr(callback, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            out[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class PruningSummary(pl.Callback):
    """Write ``metrics.json`` (reached sparsity, logged metrics, steps, time) at the end of fit and of test.

    Args:
        filename: name of the file written into the log directory.
        dirpath: write here instead of ``trainer.log_dir`` (``default_root_dir`` when there is no logger).

    Example:
        >>> PruningSummary().filename
        'metrics.json'
    """

    def __init__(self, filename: str = "metrics.json", dirpath: str | Path | None = None) -> None:
        if (
            not isinstance(filename, str)
            or Path(filename).name != filename
            or filename in ("", ".", "..")
            or "\x00" in filename
        ):
            raise ValueError(
                f"Expected `filename` to be a plain file name, but got {filename!r} (a name without a folder, not "
                "'.' or '..', without a NUL character)"
            )
        if dirpath is not None and "\x00" in str(dirpath):
            raise ValueError(f"Expected `dirpath` to be a folder path, but got {str(dirpath)!r} (it holds a NUL)")
        self.filename = filename
        self.dirpath = dirpath
        self.metrics: dict[str, float] = {}
        self.fit_seconds: float | None = None
        self._fit_start: float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self.fit_seconds = round(time.perf_counter() - self._fit_start, 2)
        self.write(trainer, pl_module, stage="fit")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module, stage="test")

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> dict[str, Any]:
        """What ``metrics.json`` holds, as a dict (the callback's metrics so far, updated from the trainer).

        Example:
            >>> import lightning.pytorch as pl
            >>> from pat_callbacks.app.models import MLP, Classifier
            >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False)
            >>> out = PruningSummary().summary(trainer, Classifier(MLP(64, (32,), 10)))
            >>> out["method"], out["sparsity"], sorted(out["weight_layer_sparsity"])
            ('dense', 0.0, ['net.layers.0.weight', 'net.layers.2.weight'])
        """
        self.metrics.update(_floats(trainer.callback_metrics))
        pruners = pruning_callbacks(trainer.callbacks)
        targets: dict[str, Tensor] = {}
        seen: set[int] = set()
        for callback in pruners:
            for name, param in _live(callback.store.params, pl_module).items():
                if id(param) not in seen:
                    seen.add(id(param))
                    targets[name] = param
        weights = weight_matrices(pl_module)
        weight_overall, weight_layers = _zeros(weights)
        overall, per_layer = _zeros(targets) if pruners else (weight_overall, weight_layers)
        names = [str(getattr(c, "method_name", type(c).__name__)) for c in pruners]
        goals = [_target(c) for c in pruners]
        return {
            "method": "+".join(names) if names else "dense",
            "target_sparsity": (goals[0] if len(goals) == 1 else None) if pruners else 0.0,
            "sparsity": overall,
            "layer_sparsity": per_layer,
            "weight_sparsity": weight_overall,
            "weight_layer_sparsity": weight_layers,
            "metrics": dict(self.metrics),
            "global_step": int(trainer.global_step),
            "fit_seconds": self.fit_seconds,
            "stage": stage,
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        }

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> Path | None:
        """Write the summary into the log directory (on global rank 0 only); return the file's path there.

        Example:
            >>> import tempfile, lightning.pytorch as pl
            >>> from pat_callbacks.app.models import MLP, Classifier
            >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False, default_root_dir=tempfile.mkdtemp())
            >>> PruningSummary().write(trainer, Classifier(MLP(64, (32,), 10))).name
            'metrics.json'
        """
        directory = Path(self.dirpath if self.dirpath is not None else trainer.log_dir or trainer.default_root_dir)
        summary = self.summary(trainer, pl_module, stage)
        if not trainer.is_global_zero:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename
        path.write_text(json.dumps(summary, indent=2))
        return path
