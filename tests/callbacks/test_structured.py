"""Structured pruning: whole channels with their coupled parameters, then a physically smaller model."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from pat_callbacks import StructuredPruning
from pat_callbacks.app.models import Classifier
from pat_callbacks.structured import shrink


class SmallCNN(nn.Module):
    """Digits as 1x8x8 images: conv-BN-ReLU, conv-ReLU, flatten, linear (BatchNorm and flatten couplings)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


class LeakChecker(Callback):
    def __init__(self, pruning):
        self.pruning, self.checked = pruning, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        for name, mask in self.pruning.store.masks.items():
            assert (self.pruning.store.params[name].detach()[~mask] == 0).all(), name
            self.checked += 1


@pytest.mark.parametrize("importance", ["l2", "l1", "group_taylor"])
def test_whole_channels_and_their_coupled_parameters_are_zero(fit, importance):
    pruning = StructuredPruning(final_sparsity=0.5, importance=importance, start_step=0, end_step=20, update_every=5)
    checker = LeakChecker(pruning)
    _trainer, module = fit([pruning, checker], module=Classifier(SmallCNN()), max_steps=30)
    assert checker.checked > 0
    net = module.net
    pruned = pruning.pruned_channels()
    assert sorted(pruned) == ["net.conv1.weight", "net.conv2.weight"]  # fc (the classifier) kept whole
    assert len(pruned["net.conv1.weight"]) == 4 and len(pruned["net.conv2.weight"]) == 6
    c1 = pruned["net.conv1.weight"]
    assert (net.conv1.weight[c1] == 0).all() and (net.conv1.bias[c1] == 0).all()
    assert (net.bn1.weight[c1] == 0).all() and (net.bn1.bias[c1] == 0).all()  # BatchNorm follows
    assert (net.conv2.weight[:, c1] == 0).all()  # and the next layer's input channels
    kept = [c for c in range(8) if c not in c1]
    assert (net.conv1.weight[kept].abs().sum((1, 2, 3)) > 0).all()
    c2 = pruned["net.conv2.weight"]
    fc_columns = torch.tensor([c * 16 + p for c in c2 for p in range(16)])
    assert (net.fc.weight[:, fc_columns] == 0).all()  # through the flatten


def test_shrunk_model_matches_the_masked_one_and_round_trips_weights_only(tmp_path, fit):
    pruning = StructuredPruning(final_sparsity=0.5, start_step=0, end_step=20, update_every=5)
    _trainer, module = fit([pruning], module=Classifier(SmallCNN()), max_steps=30)
    net = module.net.eval()
    x = torch.rand(5, 64)
    expected = net(x)
    pruned = {name.removeprefix("net."): channels for name, channels in pruning.pruned_channels().items()}
    small = shrink(net, torch.rand(1, 64), pruned)
    assert small.conv1.out_channels == 4 and small.conv2.out_channels == 6 and small.fc.in_features == 96
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in SmallCNN().parameters()) / 2
    assert torch.allclose(small(x), expected, atol=1e-5)
    torch.save({"pruned": pruned, "state_dict": small.state_dict()}, tmp_path / "small.pt")
    saved = torch.load(tmp_path / "small.pt", weights_only=True)
    rebuilt = shrink(SmallCNN().eval(), torch.rand(1, 64), saved["pruned"])
    rebuilt.load_state_dict(saved["state_dict"])
    assert torch.allclose(rebuilt(x), expected, atol=1e-5)


def test_bad_structured_arguments():
    with pytest.raises(ValueError, match="Unknown `criterion` 'l3'"):
        StructuredPruning(final_sparsity=0.5, importance="l3", start_step=0, end_step=10)
    with pytest.raises(ValueError, match=r"`final_sparsity` to be a float in \[0, 1\), but got 1.0"):
        StructuredPruning(final_sparsity=1.0, start_step=0, end_step=10)


def test_residual_couplings_masked_model_equals_shrunk_model():
    import copy

    from bench.export import ResidualCNN
    from pat_callbacks.structured import channel_groups, channel_masks, channel_scores

    torch.manual_seed(0)
    model = ResidualCNN(width=8).eval()
    example = torch.randn(1, 3, 16, 16)
    params = dict(model.named_parameters())
    groups = channel_groups(model, example, ignore=["head.weight"])
    roots = sorted(g.root for g in groups)
    assert roots == ["block.0.weight", "block.3.weight", "down.0.weight"]
    residual = next(g for g in groups if g.root == "block.3.weight")
    assert {"stem.0.weight", "stem.1.weight", "block.4.weight"} <= residual.params()  # coupled by the add
    pruned = {}
    for group in groups:
        lowest = torch.topk(channel_scores(group, params, "l1"), group.n_channels // 2, largest=False).indices
        pruned[group.root] = torch.zeros(group.n_channels, dtype=torch.bool).index_fill_(0, lowest, True)
    masks = channel_masks(groups, pruned, params)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    x = torch.randn(4, 3, 16, 16)
    small = shrink(copy.deepcopy(model), example, {k: torch.nonzero(v).flatten().tolist() for k, v in pruned.items()})
    assert small.stem[0].out_channels == 4 and small.block[3].out_channels == 4
    assert torch.allclose(small(x), model(x), atol=1e-5)


class TinyAttention(nn.Module):
    """Digits as 8 tokens of 8 features: linear embedding, 4-head self-attention, mean-pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(-1, 8, 8))
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc(mixed.mean(1))


def test_gate_importance_is_the_head_gate_gradient():
    """Scaling a head's output by a gate g scales its v rows, or equally its out_proj columns, so dL/dg must come
    out the same from both parameter sets (Michel et al. 2019's head importance)."""
    from pat_callbacks.structured import channel_scores, head_groups

    torch.manual_seed(0)
    model = TinyAttention()
    nn.functional.cross_entropy(model(torch.rand(6, 64)), torch.randint(0, 10, (6,))).backward()
    params = dict(model.named_parameters())
    grads = {name: p.grad for name, p in params.items()}
    (group,) = head_groups(model)
    via_v_rows = channel_scores(group, params, "gate", grads)
    out_w, out_g = model.attn.out_proj.weight, model.attn.out_proj.weight.grad
    via_out_columns = torch.stack(
        [(out_w[:, h * 4 : (h + 1) * 4] * out_g[:, h * 4 : (h + 1) * 4]).sum() for h in range(4)]
    )
    assert torch.allclose(via_v_rows, via_out_columns.abs(), atol=1e-6)


@pytest.mark.parametrize("importance", ["gate", "l2"])
def test_attention_heads_are_pruned_whole(fit, importance):
    pruning = StructuredPruning(final_sparsity=0.5, importance=importance, start_step=0, end_step=20, update_every=5)
    checker = LeakChecker(pruning)
    _, module = fit([pruning, checker], module=Classifier(TinyAttention()), max_steps=30)
    attn = module.net.attn
    heads = pruning.pruned_channels()["net.attn.in_proj_weight"]
    assert len(heads) == 2 and checker.checked > 0
    for head in heads:
        block = torch.arange(head * 4, (head + 1) * 4)
        rows = torch.cat([block, block + 16, block + 32])
        assert (attn.in_proj_weight[rows] == 0).all() and (attn.in_proj_bias[rows] == 0).all()
        assert (attn.out_proj.weight[:, block] == 0).all()
    assert "net.attn.out_proj.weight" not in [g.root for g in pruning.groups]  # never pruned by embedding dim


class ProjectionAttention(nn.Module):
    """Self-attention written with separate q/k/v/o Linear layers (the common transformer layout)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.fc = heads, nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(-1, 8, 8))
        b, t, _ = tokens.shape

        def split(h):  # the head width comes from the projection, so the module still works with fewer heads
            return h.view(b, t, self.heads, h.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(tokens)), split(self.k_proj(tokens)), split(self.v_proj(tokens))
        mixed = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.fc(self.o_proj(mixed).mean(1))


def test_heads_of_separate_qkv_projections(fit):
    layout = {"q": "net.q_proj", "k": "net.k_proj", "v": "net.v_proj", "out": "net.o_proj", "num_heads": 4}
    pruning = StructuredPruning(
        final_sparsity=0.5, importance="gate", attention=[layout], start_step=0, end_step=20, update_every=5
    )
    checker = LeakChecker(pruning)
    _, module = fit([pruning, checker], module=Classifier(ProjectionAttention()), max_steps=30)
    heads = pruning.pruned_channels()["net.q_proj.weight"]
    assert len(heads) == 2
    net = module.net
    for head in heads:
        block = torch.arange(head * 4, (head + 1) * 4)
        for proj in (net.q_proj, net.k_proj, net.v_proj):
            assert (proj.weight[block] == 0).all() and (proj.bias[block] == 0).all()
        assert (net.o_proj.weight[:, block] == 0).all()
    roots = [g.root for g in pruning.groups]
    assert not {"net.k_proj.weight", "net.v_proj.weight", "net.o_proj.weight"} & set(roots)


def test_bad_attention_layout_fails_in_setup(fit):
    layout = {"q": "net.q_proj", "k": "net.k_proj", "v": "net.nope", "out": "net.o_proj", "num_heads": 4}
    with pytest.raises(ValueError, match=r"Attention layout `v`='net.nope' is not a Linear module"):
        fit(
            [StructuredPruning(final_sparsity=0.5, attention=[layout], start_step=0, end_step=5)],
            module=Classifier(ProjectionAttention()),
        )


def test_separate_qkv_heads_shrink_to_the_masked_model(fit):
    layout = {"q": "net.q_proj", "k": "net.k_proj", "v": "net.v_proj", "out": "net.o_proj", "num_heads": 4}
    layout["heads_attr"] = "net.heads"
    pruning = StructuredPruning(
        final_sparsity=0.5, importance="l2", attention=[layout], start_step=0, end_step=20, update_every=5
    )
    _, module = fit([pruning], module=Classifier(ProjectionAttention()), max_steps=30)
    module.eval()
    x = torch.rand(5, 64)
    expected = module(x)
    small = shrink(module, x, pruning.pruned_channels(), attention=[layout])
    assert small.net.heads == 2 and small.net.q_proj.out_features == 8 and small.net.o_proj.in_features == 8
    assert torch.allclose(small(x), expected, atol=1e-5)


def test_the_residual_stream_is_left_whole_with_a_note(fit):
    pruning = StructuredPruning(final_sparsity=0.5, start_step=0, end_step=10, update_every=5)
    fit([pruning], module=Classifier(TinyAttention()), max_steps=12)
    assert [g.kind for g in pruning.groups] == ["heads"]  # not the embedding (model width) nor the classifier
    assert "residual stream (model width) is left whole" in pruning.pruner.notes[0]


def test_exclude_takes_globs_validates_them_and_keeps_the_classifier(fit):
    with pytest.raises(ValueError, match=r"`exclude` pattern 'net\.conv9\*' matches no parameter or module"):
        fit(
            [StructuredPruning(final_sparsity=0.5, exclude=["net.conv9*"], start_step=0, end_step=5)],
            module=Classifier(SmallCNN()),
        )
    with pytest.warns(DeprecationWarning, match="`ignore` is now called `exclude`"):  # the former name still works
        pruning = StructuredPruning(
            final_sparsity=0.5, ignore=["net.conv2*"], start_step=0, end_step=10, update_every=5
        )
    fit([pruning], module=Classifier(SmallCNN()), max_steps=12)
    assert sorted(pruning.pruned_channels()) == ["net.conv1.weight"]  # conv2 excluded, fc (classifier) still kept


def test_no_group_is_ever_pruned_to_nothing(fit):
    pruning = StructuredPruning(final_sparsity=0.99, start_step=0, end_step=10, update_every=5)
    with pytest.warns(UserWarning, match="would remove every channel"):
        fit([pruning], module=Classifier(SmallCNN()), max_steps=12)
    channels = pruning.pruned_channels()
    assert len(channels["net.conv1.weight"]) == 7 and len(channels["net.conv2.weight"]) == 11


def test_criterion_is_the_word_importance_its_former_name():
    with pytest.warns(DeprecationWarning, match="`importance` is now called `criterion`"):
        old = StructuredPruning(sparsity=0.5, importance="l1", start_step=0, end_step=10)
    assert (
        old.criterion.name == StructuredPruning(sparsity=0.5, criterion="l1", start_step=0, end_step=10).criterion.name
    )
    with pytest.raises(ValueError, match="Give `criterion`"):
        StructuredPruning(sparsity=0.5, importance="l1", criterion="l2", start_step=0, end_step=10)
