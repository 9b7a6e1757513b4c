"""Hydra search-path plugin installed with pat-callbacks: every Hydra app sees the shipped configs.

Hydra imports every module under the ``hydra_plugins`` namespace package when an app starts and calls
``manipulate_search_path`` of each ``SearchPathPlugin`` it finds. This one appends ``pkg://pat_callbacks.conf``
(after the app's own config directory, so the app's configs win on a name clash) and registers the
structured-config schemas the shipped pruning YAMLs extend (ConfigStore group ``schema/pruning``). An own project
then composes ``python train.py +pruning=cubic`` with its own model and data, importing nothing from the library in
its ``train.py`` for it.

The module level imports only Hydra (plugin discovery imports this module in every Hydra app of the environment);
the library is imported when the search path is built.
"""

from __future__ import annotations

import importlib

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "pat-callbacks"
SEARCH_PATH = "pkg://pat_callbacks.conf"


class PatCallbacksSearchPathPlugin(SearchPathPlugin):
    """Appends the configs shipped in ``pat_callbacks/conf`` and registers their schemas."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        importlib.import_module("pat_callbacks.app.config")  # registers schema/pruning/* in Hydra's ConfigStore

        search_path.append(provider=PROVIDER, path=SEARCH_PATH)
