import pytest
from torch import nn

from pat_callbacks.app.models import ConvBase
from pat_callbacks.core.targets import select_parameters


def test_default_targets_are_linear_and_conv_weights():
    names = list(select_parameters(ConvBase()))
    assert names == ["conv1.weight", "conv2.weight", "conv3.weight", "linear.weight"]


def test_biases_and_norms_are_excluded_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    assert list(select_parameters(model)) == ["0.weight", "4.weight"]


def test_include_and_exclude_patterns():
    model = ConvBase()
    assert list(select_parameters(model, exclude=["conv1.*", "linear.*"])) == ["conv2.weight", "conv3.weight"]
    assert list(select_parameters(model, include="*.bias", allow_vectors=True)) == [
        "conv1.bias",
        "conv2.bias",
        "conv3.bias",
        "linear.bias",
    ]


def test_tied_parameters_are_pruned_once():
    first = nn.Linear(4, 4)
    model = nn.Sequential(first, nn.Linear(4, 4))
    model[1].weight = first.weight
    assert list(select_parameters(model)) == ["0.weight"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": ["head.*"]}, "`include` pattern 'head.*' matches no parameter"),
        ({"exclude": "conv9.*"}, "`exclude` pattern 'conv9.*' matches no parameter"),
        ({"exclude": ["*"]}, "No parameter to prune in ConvBase"),
        ({"include": [1]}, "Expected `include` to be a glob pattern or a list of them, but got [1]"),
    ],
)
def test_bad_patterns_fail_with_the_pattern_named(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        select_parameters(ConvBase(), **kwargs)
    assert message in str(excinfo.value)


def test_model_without_prunable_layers_fails():
    with pytest.raises(ValueError, match="No parameter to prune in LayerNorm"):
        select_parameters(nn.LayerNorm(4))
