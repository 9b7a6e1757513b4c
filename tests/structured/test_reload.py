"""``from_pretrained_shrunk`` on what a hostile-use pass found: Llama attention with as many key/value heads as query
heads, layers whose heads differ in both counts, another class on top of the saved model, ``.bin`` folders, its
keyword arguments and messages. Every reload computes what the shrunk model computed (to 1e-6 on a fixed input)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pat_callbacks.structured import StructuredPruner, from_pretrained_shrunk, shrink  # noqa: E402
from pat_callbacks.structured.hf import LAYER_SIZES_KEY, shrink_to_sizes  # noqa: E402
from tests.structured.hf_models import VOCAB, tiny_albert, tiny_bert  # noqa: E402


def _tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(_tokens())
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _llama(config_class: Any = None, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = (config_class or transformers.LlamaConfig)(**(sizes | kwargs))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _quiet_shrink(model: nn.Module, pruned: dict[str, list[int]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrink(model, None, pruned)


@pytest.mark.parametrize(
    ("config_class", "head_dim"), [(transformers.LlamaConfig, None), (transformers.GemmaConfig, 8)]
)
def test_multi_head_attention_one_layer_excluded_reloads(tmp_path, config_class, head_dim):
    # num_key_value_heads == num_attention_heads (Llama-2-7B, Gemma-7B): the key/value groups' root is q_proj
    model = _llama(config_class, num_key_value_heads=4, **({"head_dim": head_dim} if head_dim else {}))
    pruner = StructuredPruner(model, None, exclude=["model.layers.1.*"])
    pruner.prune_to(0.5)
    _quiet_shrink(model, pruner.pruned_channels())
    assert getattr(model.config, LAYER_SIZES_KEY)["model.layers.0.self_attn"] == {
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    expected = _output(model)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)
    assert [layer.self_attn.k_proj.out_features for layer in reloaded.model.layers] == [16, 32]
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)


def test_layers_with_other_head_and_key_value_counts_reload(tmp_path):
    # 16 heads over 4 key/value heads; layer 0 keeps 8 over 2 (whole groups), layer 1 8 over 4 (2 per group)
    model = _llama(hidden_size=64, num_attention_heads=16, num_key_value_heads=4)
    _quiet_shrink(
        model,
        {
            "model.layers.0.self_attn.k_proj.weight": [2, 3],
            "model.layers.1.self_attn.q_proj.weight": [g * 4 + i for g in range(4) for i in (2, 3)],
        },
    )
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (16, 4)  # both layers are cut from it
    assert getattr(config, LAYER_SIZES_KEY) == {
        "model.layers.0.self_attn": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 4},
        "model.layers.1.self_attn": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4},
    }
    expected = _output(model)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)
    assert [(a.q_proj.out_features, a.k_proj.out_features) for a in (x.self_attn for x in reloaded.model.layers)] == [
        (32, 8),
        (32, 16),
    ]
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)


def _shrunk_bert(prefix: str = "", config_class: Any = None, **kwargs: Any) -> nn.Module:
    """A BERT with head 1 of layer 0 and MLP neurons 0, 1 of layer 1 cut: recorded in the config."""
    model = tiny_bert(config_class, **kwargs)
    layer = f"{prefix}encoder.layer"
    _quiet_shrink(
        model, {f"{layer}.0.attention.self.query.weight": [1], f"{layer}.1.intermediate.dense.weight": [0, 1]}
    )
    assert getattr(model.config, LAYER_SIZES_KEY)
    return model


def _hidden(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens(), output_hidden_states=True).hidden_states[-1]


def test_a_base_model_loads_into_a_class_with_a_head_on_top_and_back(tmp_path):
    base = _shrunk_bert()  # e.g. MiniLM pruned, then fine-tuned for classification
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match=r"initialised anew.*'classifier.bias', 'classifier.weight'"):
        classifier = from_pretrained_shrunk(tmp_path / "base", transformers.BertForSequenceClassification)
    assert classifier.bert.encoder.layer[0].attention.self.query.out_features == 12
    assert torch.allclose(_hidden(classifier), _hidden(base), atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="cls.predictions"):  # a transformers class name too
        masked_lm = from_pretrained_shrunk(tmp_path / "base", "AutoModelForMaskedLM")
    assert torch.allclose(_hidden(masked_lm), _hidden(base), atol=1e-6, rtol=0)

    headed = _shrunk_bert("bert.", transformers.BertForSequenceClassification, num_labels=3)
    headed.save_pretrained(tmp_path / "headed")
    for cls in (transformers.BertModel, transformers.AutoModel):
        encoder = from_pretrained_shrunk(tmp_path / "headed", cls)
        assert type(encoder) is transformers.BertModel
        assert torch.allclose(_hidden(encoder), _hidden(headed), atol=1e-6, rtol=0)


def test_a_llama_with_per_layer_sizes_loads_as_its_base_model(tmp_path):
    model = _llama(num_key_value_heads=2)
    _quiet_shrink(model, {"model.layers.0.mlp.up_proj.weight": list(range(10))})
    model.save_pretrained(tmp_path)
    base = from_pretrained_shrunk(tmp_path, transformers.AutoModel)
    assert type(base) is transformers.LlamaModel
    assert torch.allclose(_hidden(base), _hidden(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_folder_of_pytorch_model_bin_reloads(tmp_path, shards):
    model = _shrunk_bert()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:  # the sharded layout: an index naming the file of each weight
        names = sorted(state)
        parts = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
        for file, keys in parts.items():
            torch.save({key: state[key] for key in keys}, tmp_path / file)
        index = {"metadata": {}, "weight_map": {key: file for file, keys in parts.items() for key in keys}}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    reloaded = from_pretrained_shrunk(tmp_path, transformers.BertModel)  # config.save_pretrained: no architectures
    assert torch.allclose(_output(reloaded), _output(model), atol=1e-6, rtol=0)


def test_keyword_arguments_subfolder_and_mismatched_sizes(tmp_path):
    model = _shrunk_bert("bert.", transformers.BertForSequenceClassification, num_labels=3)
    model.save_pretrained(tmp_path / "sub")
    reloaded = from_pretrained_shrunk(tmp_path, subfolder="sub")
    assert torch.allclose(_output(reloaded), _output(model), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\['classifier.bias', 'classifier.weight'\] at other sizes.*num_labels"):
        from_pretrained_shrunk(tmp_path / "sub", num_labels=5)
    with pytest.warns(UserWarning, match="initialised anew"):
        five = from_pretrained_shrunk(tmp_path / "sub", num_labels=5, ignore_mismatched_sizes=True)
    assert five.classifier.out_features == 5
    assert torch.allclose(_hidden(five), _hidden(model), atol=1e-6, rtol=0)


def test_messages_name_the_folder_the_class_and_the_record_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no such local folder: {tmp_path / 'nowhere'}"):
        from_pretrained_shrunk(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no config.json"):
        from_pretrained_shrunk(tmp_path)
    model = _shrunk_bert()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_class 'BertModle' is no transformers model class"):
        from_pretrained_shrunk(tmp_path, "BertModle")
    config = json.loads((tmp_path / "config.json").read_text())
    for entry, message in [
        ({"encoder.layer.7": {"intermediate_size": 3}}, "'encoder.layer.7'.*names no module of BertModel"),
        ({"encoder.layer.1": {"intermediate_size": 0}}, r"'encoder.layer.1'.*ints from 1 to the built model's \(32"),
        ({"encoder.layer.1": {"attention_heads": 2}}, "'encoder.layer.1'.*holds no BERT / GPT-2 attention"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(config | {LAYER_SIZES_KEY: entry}))
        with pytest.raises(ValueError, match=f"`{LAYER_SIZES_KEY}` entry {message}"):
            from_pretrained_shrunk(tmp_path)


@pytest.mark.parametrize("cls", ["AlbertModel", "AlbertForMaskedLM"])
def test_albert_under_the_structured_pruner_loses_heads_and_mlp_neurons_only_and_reloads(tmp_path, cls):
    # traced, it used to prune the hidden width under LayerNorm too: shrunk logits off the masked ones by 0.08
    model = tiny_albert(getattr(transformers, cls))
    pruner = StructuredPruner(model, {"input_ids": _tokens()})
    layer = f"{'albert.' if cls != 'AlbertModel' else ''}encoder.albert_layer_groups.0.albert_layers.0"
    assert sorted(g.root for g in pruner.groups) == [
        f"{layer}.attention.query.weight",
        f"{layer}.ffn.weight",
    ]
    pruner.prune_to(0.5)
    masked = _output(model)
    _quiet_shrink(model, pruner.pruned_channels())
    assert model.base_model.encoder.embedding_hidden_mapping_in.out_features == 16  # the width is left whole
    assert torch.allclose(_output(model), masked, atol=1e-5)
    assert getattr(model.config, LAYER_SIZES_KEY) == {f"{layer}.attention": {"attention_heads": 2}}
    model.save_pretrained(tmp_path)
    assert torch.allclose(_output(from_pretrained_shrunk(tmp_path)), _output(model), atol=1e-6, rtol=0)


def test_multi_head_attention_key_value_heads_by_k_proj_and_a_record_without_the_query_count():
    model = _llama(num_key_value_heads=4)
    by_q = _llama(num_key_value_heads=4)
    _quiet_shrink(model, {"model.layers.0.self_attn.k_proj.weight": [1]})  # the group's root is q_proj: same heads
    _quiet_shrink(by_q, {"model.layers.0.self_attn.q_proj.weight": [1]})
    assert model.model.layers[0].self_attn.k_proj.out_features == 24
    assert torch.equal(_output(model), _output(by_q))
    with pytest.raises(ValueError, match=r"heads of 'model.layers.1.self_attn.q_proj.weight' twice"):
        shrink(model, None, {f"model.layers.1.self_attn.{p}_proj.weight": [0] for p in "qk"})
    fresh = _llama(num_key_value_heads=4)  # a record by hand, key/value heads only: whole groups with their queries
    shrink_to_sizes(fresh, {"model.layers.0.self_attn": {"num_key_value_heads": 2}})
    assert (
        fresh.model.layers[0].self_attn.q_proj.out_features,
        fresh.model.layers[0].self_attn.k_proj.out_features,
    ) == (
        16,
        16,
    )
