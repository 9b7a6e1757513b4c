"""Hydra edges of issue #24: a typed trainer group (``trainer.max_steps=abc`` fails at composition naming the key)
and the documented sweep ``-m +pruning=cubic,rigl pruning.sparsity=0.8,0.9 pruning.update_every=5``."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from pat_callbacks.app.config import (
    TrainerConf,
    check_against_schema,
    check_trainer_keys,
    promote_swept_group_keys,
    register_configs,
)
from pat_callbacks.app.run import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _chain(error: BaseException) -> str:
    """The message of an exception and of every cause, as Hydra prints them."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.enable_progress_bar=often", "trainer.enable_progress_bar"),
        ("trainer.accumulate_grad_batches=1.5", "trainer.accumulate_grad_batches"),
        ("trainer.gradient_clip_val=strong", "trainer.gradient_clip_val"),
    ],
)
@pytest.mark.parametrize("group", ["trainer=default", "trainer=tiny"])
def test_a_bad_trainer_value_fails_at_composition_naming_the_key(override, key, group):
    with pytest.raises(ConfigCompositionException) as excinfo:
        _compose(group, override)
    assert f"full_key: {key}" in _chain(excinfo.value)


def test_good_trainer_values_compose_with_their_types():
    cfg = _compose("trainer.max_steps=12", "trainer.gradient_clip_val=1", "trainer.precision=16", "trainer.devices=2")
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val, cfg.trainer.precision) == (12, 1.0, "16")
    assert cfg.trainer.devices == 2
    cfg = _compose("+trainer.limit_val_batches=1")  # other Trainer arguments are still added with +
    assert cfg.trainer.limit_val_batches == 1


def _trainer_keys_used() -> set[str]:
    """Every `trainer.X=` of the README, the Makefile and the recipes' YAML `trainer:` blocks (not `+trainer.X`)."""
    used = set()
    for path in [ROOT / "README.md", ROOT / "Makefile", ROOT / "pat_callbacks" / "app" / "run.py"]:
        used |= set(re.findall(r"(?<![+\w.])trainer\.(\w+)=", path.read_text()))
    for path in (ROOT / "pat_callbacks" / "conf" / "recipe").glob("*.yaml"):
        used |= set((yaml.safe_load(path.read_text()) or {}).get("trainer") or {})
    return used


def test_the_schema_has_every_key_the_shipped_configs_and_readme_use():
    fields = {field.name for field in dataclasses.fields(TrainerConf)}
    for path in (ROOT / "pat_callbacks" / "conf" / "trainer").glob("*.yaml"):
        keys = set(yaml.safe_load(path.read_text())) - {"defaults"}
        assert keys <= fields, (path.name, keys - fields)
        assert "/schema/trainer/lightning@_here_" in path.read_text() or "- default" in path.read_text(), path
    used = _trainer_keys_used()
    assert "max_steps" in used and used <= fields, used - fields


def test_an_added_trainer_key_that_lightning_does_not_take_is_refused():
    cfg = _compose("+trainer.max_step=5")  # composes (+ adds), refused before anything is built
    with pytest.raises(ValueError, match=r"Unknown key `trainer.max_step` .* did you mean `max_steps`\?"):
        check_trainer_keys(cfg.trainer)
    with pytest.raises(ValueError, match=r"`trainer.logger` is set by train.py: use the `logger` group"):
        check_trainer_keys(_compose("+trainer.logger=false").trainer)


def test_promoted_keys_are_still_typed_and_set_in_every_job():
    for method in ("cubic", "rigl"):
        cfg = _compose(f"+pruning={method}", "pruning.sparsity=0.8", "++pruning.update_every=5")
        assert cfg.pruning.update_every == 5 and cfg.pruning.sparsity == 0.8
    with pytest.raises(ConfigCompositionException) as excinfo:
        _compose("+pruning=rigl", "++pruning.update_every=often")
    assert "full_key: pruning.update_every" in _chain(excinfo.value)


def test_promotion_leaves_single_runs_swept_keys_and_prefixed_keys_alone():
    argv = [
        "-m",
        "+pruning=cubic,rigl",
        "pruning.sparsity=0.8,0.9",
        "+pruning.x=1",
        "~pruning.y",
        "seed=1",
        "model=mlp",
    ]
    assert promote_swept_group_keys(argv) == argv
    assert promote_swept_group_keys(["+pruning=cubic", "pruning.update_every=5"]) == [
        "+pruning=cubic",
        "pruning.update_every=5",
    ]
    swept = ["--multirun", "model=mlp,convbase", "model.width=3"]  # a group with a default: Hydra composes it
    assert promote_swept_group_keys(swept) == swept


_TASK = """
import json, sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from pat_callbacks.app.config import promote_swept_group_keys, register_configs

register_configs()


@hydra.main(config_path="pkg://pat_callbacks.conf", config_name="train", version_base="1.3")
def main(cfg):
    out = Path(sys.argv[0]).parent / f"job{hydra.core.hydra_config.HydraConfig.get().job.num}.json"
    out.write_text(json.dumps(OmegaConf.to_container(cfg.pruning)))


if __name__ == "__main__":
    if PROMOTE:
        sys.argv[1:] = promote_swept_group_keys(sys.argv[1:])
    main()
"""


def _sweep(tmp_path: Path, promote: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent(_TASK).replace("PROMOTE", str(promote)))
    argv = ["-m", "+pruning=cubic,rigl", "pruning.sparsity=0.8,0.9", "pruning.update_every=5"]
    argv += [f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=300)


def test_the_documented_sweep_composes_four_jobs_with_the_fixed_key(tmp_path):
    done = _sweep(tmp_path, promote=True)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(4)]
    assert sorted((job["_target_"].rsplit(".", 1)[1], job["sparsity"]) for job in jobs) == [
        ("DynamicSparseTraining", 0.8),
        ("DynamicSparseTraining", 0.9),
        ("GradualPruning", 0.8),
        ("GradualPruning", 0.9),
    ]
    assert all(job["update_every"] == 5 for job in jobs)


def test_without_promotion_hydra_refuses_the_fixed_key(tmp_path):
    """Why train.py promotes: Hydra's sweep base config has no `pruning` node (documents Hydra 1.3's behaviour)."""
    done = _sweep(tmp_path, promote=False)
    assert done.returncode == 1 and "Key 'pruning' is not in struct" in done.stderr, done.stderr[-2000:]


def test_a_typo_of_a_renamed_key_suggests_its_new_name():
    # `final_sparsty` is closest to the former name `final_sparsity`: the hint is its new name, not `initial_sparsity`
    cfg = _compose("+pruning=cubic", "+pruning.final_sparsty=0.9")
    with pytest.raises(ValueError) as excinfo:
        check_against_schema(cfg.pruning)
    message = str(excinfo.value)
    assert "Unknown key `pruning.final_sparsty`" in message
    assert "did you mean `sparsity` (the new name of `final_sparsity`)?" in message
    assert "initial_sparsity" not in message
    # a typo of a deprecated field of the schema points at the new name too
    cfg = _compose("+pruning=cubic", "+pruning.regrow_fractin=0.1")
    with pytest.raises(ValueError, match=r"did you mean `drop_fraction` \(the new name of `regrow_fraction`\)\?"):
        check_against_schema(cfg.pruning)
    cfg = _compose("+pruning=cubic", "+pruning.sparsty=0.9")  # a plain typo is unchanged
    with pytest.raises(ValueError, match=r"did you mean `sparsity`\?$"):
        check_against_schema(cfg.pruning)
