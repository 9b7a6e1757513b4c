"""An own Lightning + Hydra project that uses pat-callbacks only as an installed package.

    pip install pat_callbacks-0.1.0-py3-none-any.whl
    python train.py                                          # dense
    python train.py +pruning=cubic                           # + the package's pruning/cubic.yaml (90%)
    python train.py +pruning=cubic pruning.update_every=20   # any key of the shipped config can be overridden
    python train.py -m +pruning=cubic,rigl                   # a sweep; then: pat-report multirun/<date>/<time>

The model and data are the project's own (project.py). Pruning is a Lightning callback instantiated from the
composed ``pruning`` node; ``PruningSummary`` writes metrics.json (reached sparsity, logged metrics) next to the
CSV log, and this script prints the sparsity it reached, counted as exact zeros of the pruned weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from pat_callbacks.callbacks.summary import PruningSummary


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    pl.seed_everything(cfg.seed, workers=True)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    pruning = instantiate(cfg.pruning) if cfg.get("pruning") else None
    out = Path(HydraConfig.get().runtime.output_dir)
    callbacks = [pruning, PruningSummary()] if pruning is not None else [PruningSummary()]
    trainer = pl.Trainer(**cfg.trainer, callbacks=callbacks, logger=CSVLogger(out, name="logs"), default_root_dir=out)
    trainer.fit(model, datamodule=data)
    test_acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]

    # The real sparsity: exact zeros of the weights the pruning callback targets (its store maps names to them).
    weights = pruning.store.params if pruning is not None else {}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    sparsity = zeros / total if total else 0.0
    result = {"sparsity": sparsity, "pruned_weights": total, "zeros": zeros, "test_acc": test_acc}
    (out / "sparsity.json").write_text(json.dumps(result, indent=2))
    print(f"reached sparsity {sparsity:.4f} ({zeros} of {total} pruned weights are zero), test accuracy {test_acc:.4f}")


if __name__ == "__main__":
    main()
