"""Hydra entry point: compose the packaged configs (``pat_callbacks/conf/``), train, test, write ``metrics.json``.

python train.py                                   # dense ConvBase on MNIST-1D
python train.py +pruning=cubic                    # + gradual pruning to 90% (Taylor scores, global threshold)
python train.py -m +pruning=cubic pruning.sparsity=0.5,0.8,0.9
python train.py -m +pruning=cubic,rigl pruning.sparsity=0.8,0.9 pruning.update_every=5   # 4 jobs, update_every=5 in all
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pat_callbacks.app.config import promote_swept_group_keys, register_configs
from pat_callbacks.app.run import run_training

register_configs()


@hydra.main(config_path="pkg://pat_callbacks.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train once; return ``optimized_metric`` (default: test accuracy), the value Hydra sweepers optimise."""
    metrics = run_training(cfg)
    return metrics[cfg.get("optimized_metric") or "test_acc"]


if __name__ == "__main__":
    # A fixed key of a swept group (`-m +pruning=cubic,rigl pruning.update_every=5`) as `++pruning.update_every=5`:
    # Hydra composes the sweep's base config without the group and would refuse the plain key there.
    sys.argv[1:] = promote_swept_group_keys(sys.argv[1:])
    main()
