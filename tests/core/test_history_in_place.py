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
