"""Block-by-block calibration gives the masks (bitwise) and weights (1e-6 relative) of whole-model passes, on
CharGPT and Hugging Face Llama / GPT-2 / BERT from small random configs; it falls back, saying why, where a model
has no blocks; offloading moves one block at a time (cpu -> cpu here) to the same results."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from pat_callbacks.app.models import CharGPT
from pat_callbacks.oneshot import one_shot_prune
from pat_callbacks.oneshot.blocks import BlockInputs, find_blocks

torch.set_num_threads(1)
VOCAB = 32


def _chargpt() -> nn.Module:
    return CharGPT(vocab_size=VOCAB, context=8, dim=16, layers=3, heads=2)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=16))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    return BertModel(config, add_pooling_layer=False)


MODELS = {"chargpt": _chargpt, "llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _batches(kind: str) -> list:
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (2, 8), generator=generator) for _ in range(3)]
    if kind == "chargpt":
        return tokens
    masks = [torch.ones(2, 8, dtype=torch.long) for _ in tokens]
    masks[1][1, 6:] = 0  # padding in one row: the mask travels with the cached block inputs
    return [{"input_ids": t, "attention_mask": m} for t, m in zip(tokens, masks, strict=True)]


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    return model, copy.deepcopy(model)


def _assert_same(a: nn.Module, b: nn.Module, result_a, result_b) -> None:
    assert sorted(result_a.masks) == sorted(result_b.masks)
    for name, mask in result_a.masks.items():
        assert torch.equal(mask, result_b.masks[name]), name
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(("method", "kwargs"), [("wanda", {}), ("sparsegpt", {}), ("wanda", {"allocation": "owl"})])
def test_blocks_give_the_masks_and_weights_of_whole_model_passes(kind, method, kwargs):
    a, b = _pair(kind)
    batches = _batches(kind)
    whole = one_shot_prune(a, method, 0.6, calibration=batches, pipeline="whole", **kwargs)
    blocks = one_shot_prune(b, method, 0.6, calibration=batches, pipeline="blocks", **kwargs)
    assert (whole.pipeline, blocks.pipeline) == ("whole", "blocks")
    assert whole.passes == blocks.passes
    _assert_same(a, b, whole, blocks)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloading_one_block_at_a_time_gives_the_same_results(method):
    a, b = _pair("llama")
    batches = _batches("llama")
    plain = one_shot_prune(a, method, 0.5, calibration=batches)
    moved = one_shot_prune(b, method, 0.5, calibration=batches, offload=True, device="cpu")
    assert moved.pipeline == "blocks"
    _assert_same(a, b, plain, moved)


def test_the_first_block_inputs_are_those_of_the_whole_forward():
    torch.manual_seed(0)
    model = _llama().eval()
    batches = _batches("llama")
    blocks, _ = find_blocks(model, [n for n, _ in model.named_parameters() if ".layers." in n])
    assert blocks is not None and blocks.prefix == "model.layers"
    inputs = BlockInputs.capture(model, blocks, batches)
    for block in blocks.modules:
        inputs.advance(block)
    with torch.no_grad():
        final = model.model.norm(inputs.hidden[1])
        expected = model.model(**batches[1]).last_hidden_state
    torch.testing.assert_close(final, expected, rtol=0, atol=0)


def test_a_model_without_blocks_falls_back_saying_why(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(8, 8)]
    with caplog.at_level(logging.INFO, logger="pat_callbacks.oneshot.sequential"):
        result = one_shot_prune(model, "sparsegpt", 0.5, calibration=batches)
    assert result.pipeline == "whole"
    assert "Sequential has no nn.ModuleList of same-class blocks" in caplog.text
    with pytest.raises(ValueError, match="pipeline='blocks' needs the model's blocks, but Sequential has no"):
        one_shot_prune(model, "sparsegpt", 0.5, calibration=batches, pipeline="blocks")


def test_the_block_forward_takes_no_labels_and_computes_no_loss():
    _, b = _pair("llama")
    calls = []
    head = b.lm_head
    head.register_forward_hook(lambda *_: calls.append(1))
    batches = [dict(batch, labels=batch["input_ids"]) for batch in _batches("llama")]
    result = one_shot_prune(b, "wanda", 0.5, calibration=batches, exclude=["lm_head.weight"])
    assert result.pipeline == "blocks"
    assert len(calls) == 1  # the one dense check of the first batch; calibration stops at the first block


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pipeline": "fast"}, "Expected `pipeline` in"),
        ({"offload": "yes"}, "Expected `offload` to be True, False or 'auto', but got 'yes'"),
        ({"device": "gpu7"}, "Expected `device` to name a torch device, but got 'gpu7'"),
        ({"offload": True, "pipeline": "whole"}, "offload=True moves one block at a time"),
    ],
)
def test_bad_pipeline_options_are_refused_naming_the_value(kwargs, match):
    from pat_callbacks.oneshot import OneShotOptions

    with pytest.raises(ValueError, match=match):
        OneShotOptions("wanda", 0.5, **kwargs)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.relu(self.fc(x)) * scale


class _PerBlockArguments(nn.Module):
    """Each block takes its own extra argument (as models with per-layer attention masks do)."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Scaled() for _ in range(3))
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:  # every block reads the model input: block k's input is not block k-1's output
            return sum(block(x) for block in self.blocks)
        for index, block in enumerate(self.blocks):
            x = block(x, scale=1.0 + index)
        return x


@pytest.mark.parametrize(
    ("parallel", "why"),
    [(False, "block 1 takes other arguments than block 0"), (True, "block 1 does not take block 0's output")],
)
def test_blocks_that_cannot_run_one_by_one_fall_back_to_whole_passes_saying_why(caplog, parallel, why):
    torch.manual_seed(0)
    model = _PerBlockArguments(parallel)
    reference = copy.deepcopy(model)
    batches = [torch.randn(4, 8), torch.randn(4, 8)]
    with caplog.at_level(logging.INFO, logger="pat_callbacks.oneshot.sequential"):
        result = one_shot_prune(model, "sparsegpt", 0.5, calibration=batches)
    assert result.pipeline == "whole" and why in caplog.text
    expected = one_shot_prune(reference, "sparsegpt", 0.5, calibration=batches, pipeline="whole")
    _assert_same(model, reference, result, expected)


def test_auto_offload_picks_cuda_for_a_model_in_cpu_memory_only_where_it_can_run(monkeypatch):
    """``offload="auto"`` with no device: a CPU-resident model goes to CUDA one block at a time when CUDA is there;
    never without CUDA, with ``offload=False``, with optimizers (the Lightning callback) or without blocks."""
    from pat_callbacks.oneshot import OneShotOptions
    from pat_callbacks.oneshot.sequential import _offload_device

    model = _llama()
    assert _offload_device(model, OneShotOptions("wanda", 0.5)) == (None, False)  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _offload_device(model, OneShotOptions("wanda", 0.5)) == (torch.device("cuda"), True)
    assert _offload_device(model, OneShotOptions("wanda", 0.5, offload=False)) == (None, False)
    assert _offload_device(model, OneShotOptions("wanda", 0.5, device="cpu")) == (None, False)
    assert _offload_device(model, OneShotOptions("wanda", 0.5, offload=True, device="cpu")) == (
        torch.device("cpu"),
        False,
    )
    # where the automatic choice cannot apply, the model is calibrated where it is (no CUDA call is made)
    a, b = _pair("llama")
    batches = _batches("llama")
    optimizer = torch.optim.SGD(b.parameters(), lr=0.1)
    plain = one_shot_prune(a, "wanda", 0.5, calibration=batches, offload=False)
    kept = one_shot_prune(b, "wanda", 0.5, calibration=batches, optimizers=[optimizer])
    _assert_same(a, b, plain, kept)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert one_shot_prune(mlp, "sparsegpt", 0.5, calibration=[torch.randn(8, 8)]).pipeline == "whole"
