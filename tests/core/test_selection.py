"""Exact k-lowest selection across tensors and ranks (radix select), checked against a sort of everything."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pat_callbacks.core.selection import NonFiniteScores, ScoredLayer, select_lowest, select_lowest_streamed


def _reference(chunks, k):
    """The k lowest by a stable sort of the concatenation (ties in chunk, then index order)."""
    flat = torch.cat([c.reshape(-1) for c in chunks])
    order = torch.sort(flat.float(), stable=True).indices[:k]
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[order] = True
    return list(picked.split([c.numel() for c in chunks]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["normal", "abs", "ties", "tiny"])
def test_selection_matches_a_full_sort(seed, kind):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(33, 7), (5,), (2, 3, 4), (100,)]
    chunks = [torch.randn(shape, generator=generator) for shape in shapes]
    if kind == "abs":
        chunks = [c.abs() for c in chunks]
    elif kind == "ties":
        chunks = [torch.randint(0, 4, c.shape, generator=generator).float() for c in chunks]
    elif kind == "tiny":
        chunks = [c * 1e-30 for c in chunks]
    total = sum(c.numel() for c in chunks)
    for k in (0, 1, total // 3, total // 2 + 1, total - 1, total):
        got = select_lowest(chunks, k)
        assert sum(int(m.sum()) for m in got) == k
        expected = _reference(chunks, k)
        assert all(torch.equal(g.reshape(-1), e) for g, e in zip(got, expected, strict=True)), (kind, k)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=5"):
        select_lowest([torch.zeros(3)], 5)


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(0)
        full = [torch.randint(0, 50, (8, 6), generator=generator).float(), torch.randn(7, generator=generator)]
        # Shard(0): rank r holds rows r::world of each tensor (uneven on the second)
        local = [c[rank * c.shape[0] // world : (rank + 1) * c.shape[0] // world] for c in full]
        masks = select_lowest(local, 20, group=dist.group.WORLD)
        queue.put((rank, [m.tolist() for m in masks]))
    finally:
        dist.destroy_process_group()


def _on_two_ranks(worker, port: int) -> dict:
    """Run ``worker(rank, 2, port, queue)`` in 2 spawned gloo processes; ``{rank: what it put}``."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    return results


def test_ranks_select_exactly_k_of_their_shards_together():
    results = _on_two_ranks(_worker, 29_600 + os.getpid() % 1000)
    generator = torch.Generator().manual_seed(0)
    full = [torch.randint(0, 50, (8, 6), generator=generator).float(), torch.randn(7, generator=generator)]
    stitched = [
        torch.cat([torch.tensor(results[r][i], dtype=torch.bool).reshape(-1, *c.shape[1:]) for r in (0, 1)])
        for i, c in enumerate(full)
    ]
    assert sum(int(m.sum()) for m in stitched) == 20
    # The same set a single process picks when rank order = tensor order within each rank
    threshold = max(float(c[m].max()) for c, m in zip(full, stitched, strict=True) if m.any())
    assert all((c[~m] >= threshold).all() for c, m in zip(full, stitched, strict=True))


# ----------------------------------------------------------------------------------------------- streamed selection
def _streamed_reference(layers, kept, scales, k):
    """The k lowest kept entries of score / scale (float32), by a stable sort: ties in layer, then index order."""
    normalised = [(s.reshape(-1) / sc if sc != 1.0 else s.reshape(-1)) for s, sc in zip(layers, scales, strict=True)]
    flat = torch.cat([torch.where(m, v, torch.inf) for v, m in zip(normalised, kept, strict=True)])
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[torch.sort(flat, stable=True).indices[:k]] = True
    return list(picked.split([s.numel() for s in layers]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["normal", "abs", "ties", "zeros"])
@pytest.mark.parametrize("scaled", [False, True])
def test_streamed_selection_matches_a_full_sort_of_the_kept_entries(seed, kind, scaled):
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.randn(shape, generator=generator) for shape in [(40, 30), (700,), (3, 5), (2500,)]]
    if kind == "abs":
        scores = [s.abs() for s in scores]
    elif kind == "ties":
        scores = [torch.randint(0, 6, s.shape, generator=generator).float() for s in scores]
    elif kind == "zeros":  # many exact zeros among the kept entries (zero-initialised layers)
        scores = [s.abs() * (torch.rand(s.shape, generator=generator) > 0.6) for s in scores]
    kept = [torch.rand(s.numel(), generator=generator) > 0.3 for s in scores]
    scales = [float(s.abs().mean()) if scaled else 1.0 for s in scores]
    layers = [ScoredLayer.of(s, m, sc) for s, m, sc in zip(scores, kept, scales, strict=True)]
    total = sum(int(m.sum()) for m in kept)
    for k in (0, 1, total // 3, total // 2, total - 7, total):
        # a small sample and small chunks: the sampled bracket and the chunked pass are both exercised
        got = select_lowest_streamed(layers, k, sample_size=200, chunk_size=333)
        assert got is not None
        assert sum(int(g.sum()) for g in got) == k
        assert all(not (g & ~m).any() for g, m in zip(got, kept, strict=True))  # only kept entries are chosen
        expected = _streamed_reference(scores, kept, scales, k)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), (kind, k)


def test_a_missed_bracket_is_settled_by_the_radix_select_over_the_layers(monkeypatch):
    import pat_callbacks.core.radix as radix
    import pat_callbacks.core.selection as selection

    monkeypatch.setattr(selection, "_Z", -50.0)  # a bracket that excludes the k-th value
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    assert selection._bracketed([ScoredLayer.of(scores)], 2500, None, 0, 100, 512) is None
    calls = []
    monkeypatch.setattr(selection, "radix_select", lambda *a, **kw: calls.append(a[1]) or radix.radix_select(*a, **kw))
    (got,) = select_lowest_streamed([ScoredLayer.of(scores)], 2500, sample_size=100, chunk_size=512)
    expected = _streamed_reference([scores], [torch.ones(5000, dtype=torch.bool)], [1.0], 2500)[0]
    assert calls == [2500] and torch.equal(got, expected)


def test_streamed_selection_finds_nan_outside_its_sample():
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    scores[7777] = float("nan")
    with pytest.raises(NonFiniteScores) as caught:
        select_lowest_streamed([ScoredLayer.of(torch.rand(50)), ScoredLayer.of(scores)], 10, sample_size=16)
    assert caught.value.layers == [1]


def test_streamed_selection_refuses_more_than_the_kept_entries():
    with pytest.raises(ValueError, match="k=3"):
        select_lowest_streamed([ScoredLayer.of(torch.ones(4), torch.tensor([True, False, True, False]))], 3)


def _streamed_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(0)
        full = [torch.randn(60, 50, generator=generator), torch.randint(0, 9, (41, 30), generator=generator).float()]
        kept_full = [torch.rand(f.shape, generator=generator) > 0.25 for f in full]
        rows = [slice(rank * f.shape[0] // world, (rank + 1) * f.shape[0] // world) for f in full]  # uneven shards
        scores = [f[r] for f, r in zip(full, rows, strict=True)]
        kept = [m[r].reshape(-1) for m, r in zip(kept_full, rows, strict=True)]
        scales = [1.0, 2.5]
        layers = [ScoredLayer.of(s, m, sc) for s, m, sc in zip(scores, kept, scales, strict=True)]
        agree = []
        for k in (1, 700, 2000, 3000):
            got = select_lowest_streamed(layers, k, group=dist.group.WORLD, sample_size=64, chunk_size=300)
            reference = select_lowest(
                [torch.where(m, s.reshape(-1) / sc, torch.inf) for s, m, sc in zip(scores, kept, scales, strict=True)],
                k,
                dist.group.WORLD,
            )
            agree.append(got is not None and all(torch.equal(g, r) for g, r in zip(got, reference, strict=True)))
            counts = torch.tensor([sum(int(g.sum()) for g in got)])
            dist.all_reduce(counts)
            agree.append(int(counts) == k)
        queue.put((rank, agree))
    finally:
        dist.destroy_process_group()


def test_streamed_selection_over_ranks_matches_the_exact_distributed_one():
    results = _on_two_ranks(_streamed_worker, 29_650 + os.getpid() % 1000)
    assert all(all(flags) for flags in results.values()), results
