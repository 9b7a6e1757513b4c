"""A pretrained Hugging Face model from a local folder, as ``train.py`` trains it (``model=hf_pretrained``).

The folder is what ``save_pretrained`` writes (``config.json``, the weights, the tokenizer); it is loaded with
``local_files_only=True``, so nothing is downloaded. Its ``config.json`` says what the model is: a causal language
model (``architectures`` ending in ``ForCausalLM`` / ``LMHeadModel``: GPT-2, Llama, Qwen2...) is trained on its
next-token loss over the unpadded tokens; any other model (an encoder such as ``BertModel``, all-MiniLM-L6-v2) has
no labels and no loss of its own: its objective is distillation of its sentence embeddings from the dense model,
``Distillation(loss="cosine", output="mean_pooled", task_loss=False)`` (``+recovery=distill_embeddings``), which
:meth:`PretrainedModel.setup` requires so that a run never trains an encoder on nothing.

Batches are mappings (``input_ids``, ``attention_mask``), as
:class:`~pat_callbacks.app.data.ShakespeareLinesDataModule` yields them; one-shot calibration passes them to
:meth:`PretrainedModel.forward` as keywords.

Example:
    >>> check_model_folder("no/such/folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model.path='no/such/folder' is not a folder; expected a Hugging Face model folder (config.json \
and the weights, as save_pretrained writes them)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from pat_callbacks.core._validation import check_choice, check_int, check_number, check_positive
from pat_callbacks.recovery.distillation import mean_pooled

__all__ = ["TASKS", "PretrainedModel", "check_model_folder", "load_pretrained", "model_task"]

TASKS = ("auto", "causal_lm", "embeddings")
"""What a pretrained model is trained on: ``auto`` (from ``config.json``), ``causal_lm``, ``embeddings``."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_model_folder(path: str | Path, key: str = "model.path") -> Path:
    """``path`` as a :class:`~pathlib.Path`, raising (naming it) unless it is a folder holding a ``config.json``.

    Example:
        >>> import tempfile
        >>> check_model_folder(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: model.path='...' has no config.json; expected a Hugging Face model folder (config.json \
and the weights, as save_pretrained writes them)
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"Expected `{key}` to be the path of a Hugging Face model folder, but got {path!r}")
    folder = Path(path).expanduser()
    expected = "expected a Hugging Face model folder (config.json and the weights, as save_pretrained writes them)"
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}={str(path)!r} is not a folder; {expected}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} has no config.json; {expected}")
    return folder


def model_task(path: str | Path) -> str:
    """``"causal_lm"`` if the folder's ``config.json`` names a causal LM architecture, else ``"embeddings"``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
        >>> model_task(folder)
        'causal_lm'
        >>> _ = (folder / "config.json").write_text('{"architectures": ["BertModel"]}')
        >>> model_task(folder)
        'embeddings'
    """
    config = json.loads((check_model_folder(path) / "config.json").read_text())
    architectures = config.get("architectures") or []
    return "causal_lm" if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures) else "embeddings"


def load_pretrained(path: str | Path, task: str = "auto") -> torch.nn.Module:
    """The model of a local folder, ``from_pretrained(path, local_files_only=True)``: ``AutoModelForCausalLM`` for
    ``task="causal_lm"``, ``AutoModel`` (the bare encoder or decoder) for ``"embeddings"``.

    Example:
        >>> load_pretrained("no/such/folder", task="auto")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: model.path='no/such/folder' is not a folder; ...
    """
    check_choice("task", task, TASKS)
    folder = check_model_folder(path)
    from transformers import AutoModel, AutoModelForCausalLM

    task = model_task(folder) if task == "auto" else task
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    return auto.from_pretrained(folder, local_files_only=True)


class PretrainedModel(pl.LightningModule):
    """A pretrained Hugging Face model from a local folder: next-token loss for a causal LM, embedding distillation
    (no labels) for an encoder.

    Logs ``train/loss``, ``val/loss`` and ``test/loss`` (nats per token) for a causal LM. For an encoder,
    ``val/fidelity`` and ``test/fidelity``: the mean cosine similarity of each sentence's embedding to the dense
    model's (the teacher of the run's ``Distillation``), 1.0 for an unchanged model.

    Args:
        path: the model folder (``config.json``, weights, tokenizer).
        task: ``"auto"`` (default: from ``config.json``'s ``architectures``), ``"causal_lm"`` or ``"embeddings"``.
        lr, weight_decay, warmup_steps: AdamW (weight decay on matrices only) with a linear warm-up, then constant.

    Example:
        >>> PretrainedModel("no/such/folder", task="masked_lm")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `task` 'masked_lm'; expected one of: 'auto', 'causal_lm', 'embeddings'
    """

    def __init__(
        self,
        path: str,
        task: str = "auto",
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        check_choice("task", task, TASKS)
        check_positive("lr", lr)
        check_number("weight_decay", weight_decay)
        check_int("warmup_steps", warmup_steps, minimum=0)
        folder = check_model_folder(path)
        self.task = model_task(folder) if task == "auto" else task
        self.save_hyperparameters()
        self.net = load_pretrained(folder, self.task).train()  # from_pretrained returns it in eval mode

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """The model's output; for an encoder, its fields plus ``mean_pooled`` (the sentence embedding: the mean
        of ``last_hidden_state`` over the tokens ``attention_mask`` keeps), which ``Distillation(output=...)``
        can name."""
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.task == "causal_lm":
            return out
        return {**out, "mean_pooled": mean_pooled(out, attention_mask=attention_mask)}

    def loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy (nats) of each next token the attention mask keeps (causal LMs only)."""
        if self.task != "causal_lm":
            raise ValueError(
                f"An encoder ({self.net.config.architectures}) has no next-token loss: distil its embeddings "
                "(Distillation(loss='cosine', output='mean_pooled', task_loss=False), +recovery=distill_embeddings)"
            )
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = self(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)

    def setup(self, stage: str) -> None:
        """Refuse, before any weight changes, to fit an encoder without a label-free distillation objective."""
        if stage != "fit" or self.task == "causal_lm" or self._trainer is None:
            return
        from pat_callbacks.callbacks.distillation import Distillation

        if not any(isinstance(c, Distillation) and not c.task_loss for c in self.trainer.callbacks):
            raise ValueError(
                f"{type(self.net).__name__} is an encoder (task='embeddings'): it has no labels and no loss of its "
                "own. Distil its embeddings from the dense model: +recovery=distill_embeddings (Python: "
                "Distillation(loss='cosine', output='mean_pooled', task_loss=False))"
            )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.task != "causal_lm":
            self(**batch)  # the student forward Distillation(task_loss=False) watches; it supplies the loss
            return None
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _evaluate(self, batch: Mapping[str, Tensor], stage: str) -> None:
        size = len(batch["input_ids"])
        if self.task == "causal_lm":
            self.log(f"{stage}/loss", self.loss(batch), on_epoch=True, batch_size=size)
            return
        teacher = self._teacher()
        if teacher is None:  # no dense model to compare with
            return
        mask = batch.get("attention_mask")
        student = mean_pooled(self(**batch), attention_mask=mask)
        device = next(teacher.parameters()).device
        # A teacher given from Python may be the bare Hugging Face model: pooled here, whatever it returns.
        reference = mean_pooled(teacher(**{k: v.to(device) for k, v in batch.items()}), attention_mask=mask)
        fidelity = F.cosine_similarity(student.float(), reference.to(student.device).float(), dim=-1).mean()
        self.log(f"{stage}/fidelity", fidelity, on_epoch=True, prog_bar=True, batch_size=size)

    def _teacher(self) -> Any:
        """The dense model of the run's ``Distillation`` (``None`` without one)."""
        from pat_callbacks.callbacks.distillation import Distillation

        if self._trainer is None:
            return None
        return next((c.teacher for c in self.trainer.callbacks if isinstance(c, Distillation) and c.teacher), None)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        matrices = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        warmup = hp.warmup_steps

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) if warmup else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
