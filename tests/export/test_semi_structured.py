"""2:4 export decisions on a CPU, with a stand-in kernel and timer: which layers convert, Conv1D handling, undoing a
slower model, and the refusals (no GPU in the tests; the real kernels are timed by bench/gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.export.semi_structured import to_semi_structured


def _two_four_(weight: torch.Tensor, along: int) -> None:
    """Zero 2 of every 4 consecutive entries along dimension ``along`` (the inputs)."""
    keep = (torch.arange(weight.shape[along]) % 4) < 2
    with torch.no_grad():
        weight.mul_(keep.view(-1, 1) if along == 0 else keep.view(1, -1))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    model = GPT2LMHeadModel(config).eval()
    for block in model.transformer.h:
        for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            _two_four_(conv.weight, along=0)  # Conv1D stores in x out: its inputs run down the rows
    return model


def _stand_in_kernel(weight: torch.Tensor) -> torch.Tensor:
    assert (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max() <= 2  # only 2:4 rows (out x in) come here
    return weight.clone()


def _timer(fast: set[str], model_ms: tuple[float, float] = (10.0, 8.0)):
    """Layers in ``fast`` run their 2:4 kernel in half the dense time, the others in twice; the model as given."""
    calls = []

    def timer(fn, key):
        fn()
        calls.append(key)
        if key.startswith("model:"):
            return (model_ms[0] if key == "model:dense" else model_ms[1]) / 1e3
        name, variant = key.split(":", 1)
        return 1e-3 if variant == "dense" else (0.5e-3 if name in fast else 2e-3)

    timer.calls = calls
    return timer


def test_timed_mode_converts_only_faster_layers_and_conv1d_as_transposed_linear():
    model = _gpt2()
    tokens = torch.randint(0, 50, (3, 16))
    expected = model(tokens).logits
    fast = {"transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"}
    timer = _timer(fast)
    report = to_semi_structured(model, tokens, kernel=_stand_in_kernel, timer=timer)
    chosen = {layer.name: layer for layer in report.layers}
    assert {name for name, layer in chosen.items() if layer.choice == "2:4"} == fast
    assert chosen["lm_head"].choice == "dense" and "not 2:4" in chosen["lm_head"].reason
    assert chosen["transformer.h.0.attn.c_attn"].tokens == 48 and chosen["transformer.h.0.attn.c_attn"].shape == (
        96,
        32,
    )
    assert "0.50x of dense at 48 tokens" in chosen["transformer.h.0.attn.c_attn"].reason
    assert isinstance(model.transformer.h[0].mlp.c_fc, nn.Linear)  # replaced: its transposed weight
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # slower: left as it was
    assert report.speedup == pytest.approx(1.25) and not report.reverted
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert "2 of 9 layers on the 2:4 kernel" in str(report) and "(1.250x)" in str(report)


def test_a_converted_model_that_is_slower_end_to_end_is_put_back():
    model = _gpt2()
    tokens = torch.randint(0, 50, (2, 16))
    before = {name: type(module) for name, module in model.named_modules()}
    fast = {"transformer.h.0.mlp.c_fc"}
    linear = nn.Linear(8, 8)
    _two_four_(linear.weight, along=1)
    model.transformer.h[0].extra = linear  # an nn.Linear the forward never calls: not seen, left dense
    report = to_semi_structured(model, tokens, kernel=_stand_in_kernel, timer=_timer(fast, model_ms=(8.0, 9.0)))
    assert report.reverted and report.converted == 0 and report.speedup == 1.0
    assert {name: type(module) for name, module in model.named_modules() if name in before} == before
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["transformer.h.0.mlp.c_fc"] == "end to end the converted model was slower"
    assert reasons["transformer.h.0.extra"] == "not run by the example input"


def test_mode_all_converts_every_two_four_linear_and_keeps_other_weights():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    _two_four_(model[0].weight, along=1)
    dense_before = model[2].weight
    report = to_semi_structured(model, mode="all", kernel=_stand_in_kernel)
    assert [layer.choice for layer in report.layers] == ["2:4", "dense"]
    assert model[2].weight is dense_before and report.speedup is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal path of a machine without CUDA")
def test_without_a_kernel_the_refusal_names_what_is_missing():
    with pytest.raises(RuntimeError, match=r"compute capability >= 8\.0; found no CUDA device\. On a CPU use"):
        to_semi_structured(nn.Linear(8, 8), torch.zeros(1, 8))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="pass example_inputs"):
        to_semi_structured(nn.Linear(8, 8), kernel=_stand_in_kernel)
    with pytest.raises(ValueError, match="mode"):
        to_semi_structured(nn.Linear(8, 8), torch.zeros(1, 8), mode="fast", kernel=_stand_in_kernel)
    with pytest.raises(ValueError, match="min_speedup"):
        to_semi_structured(nn.Linear(8, 8), torch.zeros(1, 8), min_speedup=0, kernel=_stand_in_kernel)


def test_a_layer_the_kernel_refuses_stays_dense_with_the_kernels_words():
    model = nn.Sequential(nn.Linear(16, 8))
    _two_four_(model[0].weight, along=1)

    def refusing(weight):
        raise RuntimeError("cuSPARSELt: rows must be a multiple of 32\nmore detail")

    report = to_semi_structured(model, torch.zeros(2, 16), kernel=refusing, timer=_timer(set()))
    (layer,) = report.layers
    assert (
        layer.choice == "dense"
        and layer.reason == "the 2:4 kernel refused it: cuSPARSELt: rows must be a multiple of 32"
    )
    assert isinstance(model[0].weight, nn.Parameter) and report.converted == 0
