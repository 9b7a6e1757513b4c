"""Mask-safe LoRA merge on a tiny Hugging Face GPT-2 (Conv1D) and on nn.Linear: exact zeros, 2:4 kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from pat_callbacks.core.pruner import Pruner  # noqa: E402
from pat_callbacks.recovery.lora import add_lora, lora_modules, merge_lora  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _pruned_gpt2() -> tuple[nn.Module, Pruner]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    pruner = Pruner(model, criterion="magnitude", allocation="uniform", pattern="2:4")
    pruner.prune_to(0.5)
    pruner.apply()
    return model, pruner


def _train_adapters(model: nn.Module, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 16))
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _conv1d_rows_2_4(weight: torch.Tensor) -> bool:
    """2:4 along each output's inputs: Conv1D stores (in, out), so groups run down the columns."""
    return int((weight.t().reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_merge_keeps_every_pruned_weight_zero_and_2_4_on_gpt2() -> None:
    model, pruner = _pruned_gpt2()
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    before = {name: p.detach().clone() for name, p in pruner.params.items()}
    peft_model = add_lora(model, target_modules=TARGETS, r=4)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)  # base frozen
    _train_adapters(peft_model)
    merged = merge_lora(peft_model, masks=pruner)
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        weight = params[name]
        assert torch.equal(weight != 0, mask), name  # counted on the merged weights
        assert _conv1d_rows_2_4(weight), name
    changed = [name for name in masks if not torch.equal(params[name], before[name])]
    assert changed == list(masks)  # the adapters' update reached every kept weight matrix
    assert not lora_modules(merged) and not any("lora_" in n for n in params)


def test_a_plain_peft_merge_would_fill_the_zeros() -> None:
    model, pruner = _pruned_gpt2()
    name = next(iter(pruner.masks))
    peft_model = add_lora(model, target_modules=TARGETS, r=4)
    _train_adapters(peft_model)
    dense = dict(peft_model.merge_and_unload().named_parameters())[name]
    assert float((dense == 0).float().mean()) < 0.01  # why merge_lora masks the delta


def test_merge_takes_the_mask_from_the_weights_zeros_on_linear() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(16, 16) > 0.7)
    zeros = net[0].weight == 0
    model = add_lora(net, target_modules=["0", "2"], r=2)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B["default"].weight.normal_()
    merged = merge_lora(model)
    assert torch.equal(merged[0].weight == 0, zeros)
    assert int((merged[2].weight == 0).sum()) == 0  # a dense layer stays dense


def test_merge_refuses_adapters_peft_already_merged() -> None:
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), target_modules=["0"], r=2)
    model.merge_adapter()
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
