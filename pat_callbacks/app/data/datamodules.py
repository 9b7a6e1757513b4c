"""DataModules for the bundled, offline datasets.

Shuffling uses :class:`EpochSeededSampler` (the order of epoch ``e`` depends only on ``seed`` and ``e``), so a
run resumed from a checkpoint sees the same batches as an uninterrupted one; on several ranks (DDP, FSDP2) each rank
takes its share of that order through :class:`DistributedEpochSeededSampler`.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((32, 64), torch.int64)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from pat_callbacks.core._validation import check_fraction, check_int

__all__ = ["DigitsDataModule", "DistributedEpochSeededSampler", "EpochSeededSampler", "MNIST1DDataModule"]


class EpochSeededSampler(Sampler[int]):
    """Random permutation per epoch, from ``seed`` and the epoch number.

    The epoch is read from ``epoch_fn`` when given (the DataModules pass ``trainer.current_epoch``), else the
    value of the last ``set_epoch`` call. Lightning's ``set_epoch`` value is off by one after resuming from a
    checkpoint written at an epoch end, while ``current_epoch`` is right in both runs.

    Example:
        >>> s = EpochSeededSampler(5, seed=0)
        >>> first = list(s); s.set_epoch(1); second = list(s); s.set_epoch(0)
        >>> list(s) == first != second
        True
    """

    def __init__(self, length: int, seed: int = 0, epoch_fn: Callable[[], int] | None = None) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class DistributedEpochSeededSampler(DistributedSampler):
    """One rank's share of :class:`EpochSeededSampler`'s order: padded to a multiple of ``num_replicas`` by
    repeating its start and strided by rank, as ``DistributedSampler`` does with ``drop_last=False``.

    Lightning leaves a ``DistributedSampler`` as it is. Any other sampler it wraps in ``DistributedSamplerWrapper``,
    which shuffles the wrapped order again by ``seed + epoch`` with the epoch from ``set_epoch``, and that value is
    one too high after resuming from an epoch-end checkpoint (measured with Lightning 2.6: ``set_epoch(3)`` while
    ``current_epoch`` is 2), so a resumed run on several ranks would see other batches than an uninterrupted one.

    Example:
        >>> ranks = [DistributedEpochSeededSampler(5, num_replicas=2, rank=r) for r in (0, 1)]
        >>> order = list(EpochSeededSampler(5))
        >>> [list(s) for s in ranks] == [(order + order[:1])[0::2], (order + order[:1])[1::2]]
        True
    """

    def __init__(
        self, length: int, num_replicas: int, rank: int, seed: int = 0, epoch_fn: Callable[[], int] | None = None
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.order = EpochSeededSampler(length, seed=seed, epoch_fn=epoch_fn)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order)
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding] if padding > 0 else []
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def _train_sampler(length: int, seed: int, trainer: pl.Trainer | None) -> Sampler[int]:
    """The training sampler: the trainer's ranks split one epoch-seeded order (one rank: the order itself)."""

    def epoch() -> int:
        return trainer.current_epoch if trainer is not None else 0

    ranks = trainer.distributed_sampler_kwargs if trainer is not None else None
    if ranks:  # a distributed strategy, even with one data-parallel rank: Lightning would wrap any other sampler
        return DistributedEpochSeededSampler(
            length, num_replicas=ranks["num_replicas"], rank=ranks["rank"], seed=seed, epoch_fn=epoch
        )
    return EpochSeededSampler(length, seed=seed, epoch_fn=epoch)


class _TensorDataModule(pl.LightningDataModule):
    """Train / validation / test splits held as tensors; subclasses fill them in :meth:`_load`."""

    def __init__(self, batch_size: int, val_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.val_size = check_int("val_size", val_size, minimum=0)
        self.seed = int(seed)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``x_train, y_train, x_test, y_test``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test = self._load()
        if self.val_size >= len(y_train):
            raise ValueError(f"Expected `val_size` < {len(y_train)} (the training set), but got {self.val_size}")
        n_train = len(y_train) - self.val_size
        self.train_set = TensorDataset(x_train[:n_train], y_train[:n_train])
        self.val_set = TensorDataset(x_train[n_train:], y_train[n_train:]) if self.val_size else None
        self.test_set = TensorDataset(x_test, y_test)

    def _require_setup(self) -> None:
        if self.train_set is None or self.test_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        sampler = _train_sampler(len(self.train_set), self.seed, self.trainer)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        # No validation split: return an empty list and Lightning skips validation.
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=1000, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return DataLoader(self.test_set, batch_size=1000, num_workers=self.num_workers)


class MNIST1DDataModule(_TensorDataModule):
    """MNIST-1D (Greydanus 2020), generated offline with ``mnist1d.data.make_dataset`` (no download).

    Defaults give the paper's split: 4,000 training and 1,000 test sequences of length 40. ``val_size`` takes
    that many training sequences out for validation (0: the paper's protocol, no validation set).

    Example:
        >>> dm = MNIST1DDataModule(val_size=500)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (3500, 500, 1000)
    """

    def __init__(
        self,
        batch_size: int = 100,
        num_samples: int = 5000,
        train_split: float = 0.8,
        val_size: int = 0,
        data_seed: int = 42,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, num_workers=num_workers)
        self.num_samples = check_int("num_samples", num_samples, minimum=10)
        self.train_split = check_fraction("train_split", train_split)
        self.data_seed = int(data_seed)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = self.num_samples
        args.train_split = self.train_split
        args.seed = self.data_seed
        # make_dataset reseeds Python's and NumPy's global RNGs; keep the caller's streams untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return _as_tensors(data["x"], data["y"], data["x_test"], data["y_test"])


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images, shipped with the package), flattened to 64 features
    scaled to [0, 1]; a seeded stratified split holds out ``test_fraction`` for testing.

    Example:
        >>> dm = DigitsDataModule()
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.test_set)
        (1437, 360)"""

    def __init__(
        self,
        batch_size: int = 64,
        test_fraction: float = 0.2,
        val_size: int = 0,
        data_seed: int = 42,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, num_workers=num_workers)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        self.data_seed = int(data_seed)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x / 16.0, y, test_size=self.test_fraction, random_state=self.data_seed, stratify=y
        )
        return _as_tensors(x_train, y_train, x_test, y_test)


def _as_tensors(x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Arrays to float32 inputs and int64 labels."""
    return (
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.long),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.long),
    )
