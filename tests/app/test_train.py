"""train.py end to end: Hydra composition, the job itself, and a -m sweep (tiny limits)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pat_callbacks.app.config import register_configs
from pat_callbacks.app.run import CONF_DIR, run_training

register_configs()

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer=tiny", "trainer.max_steps=30", "num_threads=1"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def _without_hydra_paths(cfg, tmp_path):
    cfg.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    return cfg


@pytest.mark.parametrize("pruning", ["cubic", "linear", "exponential", "one_shot", "odd_even", "rigl", "set", "static"])
def test_every_pruning_config_runs_and_reaches_its_target(tmp_path, pruning):
    overrides = [*TINY, f"+pruning={pruning}", "pruning.sparsity=0.8", "pruning.update_every=10"]
    if pruning in ("one_shot", "odd_even"):
        overrides.pop()
    if pruning == "odd_even":
        overrides.append("pruning.phase_epochs=0.1")
    cfg = _without_hydra_paths(_compose(overrides), tmp_path)
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert set(metrics["layer_sparsity"]) == {
        "net.conv1.weight",
        "net.conv2.weight",
        "net.conv3.weight",
        "net.linear.weight",
    }
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test_acc"] == metrics["test_acc"] and 0.0 <= written["test_acc"] <= 1.0
    assert written["global_step"] == 30


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "movement", "fisher", "random"])
def test_every_criterion_runs_through_train_py_config(tmp_path, criterion):
    overrides = [*TINY, "+pruning=cubic", f"pruning.criterion={criterion}", "pruning.update_every=5"]
    cfg = _without_hydra_paths(_compose(overrides), tmp_path)
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_two_four_pattern_through_train_py_config(tmp_path):
    overrides = [*TINY, "model=mlp", "+pruning=two_four", "pruning.update_every=5"]
    metrics = run_training(_without_hydra_paths(_compose(overrides), tmp_path), output_dir=tmp_path)
    assert set(metrics["layer_sparsity"]) == {"net.layers.0.weight", "net.layers.2.weight", "net.layers.4.weight"}
    assert all(s == pytest.approx(0.5, abs=0.01) for s in metrics["layer_sparsity"].values())
    with pytest.raises(ValueError, match=r"'net\.conv1\.weight' has shape \(25, 1, 5\)"):
        run_training(_without_hydra_paths(_compose([*TINY, "+pruning=two_four"]), tmp_path), output_dir=tmp_path)


def test_sensitivity_allocation_through_train_py_config(tmp_path):
    overrides = [*TINY, "+pruning=cubic", "pruning.allocation=sensitivity", "pruning.max_sparsity=0.97"]
    cfg = _without_hydra_paths(_compose(overrides), tmp_path)
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert max(metrics["layer_sparsity"].values()) <= 0.97 + 1e-6


@pytest.mark.parametrize("model", ["char_gpt", "hf_gpt2"])
def test_language_models_on_shakespeare_prune_every_block_and_no_embedding(tmp_path, model):
    small = "model.net.dim=32" if model == "char_gpt" else "model.net.config.n_embd=32"
    context = "model.net.context=32" if model == "char_gpt" else "model.net.config.n_positions=32"
    overrides = [
        *TINY,
        f"model={model}",
        small,
        context,
        "datamodule=shakespeare",
        "datamodule.context=32",
        "datamodule.max_eval_windows=64",
        "+pruning=cubic",
        "pruning.sparsity=0.8",
        "pruning.update_every=5",
        "+trainer.limit_val_batches=1",
    ]
    metrics = run_training(_without_hydra_paths(_compose(overrides), tmp_path), output_dir=tmp_path)
    assert metrics["sparsity"] == pytest.approx(0.8, abs=0.01) and metrics["test_bpc"] > 0
    layers = set(metrics["layer_sparsity"])
    assert len(layers) == 8 and not any("embed" in name or "wte" in name or "head" in name for name in layers)
    assert 0.3 < metrics["sparsity_all"] < metrics["sparsity"]  # the dense tied embedding dilutes it


def test_dense_default_on_digits_with_mlp(tmp_path):
    cfg = _compose([*TINY, "datamodule=digits", "model=mlp", "model.net.in_features=64"])
    metrics = run_training(_without_hydra_paths(cfg, tmp_path), output_dir=tmp_path)
    assert metrics["method"] == "dense" and metrics["sparsity"] == 0.0


def test_bad_pruning_value_fails_before_training(tmp_path):
    cfg = _without_hydra_paths(_compose([*TINY, "+pruning=cubic", "pruning.sparsity=1.5"]), tmp_path)
    with pytest.raises(Exception, match=r"`sparsity` to be a float in \[0, 1\), but got 1.5"):
        run_training(cfg, output_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_resume_from_last_checkpoint_reaches_the_target(tmp_path):
    base = [*TINY, "+pruning=cubic", "pruning.sparsity=0.7"]
    first = _compose([*base, "trainer.max_steps=20"])
    first.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    run_training(first, output_dir=tmp_path / "a")
    resumed = _compose([*base, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    resumed.callbacks.checkpoint.dirpath = str(tmp_path / "checkpoints")
    metrics = run_training(resumed, output_dir=tmp_path / "b")
    assert metrics["global_step"] == 30 and metrics["sparsity"] == pytest.approx(0.7, abs=0.01)
    # fit_seconds times this process only: the metrics say where it took over.
    assert metrics["resumed_at_step"] == 20 and metrics["fit_steps"] == 10
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["resumed_at_step"] is None


def _train_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_train_py_command_line(tmp_path):
    run = _train_py([*TINY, "+pruning=cubic", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[pat-callbacks] cubic/taylor/global: test accuracy" in run.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_one_sweep_crosses_methods_and_targets_with_one_key(tmp_path):
    # GradualPruning and DynamicSparseTraining configs both take `pruning.sparsity`: 2 methods x 2 targets = 4 jobs.
    sweep = ["+pruning=cubic,rigl", "pruning.sparsity=0.5,0.8"]
    run = _train_py(["-m", *TINY, *sweep, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/metrics.json")]
    reached = sorted((m["method"].split("/")[0], m["target_sparsity"], round(m["sparsity"], 2)) for m in jobs)
    assert reached == [("cubic", 0.5, 0.5), ("cubic", 0.8, 0.8), ("rigl", 0.5, 0.5), ("rigl", 0.8, 0.8)]


def _pruning_from(overrides: list[str]):
    from hydra.utils import instantiate

    return instantiate(_compose([*TINY, *overrides]).pruning)


@pytest.mark.parametrize(
    ("overrides", "start", "end"),
    [
        (["+pruning=cubic"], 2, 20),  # 10% .. 70% of 30 steps: the callback's own default
        (["+pruning=cubic", "pruning.start_step=5"], 5, 20),  # a step wins over the default fraction
        (["+pruning=cubic", "pruning.end_step=12"], 2, 12),
        (["+pruning=cubic", "pruning.start_fraction=0.5", "pruning.end_epoch=0.75"], 14, 30),
        (["+pruning=linear", "pruning.start_step=5"], 5, 20),
        (["+pruning=structured", "pruning.end_step=25"], 2, 25),
        (["+pruning=one_shot"], 14, 14),  # one_shot's own default: half-way
        (["+pruning=one_shot", "pruning.start_step=3"], 3, 3),
        (["+pruning=odd_even", "pruning.phase_epochs=0.1", "pruning.start_step=4"], 4, 23),
        (["+recipe=gmp_cubic_90", "trainer.max_steps=30", "pruning.start_step=5"], 5, 20),
    ],
)
def test_one_window_key_on_the_command_line_wins_over_the_shipped_default(overrides, start, end):
    pruning = _pruning_from(overrides)
    schedule = pruning.spec.resolve(steps_per_epoch=40, total_steps=30)
    assert (schedule.start_step, schedule.end_step) == (start, end)


def test_two_units_for_one_bound_are_refused_naming_both_and_how_to_drop_one():
    with pytest.raises(Exception, match=r"start of the pruning window once.*start_step=5, start_fraction=0.2.*=null"):
        _pruning_from(["+pruning=cubic", "pruning.start_step=5", "pruning.start_fraction=0.2"])


def test_a_short_run_gets_about_ten_updates_and_an_explicit_coarse_interval_is_warned_about(tmp_path):
    # trainer=tiny (30 steps here): the shipped config leaves update_every unset, so the window (steps 2 to 20) gets
    # about 10 updates and no warning; an explicit update_every=100 would make the cubic ramp one jump: warned.
    cfg = _without_hydra_paths(_compose([*TINY, "+pruning=cubic"]), tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mask update.*")
        run_training(cfg, output_dir=tmp_path)
    cfg = _without_hydra_paths(_compose([*TINY, "+pruning=cubic", "pruning.update_every=100"]), tmp_path)
    with pytest.warns(UserWarning, match=r"window \(steps 2 to 20\).*update_every=100.*single jump.*update_every=1 "):
        run_training(cfg, output_dir=tmp_path)


def test_train_py_bad_override_fails_fast_with_the_value(tmp_path):
    run = _train_py([*TINY, "+pruning=cubic", "pruning.schedule=cubical", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0
    assert "Unknown `schedule` 'cubical'" in run.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.final_sparsty=0.5", "final_sparsty"),
        ("pruning.sparsity=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("pruning.update_every=often", "Value 'often' of type 'str' could not be converted to Integer"),
        ("pruning.keep_first=maybe", "Value 'maybe' is not a valid bool"),
    ],
)
def test_wrong_keys_and_types_fail_at_composition(override, message):
    with pytest.raises(Exception) as excinfo:
        _compose([*TINY, "+pruning=cubic", override])
    text = f"{excinfo.value} {excinfo.value.__cause__}"
    assert override.split("=")[0] in text and message in text


def test_dynamic_configs_are_checked_against_their_schema():
    with pytest.raises(Exception, match="drop_fractoin"):
        _compose([*TINY, "+pruning=rigl", "pruning.drop_fractoin=0.5"])
    with pytest.raises(Exception) as excinfo:
        _compose([*TINY, "+pruning=set", "pruning.sparsity=high"])
    assert "pruning.sparsity=high" in str(excinfo.value)
    assert "could not be converted to Float" in str(excinfo.value.__cause__)


RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_recipes_are_reachable_from_train_py():
    assert {"gmp_cubic_90", "odd_even_90", "rigl_90", "set_90", "lottery_rewind_90"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_runs_a_few_steps(tmp_path, recipe):
    short = ["trainer.max_steps=20", "trainer.enable_progress_bar=false", "num_threads=1"]
    short += ["pruning.rewind_step=2"] if recipe.startswith("lottery") else []  # step 300 is past 20 steps
    language_model = recipe.startswith("lm_")  # CharGPT on Shakespeare (bench/lm.py's budget)
    short += ["datamodule.max_eval_windows=32"] if language_model else []
    cfg = _compose([f"+recipe={recipe}", *short])
    network = "CharGPT" if language_model else "ConvBase"
    assert cfg.trainer.max_steps == 20 and cfg.model.net._target_.endswith(network)
    metrics = run_training(_without_hydra_paths(cfg, tmp_path), output_dir=tmp_path)
    assert metrics["global_step"] == 20
    if recipe.startswith("structured"):  # half the filters of each conv, with their coupled weights
        assert metrics["layer_sparsity"]["net.conv1.weight"] == pytest.approx(12 / 25)  # 12 of 25 filters
    else:
        expected = 0.5 if "two_four" in recipe else cfg.pruning.get("sparsity") or 0.9
        assert metrics["sparsity"] == pytest.approx(expected, abs=0.01)


def test_optuna_sweep_runs_two_trials_and_optimises_validation_accuracy(tmp_path):
    run = _train_py(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            *TINY,
            "datamodule.val_size=200",
            f"hydra.sweep.dir={tmp_path}/optuna",
        ],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in (tmp_path / "optuna").glob("*/metrics.json")]
    assert len(trials) == 2 and all(t["val_acc"] is not None for t in trials)
    assert all(t["sparsity"] == pytest.approx(0.9, abs=0.01) for t in trials)
    best = (tmp_path / "optuna" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "pruning." in best


def test_launcher_configs_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        local = compose(config_name="train", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
        slurm = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.timeout_min == 120


def test_unknown_optimized_metric_fails_before_training(tmp_path):
    cfg = _without_hydra_paths(_compose([*TINY, "optimized_metric=val_accuracy"]), tmp_path)
    with pytest.raises(ValueError, match="Unknown `optimized_metric` 'val_accuracy'; expected one of: test_acc"):
        run_training(cfg, output_dir=tmp_path)
    cfg = _without_hydra_paths(_compose([*TINY, "optimized_metric=val_acc"]), tmp_path)
    with pytest.raises(ValueError, match=r"needs a validation split: set datamodule\.val_size > 0"):
        run_training(cfg, output_dir=tmp_path)


def test_tensorboard_logger_config(tmp_path):
    cfg = _without_hydra_paths(_compose([*TINY, "logger=tensorboard", "+pruning=cubic"]), tmp_path)
    run_training(cfg, output_dir=tmp_path)
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_app_help_names_every_shipped_option_and_not_the_schema_group(tmp_path):
    run = _train_py(["--help"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "schema" not in run.stdout and "== Examples ==" in run.stdout
    listed: dict[str, str] = {}  # "group:" -> its line and continuation lines
    label = None
    for line in run.stdout.split("== Config groups")[1].split("== Examples ==")[0].splitlines()[1:]:
        if line and not line[0].isspace():
            label, _, line = line.partition(":")
        if label is not None:
            listed[label] = listed.get(label, "") + " " + line
    conf = Path(CONF_DIR)
    groups = ("model", "datamodule", "trainer", "logger", "pruning", "recovery", "recipe", "hparams_search")
    for group in (*groups, "hydra/launcher"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        text = listed[f"+{group}" if group in ("pruning", "recovery", "recipe") else group]
        missing = [o for o in options if re.search(rf"\b{o}\b", text) is None]
        assert options and not missing, f"{group}: {missing} not in --help"
    assert set(listed) == {
        "model",
        "datamodule",
        "trainer",
        "logger",
        "+pruning",
        "+recovery",
        "+recipe",
        "hparams_search",
        "hydra/launcher",
    }


LAYER_SPARSITY = "pruning.layer_sparsity={net.layers.0.weight:0.5}"
DIGITS_MLP = ["datamodule=digits", "model=mlp", "model.net.in_features=64"]


def test_layer_sparsity_from_the_command_line(tmp_path):
    overrides = [*TINY, *DIGITS_MLP, "+pruning=cubic", "pruning.sparsity=0.8", "pruning.update_every=5"]
    cfg = _without_hydra_paths(_compose([*overrides, LAYER_SPARSITY]), tmp_path)
    assert dict(cfg.pruning.layer_sparsity) == {"net.layers.0.weight": 0.5}
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["layer_sparsity"]["net.layers.0.weight"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_layer_sparsity_from_yaml():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pat_callbacks.app.config import GradualPruningConf

    yaml = OmegaConf.create("sparsity: 0.8\nlayer_sparsity:\n  net.layers.0.weight: 0.5\n  'net.*.4.weight': 0.2\n")
    cfg = OmegaConf.merge(OmegaConf.structured(GradualPruningConf), yaml)
    pruning = instantiate(cfg)
    assert pruning.options.layer_sparsity == {"net.layers.0.weight": 0.5, "net.*.4.weight": 0.2}
    bad = OmegaConf.merge(cfg, OmegaConf.create("layer_sparsity:\n  fc: high\n"))
    with pytest.raises(Exception, match=r"`layer_sparsity\['fc'\]` to be a float in \[0, 1\), but got 'high'"):
        instantiate(bad)


def test_an_unknown_key_added_with_plus_is_refused_before_anything_is_built(tmp_path):
    cfg = _without_hydra_paths(_compose([*TINY, "+pruning=cubic", "+pruning.sparsty=0.5"]), tmp_path)
    with pytest.raises(ValueError, match=r"Unknown key `pruning.sparsty`.*did you mean `sparsity`"):
        run_training(cfg, output_dir=tmp_path)
    renamed = _without_hydra_paths(_compose([*TINY, "+pruning=cubic", "+pruning.final_sparsity=0.5"]), tmp_path)
    with pytest.raises(ValueError, match=r"Unknown key `pruning.final_sparsity`.*it is called `sparsity`"):
        run_training(renamed, output_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()
    run = _train_py([*TINY, "+pruning=rigl", "+pruning.sparsty=0.5", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0 and "Unknown key `pruning.sparsty`" in run.stderr
    assert "did you mean `sparsity`" in run.stderr


def test_console_shows_steps_of_max_steps_with_the_sparsity_and_no_startup_tips(tmp_path, capsys, caplog):
    overrides = [*TINY, "trainer.enable_progress_bar=true", "+pruning=cubic", "pruning.update_every=5"]
    run_training(_without_hydra_paths(_compose(overrides), tmp_path), output_dir=tmp_path)
    out = capsys.readouterr().out.replace("\r", "\n")
    assert re.search(r"Step: 100%\|.*\| 30/30 .*sparsity=0\.900", out), out[-2000:]
    assert "Epoch" not in out and "/-2" not in out
    assert not [r for r in caplog.records if r.getMessage().startswith(("💡 Tip", "GPU available", "Seed set"))]


def test_a_peer_callback_reports_under_its_own_method_name(tmp_path):
    peer = [
        "+callbacks.peer._target_=bench.peers.ModelPruningToSparsity",
        "+callbacks.peer.final_sparsity=0.5",
        "+callbacks.peer.start_epoch=0",
        "+callbacks.peer.end_epoch=1",
        "+callbacks.peer.use_global_unstructured=true",
    ]
    cfg = _without_hydra_paths(_compose([*TINY, "trainer.max_steps=80", *peer]), tmp_path)
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["method"] == "Lightning ModelPruning (global L1)" and metrics["target_sparsity"] == 0.5
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
