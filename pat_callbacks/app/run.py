"""The training job behind ``train.py``: instantiate what the Hydra config names, fit, test, report.

Kept out of ``train.py`` so tests and notebooks can call it with a composed config.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from pat_callbacks.app.config import check_against_schema, check_trainer_keys
from pat_callbacks.app.models.pretrained import check_pretrained_config
from pat_callbacks.app.report import weight_sparsity
from pat_callbacks.app.weights import check_initial_weights, load_initial_weights
from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core.targets import select_parameters, weight_matrices

__all__ = ["CONF_DIR", "check_resume_checkpoint", "run_training"]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the Hydra configs shipped in the package


def run_training(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit and test the configured model; write ``metrics.json`` and return its content.

    Everything named in the config is instantiated (so a bad pruning value fails here, before training).

    Example:
        >>> import tempfile
        >>> from hydra import compose, initialize_config_dir
        >>> from pat_callbacks.app.config import register_configs
        >>> register_configs()
        >>> with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ...     cfg = compose("train", overrides=["trainer=tiny", "trainer.max_steps=5", "+pruning=cubic",
        ...                                       "~callbacks.checkpoint", "~logger"])
        >>> metrics = run_training(cfg, output_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
        [pat-callbacks] cubic/taylor/global: test accuracy ...
        >>> metrics["global_step"], round(metrics["sparsity"], 2)
        (5, 0.9)
    """
    _check_optimized_metric(cfg)
    if cfg.get("pruning"):
        check_against_schema(cfg.pruning, "pruning")
    check_trainer_keys(cfg.trainer, "trainer")
    check_pretrained_config(cfg)  # model=hf_pretrained: model.path and the datamodule, named before anything is built
    init_weights = check_initial_weights(cfg.get("init_weights"))  # a missing file fails before anything is built
    # Noise from Lightning internals: an absent validation split is intended, and LeafSpec is its own deprecation.
    warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if cfg.get("quiet", False):
        _quiet_lightning_startup()
    output_dir = Path(output_dir if output_dir is not None else _hydra_output_dir())
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())

    datamodule = instantiate(cfg.datamodule)
    model = instantiate(cfg.model)
    if init_weights is not None and cfg.get("ckpt_path"):  # the checkpoint's weights win: say so, load nothing
        logging.getLogger(__name__).warning("init_weights=%s is not loaded: resuming from ckpt_path", init_weights)
    elif init_weights is not None:
        where = load_initial_weights(model, init_weights)
        logging.getLogger(__name__).info("init_weights: loaded %s into the %s", init_weights, where)
    pruning = instantiate(cfg.pruning) if cfg.get("pruning") else None
    callbacks: list[pl.Callback] = [pruning] if pruning is not None else []
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # e.g. trainer=tiny: Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    check_resume_checkpoint(cfg.get("ckpt_path"), callbacks)
    # A callback of another tool (bench/peers.py's ModelPruning) reports as the method if it names itself.
    named = pruning if pruning is not None else next((c for c in callbacks if hasattr(c, "method_name")), None)
    logger = instantiate(cfg.logger, save_dir=str(output_dir)) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir))

    start_step = _StartStep()
    trainer.callbacks.append(start_step)
    start = time.perf_counter()
    # weights_only=True whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: a checkpoint to resume from runs no code.
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_seconds = time.perf_counter() - start  # this process only: a resumed run says where it took over
    resumed_at = start_step.step if start_step.step else None
    val_metrics: dict[str, float] = {}
    if _has_validation(cfg, datamodule):  # the final model's validation metrics (what sweeps optimise)
        val_metrics = _flat(trainer.validate(model, datamodule=datamodule, verbose=False))
    test_metrics = _flat(trainer.test(model, datamodule=datamodule, verbose=False))

    params = (
        pruning.store.params if isinstance(pruning, PruningCallback) and pruning.store else select_parameters(model)
    )
    overall, per_layer = weight_sparsity(params)
    metrics = {
        **{key: test_metrics.get(key) for key in ("test_acc", "test_loss")},
        **{key: value for key, value in test_metrics.items() if key not in ("test_acc", "test_loss")},
        "val_acc": val_metrics.get("val_acc"),
        **{key: value for key, value in val_metrics.items() if key != "val_acc"},
        "sparsity": overall,
        "sparsity_all": weight_sparsity(weight_matrices(model))[0],
        "layer_sparsity": per_layer,
        # A recovery callback alone (+recovery=qat_int8) names the method but has no target: 0.
        "target_sparsity": float(getattr(named, "final_sparsity", 0.0) or 0.0) if named is not None else 0.0,
        "method": getattr(named, "method_name", type(named).__name__) if named is not None else "dense",
        "global_step": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 2),
        "fit_steps": int(trainer.global_step) - (resumed_at or 0),
        "resumed_at_step": resumed_at,
        "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if trainer.is_global_zero:
        quality = next(
            (f"test {name} {metrics[key]:.4f}" for key, name in _QUALITY if metrics.get(key) is not None),
            f"test bits/char {float('nan'):.4f}",
        )
        print(
            f"[pat-callbacks] {metrics['method']}: {quality}, "
            f"sparsity {overall:.4f} (target {metrics['target_sparsity']:.4f}; all weight matrices "
            f"{metrics['sparsity_all']:.4f}), {metrics['global_step']} steps"
            + (f" (resumed at step {resumed_at}: {metrics['fit_steps']} steps" if resumed_at else "")
            + f" in {fit_seconds:.1f}s{')' if resumed_at else ''} "
            f"-> {output_dir / 'metrics.json'}"
        )
    return metrics


# What the summary line reports, the first the run logged: accuracy, bits/char, a pretrained encoder's embedding
# fidelity to the dense model, a pretrained causal LM's loss (nats per token).
_QUALITY = (("test_acc", "accuracy"), ("test_bpc", "bits/char"), ("test_fidelity", "fidelity"), ("test_loss", "loss"))


def check_resume_checkpoint(ckpt_path: str | None, callbacks: list[pl.Callback]) -> None:
    """Refuse ``ckpt_path="last"`` when no ``ModelCheckpoint`` directory holds a ``last*.ckpt`` to resume from.

    Lightning only warns ("no last checkpoint available") and trains from step 0 again, which reads as a resumed run
    that lost its progress; a run asked to resume stops here instead, naming the directory it searched.

    Example:
        >>> import tempfile
        >>> saver = ModelCheckpoint(dirpath=tempfile.mkdtemp(), save_last=True, every_n_train_steps=500)
        >>> check_resume_checkpoint(None, [saver])  # a new run: nothing to check
        >>> check_resume_checkpoint("last", [saver])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: ckpt_path=last: nothing to resume, no last.ckpt in .../ (checkpoints are written every \
500 steps: ...
        >>> _ = (Path(saver.dirpath) / "last.ckpt").write_bytes(b"")
        >>> check_resume_checkpoint("last", [saver])
    """
    if ckpt_path != "last":
        return
    savers = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath]
    if not savers:
        raise ValueError(
            "ckpt_path=last: no ModelCheckpoint with save_last=true to resume from (callbacks.checkpoint was removed?)"
        )
    if any(any(Path(c.dirpath).glob("last*.ckpt")) for c in savers):
        return
    where = ", ".join(f"{c.dirpath}/" for c in savers)
    every = ", ".join(str(c._every_n_train_steps) for c in savers if c._every_n_train_steps)
    raise FileNotFoundError(
        f"ckpt_path=last: nothing to resume, no last.ckpt in {where} "
        f"(checkpoints are written {f'every {every} steps' if every else 'at epoch ends'}: "
        "the run was stopped before its first one, or hydra.run.dir is not the interrupted run's directory); "
        "rerun without ckpt_path=last to start from step 0"
    )


_STARTUP_NOISE = ("💡 Tip", "GPU available", "TPU available", "HPU available", "Seed set to", "`Trainer.fit` stopped")


class _DropStartupNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_STARTUP_NOISE)


def _quiet_lightning_startup() -> None:
    """Drop Lightning's start-up tips, device lines and seed / stop notices from the console (``quiet: true``);
    warnings and the pruning callbacks' own messages stay."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropStartupNoise) for f in log.filters):
            log.addFilter(_DropStartupNoise())


class _StartStep(pl.Callback):
    """The global step training starts from (non-zero when resumed from a checkpoint)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = int(trainer.global_step)


def _flat(results: list[dict[str, Any]]) -> dict[str, float]:
    """Lightning's ``[{"test/acc": ...}]`` as ``{"test_acc": ...}``."""
    return {key.replace("/", "_"): float(value) for result in results for key, value in result.items()}


def _has_validation(cfg: DictConfig, datamodule: Any) -> bool:
    if "val_size" in cfg.datamodule:
        return bool(cfg.datamodule.val_size)
    return bool(getattr(datamodule, "val_docs", None))


SWEEPABLE_METRICS = (
    "test_acc",
    "val_acc",
    "test_loss",
    "test_bpc",
    "val_bpc",
    "sparsity",
    "sparsity_all",
    "fit_seconds",
)


def _check_optimized_metric(cfg: DictConfig) -> None:
    """Refuse, before training, a metric a sweeper cannot get back from this run."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        return
    if metric not in SWEEPABLE_METRICS:
        raise ValueError(f"Unknown `optimized_metric` {metric!r}; expected one of: {', '.join(SWEEPABLE_METRICS)}")
    if metric == "val_acc" and not cfg.datamodule.get("val_size"):
        raise ValueError("optimized_metric='val_acc' needs a validation split: set datamodule.val_size > 0")


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir
