"""The Trainer-free core: a plain PyTorch loop drives Pruner with no Lightning anywhere."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    ("criterion", "options"),
    [
        ("magnitude", {"allocation": "uniform"}),
        ("magnitude", {"allocation": "global"}),
        ("taylor", {"allocation": "global"}),
        ("movement", {"allocation": "global_raw"}),
        ("fisher", {"allocation": "erk"}),
        ("magnitude", {"allocation": "global", "layer_sparsity": {"4.weight": 0.5}}),
    ],
)
def test_streamed_updates_choose_the_same_masks_as_exact_selection(monkeypatch, criterion, options):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "SAMPLE_SIZE", 300)  # every layer sampled, scored in several chunks
    monkeypatch.setattr(selection, "CHUNK_SIZE", 200)
    streamed, exact = _mlp(), _mlp()
    generator = torch.Generator().manual_seed(1)
    for a, b in zip(streamed.parameters(), exact.parameters(), strict=True):
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    fast, slow = Pruner(streamed, criterion=criterion, **options), Pruner(exact, criterion=criterion, **options)
    slow._streamable = lambda sparsity: False  # the whole-tensor path the streamed one replaces
    for pruner in (fast, slow):
        pruner.accumulate()
    for sparsity in (0.3, 0.6, 0.85):
        assert fast.prune_to(sparsity, final_target=0.85) and slow.prune_to(sparsity, final_target=0.85)
        assert fast.masks.keys() == slow.masks.keys()
        for name in slow.masks:
            assert torch.equal(fast.masks[name], slow.masks[name]), (sparsity, name)
            assert torch.equal(fast.last_changed[name], slow.last_changed[name]), (sparsity, name)
            assert torch.equal(streamed.get_parameter(name), exact.get_parameter(name))


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_streamed_two_four_updates_choose_the_same_masks_as_whole_layers(monkeypatch, criterion):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "CHUNK_SIZE", 100)  # a few rows at a time
    streamed, exact = _mlp(), _mlp()
    for a, b in zip(streamed.parameters(), exact.parameters(), strict=True):
        a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel()))
        b.grad = a.grad.clone()
    fast, slow = Pruner(streamed, criterion=criterion, pattern="2:4"), Pruner(exact, criterion=criterion, pattern="2:4")
    slow._streamable = lambda sparsity: False
    for pruner in (fast, slow):
        pruner.accumulate()
    for sparsity in (0.25, 0.5):
        assert fast.prune_to(sparsity) and slow.prune_to(sparsity)
        for name in slow.masks:
            assert torch.equal(fast.masks[name], slow.masks[name]), (sparsity, name)
            assert torch.equal(streamed.get_parameter(name), exact.get_parameter(name))
    assert all(((m.reshape(-1, 4)).sum(1) == 2).all() for m in fast.masks.values())


def test_streamed_updates_shrink_the_masks_in_place(monkeypatch):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "SAMPLE_SIZE", 300)
    model = _mlp()
    pruner = Pruner(model, allocation="global")
    pruner.prune_to(0.5)
    masks = dict(pruner.masks)
    before = {name: mask.clone() for name, mask in masks.items()}
    pruner.prune_to(0.8)
    assert all(pruner.masks[name] is masks[name] for name in masks)  # no new full-size masks
    assert all(not (pruner.masks[n] & ~before[n]).any() for n in before)  # pruned entries stay pruned
    assert all(torch.equal(pruner.last_changed[n], before[n] & ~pruner.masks[n]) for n in before)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in masks)
    assert zeros == round(0.8 * sum(m.numel() for m in masks.values()))


def test_a_missed_bracket_is_settled_by_the_radix_select_within_the_streamed_update(monkeypatch):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "_Z", -50.0)  # every sampled bracket misses the k-th value
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 300)
    calls = []
    bracketed = selection._bracketed
    monkeypatch.setattr(selection, "_bracketed", lambda *a: calls.append(bracketed(*a)) or calls[-1])
    model = _mlp()
    pruner = Pruner(model, allocation="global")
    assert pruner.prune_to(0.5)
    masks = dict(pruner.masks)
    assert pruner.prune_to(0.7)
    assert calls and all(c is None for c in calls)  # missed, and still streamed: the masks shrank in place
    assert all(pruner.masks[n] is masks[n] for n in masks)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in pruner.params)
    assert zeros == round(0.7 * sum(p.numel() for p in pruner.params.values()))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_nan_in_a_chunk_the_sample_missed_skips_a_streamed_update(monkeypatch, allocation):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "SAMPLE_SIZE", 16)
    model = _mlp()
    pruner = Pruner(model, allocation=allocation, criterion="taylor")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pruner.accumulate()
    pruner.criterion_state["2.weight"]["sum"][31, 31] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or Inf in the scores of \['2.weight'\]"):
        assert not pruner.prune_to(0.5)
    assert not pruner.masks


def test_global_means_of_large_layers_are_summed_accurately():
    # a float32 L1 norm of a whole 3M-entry layer drifts by ~1e-3 on CPU, which moves entries between layers
    torch.manual_seed(0)
    streamed = nn.Sequential(nn.Linear(1500, 2000, bias=False), nn.Linear(300, 300, bias=False))
    exact = nn.Sequential(nn.Linear(1500, 2000, bias=False), nn.Linear(300, 300, bias=False))
    exact.load_state_dict(streamed.state_dict())
    fast, slow = Pruner(streamed, allocation="global"), Pruner(exact, allocation="global")
    slow._streamable = lambda sparsity: False
    assert fast.prune_to(0.5) and slow.prune_to(0.5)
    assert all(torch.equal(fast.masks[n], slow.masks[n]) for n in slow.masks)


def test_masks_given_by_the_caller_are_copied_before_they_shrink_in_place():
    model = _mlp()
    pruner = Pruner(model)
    mine = {
        name: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.3 for name, p in pruner.params.items()
    }
    before = {name: mask.clone() for name, mask in mine.items()}
    pruner.set_masks(mine)
    pruner.prune_to(0.9)
    assert all(torch.equal(mine[n], before[n]) for n in mine)


def test_nan_is_found_when_an_update_prunes_nothing_new(monkeypatch):
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "SAMPLE_SIZE", 16)  # the NaN lies outside the sample: only the scan sees it
    model = _mlp()
    pruner = Pruner(model)
    assert pruner.prune_to(0.5)
    with torch.no_grad():
        model[2].weight.view(-1)[int(pruner.masks["2.weight"].view(-1).nonzero()[0])] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or Inf in the scores of \['2.weight'\]"):
        assert not pruner.prune_to(0.5)


def test_prune_to_final_sparsity_is_the_former_name_of_final_target():

    def pruned(**kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        pruner = Pruner(model, layer_sparsity={"0.*": 0.8})
        pruner.prune_to(0.25, **kwargs)
        return pruner.layer_sparsity()

    with pytest.warns(DeprecationWarning, match="`final_sparsity` is now called `final_target`"):
        old = pruned(final_sparsity=0.5)
    assert old == pruned(final_target=0.5) and old["0.weight"] == 0.40625  # pinned 0.8, followed halfway
    with pytest.raises(ValueError, match="Give `final_target` \\(the new name of `final_sparsity`\\), not both"):
        pruned(final_target=0.5, final_sparsity=0.5)
