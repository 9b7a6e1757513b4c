"""`+pruning=wanda` / `+pruning=sparsegpt` compose against their schema and build an OneShotPruning."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pat_callbacks import OneShotPruning
from pat_callbacks.app.config import check_against_schema, register_configs
from pat_callbacks.app.run import CONF_DIR


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(("name", "method"), [("wanda", "wanda"), ("sparsegpt", "sparsegpt")])
def test_configs_build_the_callback(name, method):
    cfg = _compose(f"+pruning={name}", "pruning.owl=true", "pruning.sparsity=0.7")
    check_against_schema(cfg.pruning)
    callback = instantiate(cfg.pruning)
    assert isinstance(callback, OneShotPruning)
    assert (callback.one_shot.method, callback.one_shot.owl, callback.final_sparsity) == (method, True, 0.7)


def test_two_four_from_the_command_line():
    callback = instantiate(_compose("+pruning=wanda", "pruning.pattern='2:4'").pruning)
    assert callback.method_name == "one_shot/wanda 2:4"


def test_a_misspelled_key_fails_before_anything_is_built():
    cfg = _compose("+pruning=sparsegpt", "+pruning.dampening=0.1")
    with pytest.raises(ValueError, match="did you mean `damping`"):
        check_against_schema(cfg.pruning)


def test_a_bad_value_fails_when_instantiated():
    with pytest.raises(Exception, match="Unknown `method` 'obs'"):
        instantiate(_compose("+pruning=wanda", "pruning.method=obs").pruning)
