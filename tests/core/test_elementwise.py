"""Elementwise passes in cache-sized pieces: every entry exactly once, and the same bits as one whole pass."""

from __future__ import annotations

import pytest
import torch

from pat_callbacks.core import elementwise
from pat_callbacks.core.criteria import get_criterion
from pat_callbacks.core.elementwise import aligned_pieces, multiply_by_masks_


def _tensors(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3,), (0, 4), (2, 3, 4, 4), (11,)]
    tensors = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    tensors[3] = tensors[3].contiguous(memory_format=torch.channels_last)  # not contiguous: stays whole
    tensors[4][0], tensors[4][1], tensors[4][2] = float("nan"), float("inf"), -float("inf")
    tensors.append(torch.randn(6, 8, generator=generator).to(dtype).t())  # a transposed view
    return tensors


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = {4: torch.int32, 2: torch.int16}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def _masks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(t.shape, generator=generator) > 0.5 for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("piece", [1, 4, 7, 1 << 18])
def test_multiply_by_masks_gives_the_bits_of_one_whole_multiply(dtype: torch.dtype, piece: int) -> None:
    tensors = _tensors(dtype)
    masks = _masks(tensors)
    expected = [t.clone().mul_(m) for t, m in zip(tensors, masks, strict=True)]
    multiply_by_masks_(tensors, masks, piece=piece)
    for got, want in zip(tensors, expected, strict=True):
        assert got.dtype == dtype and got.stride() == want.stride()
        assert torch.equal(_bits(got), _bits(want))  # NaN, inf and the sign of zero included


def test_multiply_by_masks_takes_uint8_and_float_masks() -> None:
    tensors = _tensors()
    masks = _masks(tensors)
    as_uint8 = [t.clone() for t in tensors]
    as_float = [t.clone() for t in tensors]
    multiply_by_masks_(as_uint8, [m.to(torch.uint8) for m in masks], piece=5)
    multiply_by_masks_(as_float, [m.float() for m in masks], piece=5)
    multiply_by_masks_(tensors, masks, piece=5)
    for a, b, c in zip(tensors, as_uint8, as_float, strict=True):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a), _bits(c))


@pytest.mark.parametrize("piece", [None, 1, 3, 16, 1000])
def test_aligned_pieces_cover_every_entry_once(piece: int | None) -> None:
    tensors = _tensors()
    seen = [torch.zeros_like(t) for t in tensors]
    for columns in aligned_pieces(list(zip(tensors, seen, strict=True)), piece):
        values, counts = columns
        if piece is not None:
            assert sum(v.numel() for v in values) <= piece or len(values) == 1
        for value, count in zip(values, counts, strict=True):
            assert value.shape == count.shape
            count.add_(1)
    assert all(bool((count == 1).all()) for count in seen)


def test_aligned_pieces_of_nothing_is_nothing() -> None:
    assert list(aligned_pieces([], 4)) == []


@pytest.mark.parametrize("name", ["taylor", "fisher", "movement"])
@pytest.mark.parametrize("history", [torch.float32, torch.bfloat16])
def test_criteria_histories_in_pieces_equal_whole_ones(
    monkeypatch: pytest.MonkeyPatch, name: str, history: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(2)
    params = [torch.randn(shape, generator=generator) for shape in [(9, 7), (5,), (4, 3, 3, 3)]]
    params[2] = params[2].contiguous(memory_format=torch.channels_last)
    steps = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(3)]

    def run(piece: int) -> list[dict[str, torch.Tensor]]:
        monkeypatch.setattr(elementwise, "CPU_PIECE", piece)
        criterion, states = get_criterion(name), [{} for _ in params]
        for step, grads in enumerate(steps):
            criterion.accumulate_many(params, grads, states)
            if step == 0:  # the history's dtype from now on, as the Scorer does
                for state in states:
                    state.update({k: v.to(history) for k, v in state.items() if v.dim()})
        return states

    whole, pieces = run(1 << 30), run(10)
    for a, b in zip(whole, pieces, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
