"""The Trainer-free core: a plain PyTorch loop drives Pruner with no Lightning anywhere."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from pat_callbacks import CubicSchedule, Pruner, PruningOptions


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 16, generator=generator)
    return x, (x[:, :4].argmax(1))


@pytest.mark.parametrize(
    ("criterion", "allocation"), [("magnitude", "uniform"), ("taylor", "global"), ("fisher", "erk")]
)
def test_a_plain_pytorch_loop_reaches_the_target_on_the_real_weights(criterion, allocation):
    model, (x, y) = _mlp(), _data()
    pruner = Pruner(model, criterion=criterion, allocation=allocation)
    schedule = CubicSchedule(final_sparsity=0.8, start_step=10, end_step=60, update_every=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(80):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.accumulate()
        if schedule.is_update_step(step):
            assert pruner.prune_to(schedule(step), optimizers=[optimizer], step=step)
        pruner.mask_grads()
        optimizer.step()
        for name, mask in pruner.masks.items():  # exact zeros after every step, with Adam and no re-masking
            assert (pruner.params[name].detach()[~mask] == 0).all(), (step, name)
    weights = [model[0].weight, model[2].weight, model[4].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.8 * sum(w.numel() for w in weights))  # counted on the model, exact to the weight
    assert model[0].bias.count_nonzero() == model[0].bias.numel()  # biases stay dense


def test_the_core_imports_no_lightning():
    core = "allocation criteria export masks patterns pruner regrowth schedules structured targets windows"
    code = (
        "import sys\n"
        + "".join(f"import pat_callbacks.{name}\n" for name in core.split())
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        + "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_state_dict_round_trips_masks_history_and_target():
    model, (x, y) = _mlp(), _data()
    pruner = Pruner(model, criterion="taylor", allocation="global")
    nn.functional.cross_entropy(model(x), y).backward()
    pruner.accumulate()
    assert pruner.prune_to(0.5)
    pruner.accumulate()
    state = pruner.state_dict()
    copy = _mlp()
    copy.load_state_dict(model.state_dict())
    restored = Pruner(copy, criterion="taylor", allocation="global")
    restored.load_state_dict(state)
    assert restored.target_sparsity == 0.5 and restored.sparsity() == pruner.sparsity()
    assert all(torch.equal(restored.masks[n], pruner.masks[n]) for n in pruner.masks)
    for name, values in pruner.criterion_state.items():
        assert all(torch.equal(values[k], restored.criterion_state[name][k]) for k in values)
    assert float(pruner.criterion_state["0.weight"]["count"]) == 2.0


def test_newly_pruned_entries_get_zeroed_optimizer_state():
    model, (x, y) = _mlp(), _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    pruner = Pruner(model)
    assert pruner.prune_to(0.6, optimizers=[optimizer])
    for name, mask in pruner.masks.items():
        state = optimizer.state[pruner.params[name]]
        assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] == 0).all()
        assert (state["exp_avg"][mask] != 0).any()  # kept entries keep their moments


def test_regrow_keeps_counts_and_measures_dropped_and_regrown_separately():
    model, (x, y) = _mlp(), _data()
    pruner = Pruner(model, allocation="erk")
    assert pruner.prune_to(0.7)
    before = {name: mask.clone() for name, mask in pruner.masks.items()}
    nn.functional.cross_entropy(model(x), y).backward()
    metrics = pruner.regrow(0.2, "rigl")
    assert metrics is not None
    changed_on = sum(int((pruner.masks[n] & ~before[n]).sum()) for n in before)
    changed_off = sum(int((before[n] & ~pruner.masks[n]).sum()) for n in before)
    assert metrics["pruning/regrown"] == changed_on and metrics["pruning/dropped"] == changed_off > 0
    assert all(int(pruner.masks[n].sum()) == int(before[n].sum()) for n in before)
    for name, mask in pruner.masks.items():  # regrown weights restart at exactly zero
        regrown = mask & ~before[name]
        assert (pruner.params[name].detach()[regrown] == 0).all()


def test_nan_scores_skip_the_update_with_a_warning():
    model = _mlp()
    pruner = Pruner(model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or Inf in the scores of \['2.weight'\] at step 7"):
        assert not pruner.prune_to(0.5, step=7)
    assert not pruner.masks


def test_options_are_validated_before_any_model_is_seen():
    with pytest.raises(ValueError, match="Unknown `allocation` 'lamp'"):
        PruningOptions(allocation="lamp")
    with pytest.raises(ValueError, match=r"Unknown `pattern` 'Unstructured'; expected one of: unstructured, N:M"):
        PruningOptions(pattern="Unstructured")
    with pytest.raises(TypeError, match="either `options` or keyword options"):
        Pruner(_mlp(), PruningOptions(), criterion="taylor")
    with pytest.raises(ValueError, match="regrowth would break the 'block:2x2' pattern"):
        pruner = Pruner(_mlp(), pattern="block:2x2")
        pruner.prune_to(0.5)
        pruner.regrow(0.1, "set")


def test_sensitivity_needs_a_measurement_first():
    model, batch = _mlp(), _data()
    pruner = Pruner(model, allocation="sensitivity")
    with pytest.raises(RuntimeError, match="measure_sensitivity"):
        pruner.prune_to(0.5)
    sensitivities = pruner.measure_sensitivity([batch], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert set(sensitivities) == set(pruner.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pruner.prune_to(0.5)
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
