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

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from pat_callbacks.core._validation import check_choice, check_int, check_number, check_positive
from pat_callbacks.recovery.distillation import mean_pooled

__all__ = ["TASKS", "PretrainedModel", "check_model_folder", "check_pretrained_config", "load_pretrained", "model_task"]

TASKS = ("auto", "causal_lm", "embeddings")
"""What a pretrained model is trained on: ``auto`` (from ``config.json``), ``causal_lm``, ``embeddings``."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_SUPPORTED = (
    "supported: causal language models (architectures *ForCausalLM / *LMHeadModel: GPT-2, Llama, Qwen2...) and "
    "BERT-like text encoders (BertModel, DistilBertModel, all-MiniLM-L6-v2)"
)
_log = logging.getLogger(__name__)


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


def _model_class(folder: Path, task: str) -> type:
    """The Hugging Face class ``task`` loads the folder's ``config.json`` into, refusing (naming the architecture)
    a model this path cannot train: an encoder-decoder (T5, BART) or a model that takes no token ids (ViT)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    name = ", ".join(config.architectures or []) or f"model_type={config.model_type!r}"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model.path={str(folder)!r} holds {name}, an encoder-decoder: not supported; {_SUPPORTED}")
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    try:
        cls = auto._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"model.path={str(folder)!r} holds {name}, which has no {auto.__name__} class (task={task!r}); {_SUPPORTED}"
        ) from None
    if getattr(cls, "main_input_name", "input_ids") != "input_ids":
        raise ValueError(
            f"model.path={str(folder)!r} holds {name}, which takes {cls.main_input_name!r}, not token ids: not "
            f"supported; {_SUPPORTED}"
        )
    return cls


def load_pretrained(path: str | Path, task: str = "auto") -> torch.nn.Module:
    """The model of a local folder, ``from_pretrained(path, local_files_only=True)``: the causal LM class for
    ``task="causal_lm"``, the bare encoder or decoder (``AutoModel``'s class) for ``"embeddings"``, without a pooling
    layer where the class has one (BERT's pooler: the embeddings are mean-pooled from ``last_hidden_state``, so the
    pooler would never be used, trained nor pruned). An encoder-decoder or a model that takes no token ids is refused,
    naming its architecture; a causal LM whose folder lacks some of its weights (a BERT folder with
    ``task="causal_lm"``: a new, random LM head) is loaded with a warning naming them.

    Example:
        >>> load_pretrained("no/such/folder", task="auto")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: model.path='no/such/folder' is not a folder; ...
    """
    check_choice("task", task, TASKS)
    folder = check_model_folder(path)
    task = model_task(folder) if task == "auto" else task
    cls = _model_class(folder, task)
    options: dict[str, Any] = {}
    if task == "embeddings" and "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        options["add_pooling_layer"] = False
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if options:  # the folder's pooler weights are left out on purpose: no "UNEXPECTED" load report for them
        hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **options)
    finally:
        hf_logging.set_verbosity(verbosity)
    if options:
        _log.info("%s: loaded without its pooler (the embeddings are mean-pooled from last_hidden_state)", cls.__name__)
    if task == "causal_lm" and info["missing_keys"]:
        _log.warning(
            "model.task=causal_lm on %s (%s): %d weights are not in the folder and start random: %s; a folder "
            "saved from a causal LM (architectures *ForCausalLM / *LMHeadModel) has them all",
            folder,
            model_architectures(folder),
            len(info["missing_keys"]),
            ", ".join(sorted(info["missing_keys"])[:4]) + (", ..." if len(info["missing_keys"]) > 4 else ""),
        )
    return model


def model_architectures(path: str | Path) -> str:
    """``config.json``'s ``architectures``, for messages (``"none named"`` when absent)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return ", ".join(config.get("architectures") or []) or "config.json names no architectures"


def check_pretrained_config(cfg: Any) -> None:
    """For a ``train.py`` config with ``model=hf_pretrained``, refuse before anything is built: an unknown
    ``model.*`` key (with the closest name), a missing ``model.path``, a folder that is not a model folder (named as
    ``model.path``, not as the datamodule's ``tokenizer`` that interpolates it), and a datamodule whose batches are
    not token-id mappings (``datamodule=shakespeare_lines``). Other configs pass untouched.

    Example:
        >>> from omegaconf import OmegaConf
        >>> target = "pat_callbacks.app.models.PretrainedModel"
        >>> check_pretrained_config(OmegaConf.create({"model": {"_target_": target, "path": "???"}}))
        Traceback (most recent call last):
        ...
        ValueError: model=hf_pretrained needs model.path=FOLDER, a Hugging Face model folder (config.json, the \
weights and the tokenizer, as save_pretrained writes them)
        >>> check_pretrained_config(OmegaConf.create({"model": {"_target_": target, "pth": "x", "path": "x"}}))
        Traceback (most recent call last):
        ...
        ValueError: Unknown key `model.pth` for model=hf_pretrained; did you mean `path`?
    """
    from omegaconf import OmegaConf

    from pat_callbacks.app._key_hints import unknown_key_hint

    model = cfg.get("model")
    if model is None or not str(model.get("_target_", "")).endswith("PretrainedModel"):
        return
    known = set(inspect.signature(PretrainedModel.__init__).parameters) - {"self"}
    for key in model:
        if key != "_target_" and key not in known:
            raise ValueError(f"Unknown key `model.{key}` for model=hf_pretrained{unknown_key_hint(str(key), known)}")
    if OmegaConf.is_missing(model, "path"):
        raise ValueError(
            "model=hf_pretrained needs model.path=FOLDER, a Hugging Face model folder (config.json, the weights and "
            "the tokenizer, as save_pretrained writes them)"
        )
    check_model_folder(model.path)
    datamodule = cfg.get("datamodule")
    if datamodule is not None:
        from hydra.utils import get_class

        from pat_callbacks.app.data.tokenized import TokenizedLinesDataModule

        target = str(datamodule.get("_target_", ""))
        cls = get_class(target) if target else None
        if isinstance(cls, type) and not issubclass(cls, TokenizedLinesDataModule):
            raise ValueError(
                f"model=hf_pretrained takes batches of token ids (input_ids, attention_mask) from its own tokenizer, "
                f"but the datamodule is {target.rsplit('.', 1)[-1]}: add datamodule=shakespeare_lines"
            )


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
            inferred = ""
            if self.hparams.task == "auto":
                inferred = (
                    f" (inferred from config.json: {model_architectures(self.hparams.path)}, no *ForCausalLM / "
                    "*LMHeadModel; a causal LM is trained on its next-token loss with model.task=causal_lm)"
                )
            raise ValueError(
                f"{type(self.net).__name__} is trained as an encoder (task='embeddings'){inferred}: it has no labels "
                "and no loss of its own. Distil its embeddings from the dense model: +recovery=distill_embeddings "
                "(Python: Distillation(loss='cosine', output='mean_pooled', task_loss=False))"
            )

    def on_fit_start(self) -> None:
        """Refuse, before the first step (the pruning callbacks built their pruners in their own ``on_fit_start``,
        which runs first), a gradient criterion on an encoder: its only loss is distillation from the dense model,
        which is 0 while the student equals the teacher (until the first mask), so the gradients are rounding noise
        (measured: loss 1.5e-8, largest gradient 1.2e-7) and a gradient criterion would rank noise."""
        if self.task == "causal_lm":
            return
        from pat_callbacks.callbacks.base import PruningCallback

        for callback in self.trainer.callbacks:
            pruner = getattr(callback, "pruner", None) if isinstance(callback, PruningCallback) else None
            if pruner is not None and pruner.needs_grad:
                raise ValueError(
                    f"criterion={pruner.scorer_name!r} ranks weights by their gradients, but an encoder's only loss "
                    "here is distillation from the dense model, 0 until the first mask: its gradients are noise. Use "
                    "a criterion that reads no gradient (pruning.criterion=magnitude), or a one-shot start such as "
                    "+pruning=sparsegpt or +pruning=wanda"
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
