"""Hugging Face encoders and GPT-2 after ``shrink``: sizes alike in every layer reload through plain
``from_pretrained`` (BERT's ``intermediate_size``, GPT-2's ``n_inner``, ALBERT's one shared layer, T5's ``d_ff``);
per-layer sizes and BERT / GPT-2 heads (no config of theirs holds fewer heads of the same size) are recorded and
reload through ``from_pretrained_shrunk``; what neither can rebuild is said at shrink time. Every reload computes
what the shrunk model computed (to 1e-6 on a fixed input)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pat_callbacks.structured import StructuredPruner, from_pretrained_shrunk, shrink  # noqa: E402
from pat_callbacks.structured.hf import LAYER_SIZES_KEY  # noqa: E402
from tests.structured.hf_models import VOCAB, tiny_albert, tiny_bert  # noqa: E402


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _roberta() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=16,
        pad_token_id=1,
    )
    return transformers.RobertaModel(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1
    )
    return transformers.T5EncoderModel(config).eval()


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(_tokens())
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _shrink(model: nn.Module, pruned: dict[str, list[int]], **kwargs: Any) -> list[str]:
    """Shrink ``model`` (in place); return the notes ``shrink`` warned about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrink(model, {"input_ids": _tokens()}, pruned, **kwargs)
    return [str(w.message) for w in caught if str(w.message).startswith("shrink:")]


def _mlp(family: str, layer: int) -> str:
    return {
        "bert": f"encoder.layer.{layer}.intermediate.dense.weight",
        "roberta": f"encoder.layer.{layer}.intermediate.dense.weight",
        "gpt2": f"transformer.h.{layer}.mlp.c_fc.weight",
        "t5": f"encoder.block.{layer}.layer.1.DenseReluDense.wi.weight",
        "albert": "encoder.albert_layer_groups.0.albert_layers.0.ffn.weight",  # one layer, shared by both
    }[family]


def _heads(family: str, layer: int) -> str:
    return {
        "bert": f"encoder.layer.{layer}.attention.self.query.weight",
        "roberta": f"encoder.layer.{layer}.attention.self.query.weight",
        "gpt2": f"transformer.h.{layer}.attn.c_attn.weight",
    }[family]


BUILDS: dict[str, Callable[[], nn.Module]] = {
    "bert": tiny_bert,
    "roberta": _roberta,
    "gpt2": _gpt2,
    "t5": _t5,
    "albert": tiny_albert,
}
WIDTH = {"bert": 32, "roberta": 32, "gpt2": 64, "t5": 32, "albert": 32}  # each MLP's neurons (GPT-2: 4 x 16)
# family -> (config key of the MLP width, the Auto class that rebuilds the same class)
UNIFORM = {
    "bert": ("intermediate_size", transformers.AutoModel),
    "roberta": ("intermediate_size", transformers.AutoModel),
    "gpt2": ("n_inner", transformers.AutoModelForCausalLM),
    "t5": ("d_ff", None),  # AutoModel builds the encoder-decoder T5Model: the family class reloads it
    "albert": ("intermediate_size", transformers.AutoModel),
}


@pytest.mark.parametrize("family", list(UNIFORM))
def test_mlps_shrunk_alike_reload_through_plain_from_pretrained(tmp_path, family):
    model = BUILDS[family]()
    pruned = {_mlp(family, layer): [0, 3, 4, 9, 17, 31] for layer in range(2)}
    assert _shrink(model, pruned) == []  # nothing to say: the config holds it
    key, auto = UNIFORM[family]
    assert getattr(model.config, key) == WIDTH[family] - 6 and not hasattr(model.config, LAYER_SIZES_KEY)
    expected = _output(model)
    model.save_pretrained(tmp_path)
    for cls in (type(model), auto):
        if cls is None:
            continue
        reloaded = cls.from_pretrained(tmp_path).eval()
        assert type(reloaded) is type(model)
        assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)
    assert torch.allclose(_output(from_pretrained_shrunk(tmp_path)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_mlps_shrunk_differently_are_recorded_and_reload_through_from_pretrained_shrunk(tmp_path, family):
    model = BUILDS[family]()
    notes = _shrink(model, {_mlp(family, 0): list(range(0, 32, 3))})
    key = UNIFORM[family][0]
    assert len(notes) == 1 and f"every layer's ['{key}']" in notes[0] and "from_pretrained_shrunk" in notes[0]
    layer = {"bert": "encoder.layer.0", "gpt2": "transformer.h.0.mlp"}[family]
    assert getattr(model.config, key) == WIDTH[family]
    assert getattr(model.config, LAYER_SIZES_KEY) == {layer: {key: WIDTH[family] - 11}}
    expected = _output(model)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)  # the class that was saved: the config's `architectures`
    assert type(reloaded) is type(model)
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_heads_pruned_are_recorded_said_and_reload_through_from_pretrained_shrunk(tmp_path, family):
    model = BUILDS[family]()
    pruned = {_heads(family, layer): [1] for layer in range(2)} | {_mlp(family, 1): [0, 1]}
    notes = _shrink(model, pruned)
    assert len(notes) == 2 and "cannot hold pruned attention heads" in notes[1], notes
    attention = {"gpt2": "transformer.h.{}.attn"}.get(family, "encoder.layer.{}.attention.self")
    key = UNIFORM[family][0]
    config = model.config
    assert config.num_attention_heads == 4 and getattr(config, key) == WIDTH[family]  # head size: hidden / 4
    assert getattr(config, LAYER_SIZES_KEY) == {
        attention.format(0): {"attention_heads": 3},
        attention.format(1): {"attention_heads": 3},
        {"gpt2": "transformer.h.1.mlp"}.get(family, "encoder.layer.1"): {key: WIDTH[family] - 2},
    }
    expected = _output(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own loader: refused
        type(model).from_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path, type(model))
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)


def test_uniform_per_layer_refuses_bert_heads_before_any_cut():
    model = tiny_bert()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pruned = {_heads("bert", layer): [1] for layer in range(2)}
    with pytest.raises(ValueError, match=r"loses heads .*BertConfig cannot hold fewer heads.*from_pretrained_shrunk"):
        shrink(model, None, pruned, uniform_per_layer=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    shrink(model, None, {_mlp("bert", layer): [2, 5] for layer in range(2)}, uniform_per_layer=True)  # MLPs: held
    assert model.config.intermediate_size == 30


@pytest.mark.parametrize(("family", "attention"), [("bert", "*.attention"), ("gpt2", "*.attn")])
def test_uniform_per_layer_refuses_heads_at_setup_and_prunes_mlps_only_for_plain_from_pretrained(
    tmp_path, family, attention
):
    root = _heads(family, 0)
    with pytest.raises(ValueError, match=rf"heads of '{root}' \(and 1 more\) would be pruned.*'\*\.attention'"):
        StructuredPruner(BUILDS[family](), None, uniform_per_layer=True)
    model = BUILDS[family]()
    pruner = StructuredPruner(model, None, exclude=[attention], uniform_per_layer=True)  # MLPs only: accepted
    pruner.prune_to(0.5)
    masked = _output(model)
    assert _shrink(model, pruner.pruned_channels(), uniform_per_layer=True) == []
    assert getattr(model.config, UNIFORM[family][0]) == WIDTH[family] // 2
    shrunk = _output(model)
    assert torch.allclose(shrunk, masked, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert torch.allclose(_output(UNIFORM[family][1].from_pretrained(tmp_path)), shrunk, atol=1e-6, rtol=0)


def test_what_no_loader_rebuilds_is_said_at_shrink_time():
    model = _t5()  # T5's MLPs are not found by role: a per-layer size cannot be cut back by from_pretrained_shrunk
    notes = _shrink(model, {_mlp("t5", 0): [0, 1, 5]})
    assert len(notes) == 1, notes
    assert notes[0].startswith("shrink: T5EncoderModel: its config does not rebuild the shrunk weights (")
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight: (29, 16) held, (32, 16) built" in notes[0]
    assert "neither from_pretrained nor from_pretrained_shrunk reloads it" in notes[0]
