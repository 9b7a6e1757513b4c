"""One-shot pruning is all-or-nothing: everything is validated before any weight changes (a target the forward
never reaches, NaN calibration inputs, a target whose input cannot be read), with messages naming the layer; and
mapping batches (Hugging Face ``BatchEncoding``) run under the default forward, their padding left out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pat_callbacks.app.models import CharGPT
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.oneshot import one_shot_prune

torch.set_num_threads(1)


class _Unreached(nn.Module):
    """Two blocks and a Linear the forward never calls, registered after them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.spare = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for name, value in before.items():  # bitwise, NaN equal to NaN
        assert torch.equal(after[name].isnan(), value.isnan()), name
        assert torch.equal(after[name].nan_to_num(), value.nan_to_num()), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pipeline", ["auto", "whole"])
def test_a_layer_the_forward_never_reaches_is_refused_before_anything_is_pruned(method, pipeline):
    torch.manual_seed(0)
    model = _Unreached()
    before = _state(model)
    with pytest.raises(ValueError, match=r"never runs the module of \['spare.weight'\]"):
        one_shot_prune(model, method, 0.5, calibration=[torch.randn(4, 8)], pipeline=pipeline)
    _unchanged(model, before)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("where", [0, 1])  # NaN in the first batch (the dense check) or a later one
def test_nan_calibration_inputs_are_named_and_nothing_changes(method, sequential, where):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(4, 8), torch.randn(4, 8)]
    batches[where][1, 2] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"calibration inputs of \['0.weight'.*hold NaN or Inf"):
        one_shot_prune(model, method, 0.5, calibration=batches, sequential=sequential)
    _unchanged(model, before)


def test_nan_in_a_later_batch_is_caught_at_the_first_block_of_a_transformer():
    torch.manual_seed(0)
    model = CharGPT(vocab_size=12, context=8, dim=16, layers=2, heads=2)
    model.embed.weight.data[5] = float("nan")  # only batch 1 holds token 5
    batches = [torch.randint(0, 5, (2, 8)), torch.full((2, 8), 5)]
    before = _state(model)
    with pytest.raises(ValueError, match=r"inputs of block 'blocks.0' hold NaN or Inf on calibration batch 1"):
        one_shot_prune(model, "sparsegpt", 0.5, calibration=batches)
    _unchanged(model, before)


def test_a_target_whose_input_cannot_be_read_is_refused_before_anything_is_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))
    pruner = Pruner(model, include=["0.weight", "1.weight_ih_l0"])
    before = _state(model)
    with pytest.raises(ValueError, match=r"cannot read the input of '1.weight_ih_l0'"):
        one_shot_prune(
            model, "sparsegpt", 0.5, calibration=[torch.randn(3, 4)], pruner=pruner, forward=lambda m, b: m(b)
        )
    _unchanged(model, before)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).eval()


def test_batch_encodings_run_under_the_default_forward():
    from transformers import BatchEncoding

    model = _llama()
    tokens = torch.randint(0, 32, (2, 8))
    batch = BatchEncoding({"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens})
    result = one_shot_prune(model, "wanda", 0.5, calibration=[batch])
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padded_positions_enter_no_statistics(method):
    """Right padding (mask 0) under a causal model: what the padded positions hold changes no mask or weight."""
    a = _llama()
    b = copy.deepcopy(a)
    tokens = torch.randint(0, 32, (2, 8))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    other = tokens.clone()
    other[1, 5:] = (tokens[1, 5:] + 7) % 32
    exclude = ["lm_head.weight"]  # the head sees padded positions too, but only after the blocks: same either way
    ra = one_shot_prune(a, method, 0.5, calibration=[{"input_ids": tokens, "attention_mask": mask}], exclude=exclude)
    rb = one_shot_prune(b, method, 0.5, calibration=[{"input_ids": other, "attention_mask": mask}], exclude=exclude)
    for name, keep in ra.masks.items():
        assert torch.equal(keep, rb.masks[name]), name
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if name != "model.embed_tokens.weight" and name != "lm_head.weight":
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
