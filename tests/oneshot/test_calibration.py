"""Calibration statistics: exact on known inputs, each input kind checked against the module's own output, no hook
left behind, training afterwards unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pat_callbacks.oneshot import Calibration, input_readers

torch.set_num_threads(1)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_linear_statistics_equal_the_sums_by_hand():
    layer = nn.Linear(3, 2)
    x1 = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    x2 = torch.tensor([[[0.0, 1.0, 1.0]]])  # extra leading dims are rows too
    calib = Calibration(layer, ["weight"], hessians=True).collect([x1, x2])
    rows = torch.cat([x1, x2.reshape(-1, 3)]).double()
    assert torch.equal(calib.sq_norms["weight"], (rows**2).sum(0))
    assert torch.allclose(calib.hessians["weight"].double(), rows.t() @ rows)
    assert calib.rows == {"weight": 3} and calib.batches == 2


def _energy(weight2d: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over input rows x of ||W x||^2 = trace(W H W^T): what the layer's output (minus bias) must square to."""
    return float(torch.trace(weight2d.double() @ hessian.double() @ weight2d.double().t()))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 5, stride=2, padding=1),
        nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect", dilation=2),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
    ],
    ids=["conv1d", "conv1d-same-reflect", "conv2d"],
)
def test_conv_patches_reproduce_the_convolution(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)))
    calib = Calibration(conv, ["weight"], hessians=True).collect([x])
    out = conv(x) - conv.bias.view(1, -1, *([1] * (conv.weight.dim() - 2)))
    energy = _energy(conv.weight.detach().flatten(1), calib.hessians["weight"])
    assert energy == pytest.approx(float(out.detach().double().square().sum()), rel=1e-4)


def test_attention_inputs_and_recomputed_context_reproduce_the_module():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    names = ["in_proj_weight", "out_proj.weight"]
    calib = Calibration(mha, names, hessians=True).collect([x], lambda m, b: m(b, b, b, attn_mask=causal))
    out = mha(x, x, x, attn_mask=causal, need_weights=False)[0] - mha.out_proj.bias
    assert _energy(mha.out_proj.weight.detach(), calib.hessians["out_proj.weight"]) == pytest.approx(
        float(out.detach().double().square().sum()), rel=1e-4
    )
    qkv = x @ mha.in_proj_weight.detach().t()
    assert _energy(mha.in_proj_weight.detach(), calib.hessians["in_proj_weight"]) == pytest.approx(
        float(qkv.detach().double().square().sum()), rel=1e-4
    )


def test_hugging_face_conv1d_statistics_follow_its_input_axis():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # weight stored in x out: (4, 6)
    x = torch.randn(2, 3, 4)
    calib = Calibration(layer, ["weight"], hessians=True).collect([x])
    assert calib.sq_norms["weight"].shape == (4,)
    out = layer(x) - layer.bias
    assert _energy(layer.weight.detach().t(), calib.hessians["weight"]) == pytest.approx(
        float(out.detach().double().square().sum()), rel=1e-4
    )


def test_no_hook_is_left_even_when_a_batch_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calib = Calibration(model, ["0.weight", "2.weight"])
    calib.collect([torch.randn(2, 4)])
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError):
        calib.collect([torch.randn(2, 5)])  # wrong width: the forward pass fails inside the hooks' lifetime
    assert _hooks(model) == 0
    assert model.training  # modes restored


def test_calibration_does_not_change_training_afterwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    Calibration(model, ["0.weight", "3.weight"], hessians=True).collect([torch.randn(8, 6) for _ in range(3)])
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    results = []
    for net in (model, twin):
        torch.manual_seed(1)  # the same dropout masks for both
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert _hooks(model) == 0


def test_state_dict_round_trip_and_unknown_targets_refused():
    layer = nn.Linear(2, 2)
    state = Calibration(layer, ["weight"], hessians=True).collect([torch.ones(4, 2)]).state_dict()
    again = Calibration(layer, ["weight"], hessians=True)
    again.load_state_dict(state)
    assert torch.equal(again.hessians["weight"], torch.full((2, 2), 4.0)) and again.rows == {"weight": 4}
    with pytest.raises(ValueError, match=r"'other\.weight'"):
        again.load_state_dict({"sq_norms": {"other.weight": torch.ones(2)}})


@pytest.mark.parametrize(
    ("module", "name", "match"),
    [
        (nn.GRU(4, 4), "weight_hh_l0", "GRU weights"),
        (nn.Conv1d(4, 4, 3, groups=2), "weight", "groups=2"),
        (nn.ConvTranspose1d(4, 4, 3), "weight", "transposed convolution"),
    ],
)
def test_unreadable_inputs_are_refused_by_name_with_the_exclude_to_use(module, name, match):
    with pytest.raises(ValueError, match=match) as error:
        input_readers(module, [name])
    assert f"exclude=[{name!r}]" in str(error.value)


def test_cross_attention_in_proj_is_refused_by_name():
    mha = nn.MultiheadAttention(4, 1)
    q, kv = torch.randn(3, 1, 4), torch.randn(5, 1, 4)
    with pytest.raises(ValueError, match="cross-attention"):
        Calibration(mha, ["in_proj_weight"]).collect([None], lambda m, _: m(q, kv, kv))
    assert _hooks(mha) == 0
