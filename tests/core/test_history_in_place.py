"""The gradient criteria's histories, accumulated in place, hold exactly what the plain formulas give."""

from __future__ import annotations

import pytest
import torch

from pat_callbacks.core.criteria import get_criterion

FORMULAS = {  # the history's key and one step's term, as written before the in-place accumulation
    "taylor": ("sum", lambda w, g: (w * g).abs().float()),
    "movement": ("sum", lambda w, g: (-(w * g)).float()),
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
