"""The gradient criteria's histories, accumulated in place, hold exactly what the plain formulas give."""

from __future__ import annotations

import pytest
import torch

from pat_callbacks.core.criteria import get_criterion
from pat_callbacks.core.options import ACCUMULATE_WINDOW, PruningOptions
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.scoring import Scorer

FORMULAS = {  # the history's key and one step's term (w * g in float32: half-precision products underflow)
    "taylor": ("sum", lambda w, g: (w.float() * g.float()).abs()),
    "movement": ("sum", lambda w, g: -(w.float() * g.float())),
    "fisher": ("sum_sq_grad", lambda w, g: g.float().square()),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_history_equals_the_sum_of_the_formula_and_owns_its_memory(name, dtype):
    criterion, state = get_criterion(name), {}
    key, term = FORMULAS[name]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(33, 17, generator=generator).to(dtype)
    expected = None
    for _ in range(4):
        grad = torch.randn(33, 17, generator=generator).to(dtype)
        before = grad.clone()
        criterion.accumulate(weight, grad, state)
        assert torch.equal(grad, before)  # the gradient is never written to
        expected = term(weight, grad) if expected is None else expected.add_(term(weight, grad))
        assert state[key].dtype == torch.float32 and torch.equal(state[key], expected)
        assert state[key].untyped_storage().data_ptr() not in (
            grad.untyped_storage().data_ptr(),
            weight.untyped_storage().data_ptr(),
        )
    if "count" in state:
        assert float(state["count"]) == 4.0 and state["count"].dim() == 0


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_accumulate_many_holds_what_one_accumulate_per_parameter_holds(name):
    criterion = get_criterion(name)
    generator = torch.Generator().manual_seed(1)
    shapes, dtypes = [(8, 5), (13,), (4, 4, 3)], [torch.float32, torch.bfloat16, torch.float32]
    params = [torch.randn(s, generator=generator).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    one_by_one, together = [{} for _ in params], [{} for _ in params]
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
        present = range(len(params)) if step else range(2)  # the last parameter gets its first gradient later
        for i in present:
            criterion.accumulate(params[i], grads[i], one_by_one[i])
        before = [g.clone() for g in grads]
        criterion.accumulate_many(
            [params[i] for i in present], [grads[i] for i in present], [together[i] for i in present]
        )
        assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))
    for a, b in zip(one_by_one, together, strict=True):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ window and dtype of the history (Scorer)
def _layer_with_grads(seed: int = 0, steps: int = 12) -> tuple[torch.nn.Parameter, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(16, 9, generator=generator))
    return weight, [torch.randn(16, 9, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("name", ["taylor", "fisher"])
def test_history_accumulates_only_inside_the_window_before_the_update(name):
    weight, grads = _layer_with_grads()
    scorer = Scorer(get_criterion(name), {"w": weight}, window=4)
    taken = []
    for step, grad in enumerate(grads):  # the next update at step 10
        weight.grad = grad
        before = float(scorer.state["w"]["count"]) if scorer.state.get("w") else 0.0
        scorer.accumulate(step, next_update=10)
        after = float(scorer.state["w"]["count"]) if scorer.state.get("w") else 0.0
        if after > before:
            taken.append(step)
        assert scorer.accumulates_at(step, 10) == (step in (7, 8, 9, 10))
    assert taken == [7, 8, 9, 10]


@pytest.mark.parametrize("name", ["taylor", "fisher"])
def test_scores_at_the_update_equal_a_naive_mean_over_the_window(name):
    weight, grads = _layer_with_grads(seed=3)
    scorer = Scorer(get_criterion(name), {"w": weight}, window=5, history_dtype="float32")
    for step, grad in enumerate(grads[:11]):
        weight.grad = grad
        scorer.accumulate(step, next_update=10)
    window = grads[6:11]  # steps 6..10
    w = weight.detach()
    if name == "taylor":
        naive = sum((w * g).abs() for g in window) / len(window)
    else:
        naive = 0.5 * w.square() * (sum(g.square() for g in window) / len(window))
    torch.testing.assert_close(scorer.score("w"), naive, rtol=1e-6, atol=0)


def test_without_steps_every_call_accumulates_as_before():
    weight, grads = _layer_with_grads()
    windowed, plain = (Scorer(get_criterion("taylor"), {"w": weight}, window=2) for _ in range(2))
    for grad in grads:
        weight.grad = grad
        windowed.accumulate()  # a plain loop: no step, no next update
        plain.accumulate(7, next_update=None)  # no update known: every step as well
    assert float(windowed.state["w"]["count"]) == float(plain.state["w"]["count"]) == len(grads)


def test_movement_sums_every_step_in_float32_whatever_the_window():
    weight, grads = _layer_with_grads()
    scorer = Scorer(get_criterion("movement"), {"w": weight}, window=2, history_dtype="bfloat16")
    for step, grad in enumerate(grads):
        weight.grad = grad
        scorer.accumulate(step, next_update=100)
    assert scorer.state["w"]["sum"].dtype == torch.float32
    torch.testing.assert_close(scorer.state["w"]["sum"], sum(-(weight.detach() * g) for g in grads))


@pytest.mark.parametrize("name", ["taylor", "fisher"])
def test_bfloat16_history_is_the_float32_sum_rounded_step_by_step_and_scores_in_float32(name):
    weight, grads = _layer_with_grads(seed=5)
    window = len(grads)  # bfloat16 is kept for a history a window bounds: every step in one window here
    cheap = Scorer(get_criterion(name), {"w": weight}, window=window, history_dtype="bfloat16")
    exact = Scorer(get_criterion(name), {"w": weight}, window=window, history_dtype="float32")
    key = "sum" if name == "taylor" else "sum_sq_grad"
    naive = None  # the float32 step terms added into a bfloat16 sum, one rounding per step
    for step, grad in enumerate(grads):
        weight.grad = grad
        cheap.accumulate(step, next_update=window - 1)
        exact.accumulate(step, next_update=window - 1)
        term = FORMULAS[name][1](weight.detach(), grad)
        naive = term.to(torch.bfloat16) if naive is None else naive.add_(term)
    assert torch.equal(cheap.state["w"][key], naive)
    assert cheap.state["w"][key].dtype == torch.bfloat16 and cheap.state["w"]["count"].dtype == torch.float32
    assert cheap.score("w").dtype == torch.float32
    torch.testing.assert_close(cheap.score("w"), exact.score("w"), rtol=2e-2, atol=0)


def test_bfloat16_history_keeps_the_masks_of_a_trained_model():
    """Ranking check on a model trained for real: >= 99.5% of the mask entries equal those a float32 history gives
    (bench/history_precision.py measures it on MNIST-1D's ConvBase: see bench/results/history_precision.md)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    )
    x = torch.randn(512, 20)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruners = {
        dtype: Pruner(model, criterion="taylor", allocation="global", history_dtype=dtype, accumulate_window=None)
        for dtype in ("float32", "bfloat16")
    }
    for step in range(60):
        optimizer.zero_grad()
        batch = torch.randint(0, 512, (64,))
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        if step >= 20:
            for pruner in pruners.values():
                pruner.accumulate()
        optimizer.step()
    masks = {}
    for dtype, pruner in pruners.items():
        copies = {name: torch.nn.Parameter(p.detach().clone()) for name, p in pruner.params.items()}
        chooser = Pruner(copies, allocation="global")
        chooser.prune_to(0.9, scores=pruner.scores())
        masks[dtype] = chooser.masks
    same = sum(int((masks["float32"][n] == masks["bfloat16"][n]).sum()) for n in masks["float32"])
    assert same / sum(m.numel() for m in masks["float32"].values()) >= 0.995


def test_a_bfloat16_history_round_trips_a_checkpoint_bit_for_bit_and_old_float32_ones_still_load():
    weight, grads = _layer_with_grads()
    first = Pruner({"w": weight}, criterion="taylor", history_dtype="bfloat16")
    next_update = len(grads) - 1  # inside the default window before this update: a bfloat16 history
    for step, grad in enumerate(grads[:5]):
        weight.grad = grad
        first.accumulate(step, next_update)
    state = first.state_dict()
    second = Pruner({"w": weight}, criterion="taylor", history_dtype="bfloat16")
    second.load_state_dict(state)
    for step, grad in enumerate(grads[5:], start=5):
        weight.grad = grad
        first.accumulate(step, next_update)
        second.accumulate(step, next_update)
    assert torch.equal(first.criterion_state["w"]["sum"], second.criterion_state["w"]["sum"])
    assert second.criterion_state["w"]["sum"].dtype == torch.bfloat16

    old = {"masks": {}, "criterion_state": {"w": {"sum": torch.ones(16, 9), "count": torch.tensor(2.0)}}}
    resumed = Pruner({"w": weight}, criterion="taylor")
    resumed.load_state_dict({**state, **old})
    weight.grad = grads[0]
    resumed.accumulate()  # an old float32 history goes on in float32 until the next update restarts it
    assert resumed.criterion_state["w"]["sum"].dtype == torch.float32
    assert float(resumed.criterion_state["w"]["count"]) == 3.0


def test_window_and_dtype_are_validated_with_the_bad_value():
    with pytest.raises(ValueError, match="`accumulate_window` to be an integer >= 1, but got 0"):
        PruningOptions(accumulate_window=0)
    with pytest.raises(ValueError, match="Unknown `history_dtype` 'float16'"):
        PruningOptions(history_dtype="float16")
    assert PruningOptions().accumulate_window == ACCUMULATE_WINDOW == 40  # measured: the default
    assert PruningOptions().history_dtype == "bfloat16"
    former = PruningOptions(accumulate_window=None, history_dtype="float32")  # the former history, still given so
    assert (former.accumulate_window, former.history_dtype) == (None, "float32")
