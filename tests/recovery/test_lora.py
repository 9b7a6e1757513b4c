"""Mask-safe LoRA on a tiny Hugging Face GPT-2 (Conv1D) and on nn.Linear: adapters trained under the mask merge into
exactly the trained model, exact zeros, 2:4 kept; dense adapters warn with what the merge lost."""

from __future__ import annotations

import copy

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


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_merged_gpt2_computes_what_the_trained_masked_lora_model_did() -> None:
    model, pruner = _pruned_gpt2()
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    peft_model = add_lora(model, target_modules=TARGETS, r=4, dropout=0.1)  # masked by default
    _train_adapters(peft_model, steps=5)
    peft_model.eval()
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        trained = peft_model(input_ids=tokens).logits
        merged = merge_lora(peft_model, masks=pruner)
        got = merged(input_ids=tokens).logits
    assert _relative_error(got, trained) < 1e-6
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name] != 0, mask) and _conv1d_rows_2_4(params[name]), name
    assert not any("pat_lora_mask" in n for n, _ in merged.named_buffers())  # the mask buffer left with the adapters


def test_masked_adapters_keep_zeros_even_through_a_plain_peft_merge() -> None:
    model, pruner = _pruned_gpt2()
    name = next(iter(pruner.masks))
    mask = pruner.masks[name].clone()
    peft_model = add_lora(model, target_modules=TARGETS, r=4)
    _train_adapters(peft_model)
    assert not any("pat_lora_mask" in key for key in peft_model.state_dict())  # not a checkpoint key
    dense = dict(peft_model.merge_and_unload().named_parameters())[name]
    assert torch.equal(dense != 0, mask)


def test_a_plain_peft_merge_of_dense_adapters_would_fill_the_zeros() -> None:
    model, pruner = _pruned_gpt2()
    name = next(iter(pruner.masks))
    peft_model = add_lora(model, target_modules=TARGETS, r=4, masked=False)
    _train_adapters(peft_model)
    dense = dict(peft_model.merge_and_unload().named_parameters())[name]
    assert float((dense == 0).float().mean()) < 0.01  # why merge_lora masks the delta


def _mlp_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        y = teacher(x)
    student = copy.deepcopy(teacher)
    pruner = Pruner(student, criterion="magnitude", allocation="uniform")
    pruner.prune_to(0.7)
    pruner.apply()
    return student, x, y


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_masked_lora_recovers_and_its_merge_is_the_trained_model_on_a_70_percent_mlp() -> None:
    student, x, y = _mlp_task()
    zeros = [layer.weight == 0 for layer in (student[0], student[2])]
    with torch.no_grad():
        pruned = float(nn.functional.mse_loss(student(x), y))
    model = add_lora(student, r=4)
    _fit(model, x, y)
    with torch.no_grad():
        trained = model(x)
        merged = merge_lora(model)
        got = merged(x)
    assert _relative_error(got, trained) < 1e-6
    assert float(nn.functional.mse_loss(got, y)) < 0.5 * pruned  # the merged model kept what LoRA learned
    assert all(torch.equal(layer.weight == 0, z) for layer, z in zip((merged[0], merged[2]), zeros, strict=True))


def test_merging_dense_adapters_warns_with_the_measured_loss_difference() -> None:
    student, x, y = _mlp_task()
    model = add_lora(student, r=4, masked=False)
    _fit(model, x, y)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return float(nn.functional.mse_loss(m(x), y))

    trained = evaluate(model)
    pattern = r"dropped .* of a delta.s norm .*; loss .* with the adapters -> .* merged"
    with pytest.warns(UserWarning, match=pattern) as w:
        merged = merge_lora(model, evaluate=evaluate)
    after = evaluate(merged)
    assert after > trained  # what the dense merge lost, which the warning reports
    assert f"({after - trained:+.6g})" in str(w[0].message)


def test_a_mask_pruning_what_the_adapter_trained_is_refused_at_merge() -> None:
    torch.manual_seed(0)
    trained = torch.rand(4, 4) > 0.5
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), target_modules=["0"], r=2, masks={"0.weight": trained})
    with pytest.raises(ValueError, match=r"prunes .* entries that its adapter was trained to update"):
        merge_lora(model, masks={"0.weight": torch.zeros(4, 4, dtype=torch.bool)})


def test_a_mask_that_keeps_more_merges_under_the_trained_mask() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight[0, 0] = 0.0  # a kept weight that happens to be exactly zero: not in the weights' mask
    store_mask = torch.ones(4, 4, dtype=torch.bool)
    model = add_lora(net, target_modules=["0"], r=2)  # trained under w != 0
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_()
    x = torch.randn(3, 4)
    with torch.no_grad():
        trained = model(x)
        merged = merge_lora(model, masks={"0.weight": store_mask})
        assert _relative_error(merged(x), trained) < 1e-6
    assert float(merged[0].weight[0, 0]) == 0.0


def test_masked_lora_refuses_a_convolution_and_names_it() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' is a Conv2d: .* masked=False"):
        add_lora(net, target_modules=["0"], r=2)
    assert not any("lora_" in name for name, _ in net.named_parameters())  # the model is given back unwrapped
    assert lora_modules(add_lora(net, target_modules=["0"], r=2, masked=False))


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
