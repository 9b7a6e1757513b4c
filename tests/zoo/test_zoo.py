"""Every zoo model, pruned by default as its users expect: real zeros per targeted weight, embeddings untouched."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pat_callbacks import DynamicSparseTraining, GradualPruning, Pruner, StructuredPruning
from pat_callbacks.core.patterns import prune_count
from pat_callbacks.core.targets import describe_targets, target_roles, weight_matrices
from pat_callbacks.export import (
    SparseLinear,
    compress_state_dict,
    decompress_state_dict,
    make_permanent,
    to_sparse_inference,
)
from pat_callbacks.structured import shrink
from tests.conftest import make_trainer
from tests.zoo.models import ZOO

NAMES = sorted(ZOO)


def _fit(tmp_path, name, callbacks, max_steps=12, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    case = ZOO[name]
    module = case.build()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, limit_val_batches=0, **kwargs)
    trainer.fit(module, datamodule=case.data())
    return trainer, module


def _zeros(param: torch.Tensor) -> int:
    return int((param.detach() == 0).sum())


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_are_the_matrices_a_matmul_consumes(name):
    case = ZOO[name]
    module = case.build()
    pruner = Pruner(module)
    assert set(pruner.params) == case.targets
    table = describe_targets(module, pruner.params)
    for dense in case.dense:
        assert (
            f"{dense} " in table
            and "embedding" in table.splitlines()[[dense in line for line in table.splitlines()].index(True)]
        )


@pytest.mark.parametrize("name", NAMES)
def test_gradual_pruning_reaches_the_target_on_every_real_weight(tmp_path, name):
    case = ZOO[name]
    pruning = GradualPruning(
        sparsity=0.8,
        criterion="magnitude",
        allocation="uniform",
        start_step=0,
        end_step=8,
        update_every=4,
        verbose=False,
    )
    _, module = _fit(tmp_path, name, [pruning])
    named = dict(module.named_parameters())
    for target in case.targets:  # uniform: every targeted weight at the target, exact to the weight
        assert _zeros(named[target]) == prune_count(named[target].numel(), 0.8), target
    for dense in case.dense:
        assert _zeros(named[dense]) == 0, f"{dense} was pruned"
    matrices = weight_matrices(module)
    real_all = sum(_zeros(p) for p in matrices.values()) / sum(p.numel() for p in matrices.values())
    real = sum(_zeros(named[t]) for t in case.targets) / sum(named[t].numel() for t in case.targets)
    assert pruning.store.sparsity() == pytest.approx(real, abs=1e-9)
    assert pruning.sparsity_all == pytest.approx(real_all, abs=1e-9)
    diluted = bool(set(matrices) - case.targets)  # embeddings (and other dense matrices) lower it
    assert real_all <= real + 1e-9 and (real_all < real) == diluted


@pytest.mark.parametrize("name", NAMES)
def test_two_four_along_each_weights_inputs(tmp_path, name):
    case = ZOO[name]
    roles = target_roles(case.build())

    def inputs_last(name, param):  # rows x inputs, whatever the storage layout
        matrix = param.detach().t() if roles[name].transposed else param.detach()
        return matrix.reshape(matrix.shape[0], -1)

    probe = dict(case.build().named_parameters())
    awkward = [t for t in sorted(case.targets) if inputs_last(t, probe[t]).shape[1] % 4]
    pruning = GradualPruning(pattern="2:4", start_step=0, end_step=8, update_every=4, exclude=awkward or None)
    _, module = _fit(tmp_path, name, [pruning])
    named = dict(module.named_parameters())
    checked = 0
    for target in case.targets - set(awkward):
        groups = inputs_last(target, named[target]).reshape(-1, 4)
        assert ((groups == 0).sum(1) >= 2).all(), target
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", NAMES)
def test_rigl_keeps_every_layer_count_while_masks_move(tmp_path, name):
    case = ZOO[name]
    dst = DynamicSparseTraining(sparsity=0.8, regrowth="rigl", update_every=3, end_step=10, verbose=False)
    masks = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            masks.update({n: m.clone() for n, m in dst.store.masks.items()})

    _, module = _fit(tmp_path, name, [dst, Snapshot()])
    named = dict(module.named_parameters())
    assert set(dst.store.masks) == case.targets
    assert any(not torch.equal(masks[n], dst.store.masks[n]) for n in masks)  # connectivity moved
    for target in case.targets:
        assert int((~dst.store.masks[target]).sum()) == int((~masks[target]).sum()), target
        assert (named[target].detach()[~dst.store.masks[target]] == 0).all(), target
    total = sum(named[t].numel() for t in case.targets)
    assert sum(int((~m).sum()) for m in dst.store.masks.values()) == prune_count(total, 0.8)
    for dense in case.dense:
        assert _zeros(named[dense]) == 0


@pytest.mark.parametrize("name", ["gpt_tied", "hf_gpt2", "lstm", "resnet_bn"])
def test_resume_continues_bit_for_bit(tmp_path, name):
    def run(directory, ckpt_path=None, save=False):
        pruning = GradualPruning(final_sparsity=0.7, criterion="taylor", start_step=1, end_step=9, update_every=2)
        callbacks = [pruning]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=directory, every_n_epochs=1, save_top_k=-1, filename="{step}"))
        pl.seed_everything(0, verbose=False)
        module, data = ZOO[name].build(), ZOO[name].data()
        data.setup("fit")  # five steps an epoch: resume from an epoch end (mid-epoch resume is not exact in Lightning)
        data.batch_size = math.ceil(len(data.train_dataloader().dataset) / 5)
        # (limit_val_batches=0 would break exact resume in Lightning itself, dense runs included)
        trainer = make_trainer(directory, callbacks, max_steps=10, enable_checkpointing=save)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return pruning, module

    full, full_module = run(tmp_path / "full", save=True)
    resumed, resumed_module = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "step=5.ckpt")
    assert all(torch.equal(full.store.masks[n], resumed.store.masks[n]) for n in full.store.masks)
    for (key, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_export_keeps_outputs_and_tied_weights(tmp_path, name):
    case = ZOO[name]
    pruning = GradualPruning(final_sparsity=0.8, start_step=0, end_step=4, update_every=2, verbose=False)
    _, module = _fit(tmp_path, name, [pruning], max_steps=5)
    module.eval()
    example = case.example()
    expected = module(example)
    permanent = make_permanent(copy.deepcopy(module), pruning.store.masks)
    assert torch.equal(permanent(example), expected)
    sparse = to_sparse_inference(copy.deepcopy(module), min_sparsity=0.5, example_inputs=example)  # checks outputs
    with torch.no_grad():  # the fused nn.TransformerEncoderLayer fast path runs here in eval
        assert torch.allclose(sparse(example), expected, atol=1e-5)
    assert any(isinstance(m, SparseLinear) for m in sparse.modules()) == (name not in ("hf_gpt2",))
    state = module.state_dict()
    compressed = compress_state_dict(state)
    restored = decompress_state_dict(compressed)
    assert all(torch.equal(state[k], restored[k]) for k in state)
    tied = [k for k, item in compressed["tensors"].items() if item["format"] == "alias"]
    assert bool(tied) == (name in ("gpt_tied", "hf_gpt2", "hf_bert"))  # a tied weight is stored once
    fresh = case.build().eval()
    fresh.load_state_dict(restored)
    assert torch.allclose(fresh(example), expected, atol=1e-6)


def test_tied_and_alias_names_are_one_parameter_everywhere(tmp_path):
    """The output head tied to the input embedding is the embedding: never pruned through the alias by default,
    named by either name in include / exclude / make_permanent."""
    module = ZOO["gpt_tied"].build()
    assert "net.head.weight" not in Pruner(module).params and "net.embed.weight" not in Pruner(module).params
    chosen = Pruner(module, include=["net.head.weight"])  # asked for by its alias: pruned once, canonical name
    assert list(chosen.params) == ["net.embed.weight"]
    assert "net.blocks.0.mlp.0.weight" not in Pruner(module, exclude=["net.blocks.0.mlp.*"]).params
    mask = torch.ones_like(module.net.embed.weight, dtype=torch.bool)
    mask[0] = False
    make_permanent(module, {"net.head.weight": mask})
    assert (module.net.head.weight[0] == 0).all() and (module.net.embed.weight[0] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_structured_pruning_then_shrink_computes_what_the_masked_model_did(tmp_path, name):
    case = ZOO[name]
    pruning = StructuredPruning(
        final_sparsity=0.5, importance="gate", start_step=0, end_step=6, update_every=3, example_inputs=case.example()
    )
    _, module = _fit(tmp_path, name, [pruning], max_steps=8)
    module.eval()
    example = case.example()
    with torch.no_grad():
        expected = module(example)
    pruned = pruning.pruned_channels()
    assert pruned and all(len(channels) == g.n_channels // 2 for g in pruning.groups for channels in [pruned[g.root]])
    kinds = {g.kind for g in pruning.groups}
    transformer = name not in ("gru", "lstm", "resnet_bn")
    assert kinds == ({"heads", "ffn"} if transformer else {"rnn"} if name in ("gru", "lstm") else {"channels"})
    before = sum(p.numel() for p in module.parameters())
    small = shrink(module, example, pruned)
    with torch.no_grad():
        got = small(example)
    assert sum(p.numel() for p in small.parameters()) < before
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    if name != "resnet_bn":  # a weights-only reload: shrink a fresh model with the same indices, load the state dict
        fresh = shrink(case.build().eval(), example, pruned)
        fresh.load_state_dict(small.state_dict())
        with torch.no_grad():
            assert torch.allclose(fresh(example), expected, atol=1e-4)
