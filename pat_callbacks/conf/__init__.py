"""The Hydra configs shipped with pat-callbacks (package data; a package so ``pkg://pat_callbacks.conf`` resolves).

``pruning/`` holds the pruning configs any Hydra project can compose (``python train.py +pruning=cubic``; the
``hydra_plugins.pat_callbacks_searchpath`` plugin puts this directory on every Hydra app's search path), and
``train.yaml`` with ``model/``, ``datamodule/``, ``trainer/``, ``logger/``, ``recipe/``, ``hparams_search/`` and
``hydra/`` is the configuration of this repository's ``train.py``.
"""
