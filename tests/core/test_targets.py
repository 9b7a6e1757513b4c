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


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertModel(config)


BERT_LAYER_WEIGHTS = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
]


def test_include_encoder_selects_the_encoders_weight_matrices_by_role_on_bert():
    model = _tiny_bert()
    expected = [f"encoder.layer.{i}.{name}" for i in range(2) for name in BERT_LAYER_WEIGHTS]
    assert list(select_parameters(model, include="encoder.*")) == expected  # no LayerNorm, no bias, no pooler
    assert list(select_parameters(model, include="encoder.*.weight")) == expected  # the old hint works too
    assert list(select_parameters(model, include=["encoder.layer.1.*"])) == expected[6:]


def test_the_bert_pooler_is_a_default_target_and_excluded_by_name():
    model = _tiny_bert()
    default = list(select_parameters(model))
    assert default[-1] == "pooler.dense.weight" and len(default) == 13  # 12 encoder matrices + the pooler
    assert "pooler.dense.weight" not in select_parameters(model, exclude="pooler.*")


def test_a_pattern_covering_no_role_target_selects_what_it_names():
    model = _tiny_bert()
    assert list(select_parameters(model, include="embeddings.word_embeddings.weight")) == [
        "embeddings.word_embeddings.weight"
    ]
    mixed = select_parameters(model, include=["embeddings.word_*", "encoder.layer.0.intermediate.*"])
    assert list(mixed) == ["embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"]
    with pytest.raises(ValueError, match=r"fewer than 2 dimensions .*'embeddings.LayerNorm.weight'"):
        select_parameters(model, include="embeddings.LayerNorm.*")
    everything = select_parameters(model, include="encoder.layer.0.output.*", allow_vectors=True)
    assert "encoder.layer.0.output.LayerNorm.weight" in everything and "encoder.layer.0.output.dense.bias" in everything


def test_complex_weights_are_refused_when_the_pruner_is_built_naming_the_parameter():
    import torch

    from pat_callbacks.core import Pruner

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"real floating-point .* but 1\.weight is torch\.complex64; exclude it"):
        Pruner(model)
    with pytest.raises(ValueError, match=r"1\.weight is torch\.complex64"):
        select_parameters(model)
    assert list(select_parameters(model, exclude=["1.*"])) == ["0.weight"]  # the way out works
    pruner = Pruner(model, exclude=["1.*"])
    assert pruner.prune_to(0.5)


def test_a_complex_parameter_given_by_name_is_refused_too():
    import pytest
    import torch

    from pat_callbacks.core.pruner import Pruner

    weight = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"w is torch.complex64"):
        Pruner({"w": weight})
