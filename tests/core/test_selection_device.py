"""The device strategy of the selections (histogram radix select, no host read in a loop) forced on a CPU: the same
masks as the host strategy, bit for bit, from single selections up to whole pruning runs and 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pat_callbacks.core.radix as radix
import pat_callbacks.core.selection as selection
from pat_callbacks.core import Pruner
from pat_callbacks.core.regrowth import swapped_entries
from pat_callbacks.core.selection import (
    NonFiniteScores,
    ScoredLayer,
    count_below,
    select_lowest,
    select_lowest_kept,
    select_lowest_streamed,
    signed_keys,
)
from tests.core.test_selection import _on_two_ranks, _streamed_reference


def _both(monkeypatch, run):
    """``run()`` under the host strategy, then under the device strategy with its histograms even for the small
    selections (whose threshold is otherwise found by ``kthvalue``)."""
    monkeypatch.setattr(selection, "STRATEGY", "host")
    host = run()
    monkeypatch.setattr(selection, "STRATEGY", "device")
    monkeypatch.setattr(radix, "SMALL_SELECTION", 0)
    return host, run()


def _scores(kind: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.randn(shape, generator=generator) for shape in [(40, 30), (700,), (3, 5), (2500,)]]
    if kind == "abs":
        scores = [s.abs() for s in scores]
    elif kind == "ties":
        scores = [torch.randint(0, 6, s.shape, generator=generator).float() for s in scores]
    elif kind == "zeros":
        scores = [s.abs() * (torch.rand(s.shape, generator=generator) > 0.6) for s in scores]
    elif kind == "bf16":  # bf16 values: the device strategy settles them in one histogram pass
        scores = [s.bfloat16().float() for s in scores]
    elif kind == "signed_zeros":  # -0.0 ranks below +0.0 in both strategies
        scores = [torch.where(s > 0, 0.0, -0.0) for s in scores]
    return scores


KINDS = ["normal", "abs", "ties", "zeros", "bf16", "signed_zeros"]


def test_signed_keys_and_their_top_halves_keep_the_float_order():
    values = torch.tensor([float("-inf"), -3.5, -1e-38, -0.0, 0.0, 1e-45, 2.0, 2.0000002, float("inf")])
    keys = signed_keys(values)
    assert keys.tolist() == sorted(keys.tolist()) and len(set(keys.tolist())) == values.numel()
    assert torch.equal(radix._high_keys(values).int(), keys >> 16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaled", [False, True])
def test_device_streamed_selection_equals_the_host_one_and_a_full_sort(monkeypatch, kind, scaled):
    scores = _scores(kind, seed=1)
    generator = torch.Generator().manual_seed(2)
    kept = [torch.rand(s.numel(), generator=generator) > 0.3 for s in scores]
    scales = [max(float(s.abs().mean()), 1e-3) if scaled else 1.0 for s in scores]
    layers = [ScoredLayer.of(s, m, sc) for s, m, sc in zip(scores, kept, scales, strict=True)]
    total = sum(int(m.sum()) for m in kept)
    for k in (0, 1, total // 3, total // 2, total - 7, total):
        host, device = _both(
            monkeypatch, lambda k=k: select_lowest_streamed(layers, k, sample_size=200, chunk_size=333)
        )
        assert all(torch.equal(h, d) for h, d in zip(host, device, strict=True)), (kind, k)
        if kind == "signed_zeros":
            continue  # a sort holds -0.0 == 0.0; both strategies rank -0.0 first (its key is lower)
        expected = _streamed_reference(scores, kept, scales, k)
        assert all(torch.equal(d, e) for d, e in zip(device, expected, strict=True)), (kind, k)


@pytest.mark.parametrize("kind", KINDS)
def test_device_exact_selection_equals_the_host_one(monkeypatch, kind):
    scores = _scores(kind, seed=3)
    scores[0] = scores[0].masked_fill(scores[0] < -1.0, float("-inf"))  # entries pruned before score -inf
    total = sum(s.numel() for s in scores)
    for k in (0, 1, total // 4, total - 1, total):
        host, device = _both(monkeypatch, lambda k=k: select_lowest(scores, k))
        assert all(h.shape == d.shape and torch.equal(h, d) for h, d in zip(host, device, strict=True)), (kind, k)


def test_device_selection_finds_nan_and_refuses_too_many(monkeypatch):
    monkeypatch.setattr(selection, "STRATEGY", "device")
    monkeypatch.setattr(radix, "SMALL_SELECTION", 0)  # the histograms, not kthvalue
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    scores[7777] = float("nan")
    with pytest.raises(NonFiniteScores) as caught:
        select_lowest_streamed([ScoredLayer.of(torch.rand(50)), ScoredLayer.of(scores)], 10)
    assert caught.value.layers == [1]
    huge = torch.full((8,), 3e38)  # a sum that overflows is not a non-finite score
    assert int(select_lowest_streamed([ScoredLayer.of(huge)], 3)[0].sum()) == 3
    with pytest.raises(ValueError, match="k=3"):
        select_lowest_streamed([ScoredLayer.of(torch.ones(4), torch.tensor([True, False, True, False]))], 3)
    with pytest.raises(ValueError, match="k=5"):
        select_lowest([torch.zeros(3)], 5)


def test_device_strategy_never_reads_the_host_inside_a_loop(monkeypatch):
    """A whole selection over 12 chunks (with partial ties) reads the host twice, in ``_read`` after each histogram
    pass, and nowhere else: every way a tensor reaches Python fails outside it."""
    monkeypatch.setattr(selection, "STRATEGY", "device")
    reads, allowed = [], [False]
    original = radix._read

    def counted(*tensors):
        reads.append(len(tensors))
        allowed[0] = True
        try:
            return original(*tensors)
        finally:
            allowed[0] = False

    monkeypatch.setattr(radix, "_read", counted)
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, method)

        def guarded(self, *args, _real=real, _method=method):
            if not allowed[0]:
                pytest.fail(f"Tensor.{_method} read the host inside the device strategy")
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, method, guarded)
    generator = torch.Generator().manual_seed(0)
    size = radix.SMALL_SELECTION // 2  # 3 layers: above the small selections' kthvalue path
    layers = [ScoredLayer.of(torch.randint(0, 50, (size,), generator=generator).float() / 7) for _ in range(3)]
    chosen = select_lowest_streamed(layers, size, chunk_size=size // 4)
    allowed[0] = True
    assert sum(int(m.sum()) for m in chosen) == size
    assert len(reads) == 2


def test_auto_strategy_is_host_on_a_cpu_and_unknown_ones_are_refused(monkeypatch):
    assert not selection.uses_device_strategy(torch.device("cpu"))
    assert selection.uses_device_strategy(torch.device("cuda"))
    monkeypatch.setattr(selection, "STRATEGY", "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        selection.uses_device_strategy(torch.device("cpu"))


def test_layer_total_is_the_chunked_float64_sum_to_the_bit():
    scores = torch.rand(300_001, generator=torch.Generator().manual_seed(0)) * 1e3
    layer = ScoredLayer.of(scores)
    chunked = sum(
        float(scores[a : a + selection.CHUNK_SIZE].sum()) for a in range(0, scores.numel(), selection.CHUNK_SIZE)
    )
    assert selection.layer_total(layer) == chunked


def test_deterministic_mode_counts_with_bincount_and_selects_the_same(monkeypatch):
    scores = _scores("ties", seed=5) + _scores("normal", seed=6)
    generator = torch.Generator().manual_seed(7)
    layers = [ScoredLayer.of(s, torch.rand(s.numel(), generator=generator) > 0.2) for s in scores]
    monkeypatch.setattr(selection, "STRATEGY", "host")
    host = select_lowest_streamed(layers, 2000)
    monkeypatch.setattr(selection, "STRATEGY", "device")
    monkeypatch.setattr(radix, "SMALL_SELECTION", 0)
    histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda *a, **k: pytest.fail("histc under deterministic algorithms"))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        device = select_lowest_streamed(layers, 2000, chunk_size=500)
    finally:
        torch.use_deterministic_algorithms(was)
        monkeypatch.setattr(torch, "histc", histc)
    assert all(torch.equal(h, d) for h, d in zip(host, device, strict=True))


def test_the_strategy_can_be_set_for_a_whole_run_by_the_environment():
    import subprocess
    import sys

    code = "import pat_callbacks.core.selection as s; print(s.STRATEGY)"
    env = {**os.environ, "PAT_SELECTION_STRATEGY": "device"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "device"


def test_count_below_counts_over_chunks():
    assert count_below([torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])], 2.5) == 3


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[2].weight[:4].zero_()  # exact zeros: ties at the threshold
        model[2].weight[4:8] = 0.125
    return model


def _pruning_run(criterion: str, allocation: str, pattern: str, steps: int = 3):
    """Masks after a short run: gradients accumulated, three growing targets, one RigL-style regrowth."""
    model = _model(0)
    pruner = Pruner(model, criterion=criterion, allocation=allocation, pattern=pattern)
    x, y = torch.randn(32, 24, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 8
    history = []
    for step, target in enumerate((0.3, 0.5, 0.75)[:steps]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.accumulate()
        assert pruner.prune_to(target, step=step)
        pruner.mask_grads()
        history.append({n: m.clone() for n, m in pruner.masks.items()})
    if pattern == "unstructured":
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.regrow(0.2, "rigl")
        history.append({n: m.clone() for n, m in pruner.masks.items()})
    return history


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "movement", "fisher"])
@pytest.mark.parametrize(
    ("allocation", "pattern"),
    [
        ("uniform", "unstructured"),
        ("global", "unstructured"),
        ("global_raw", "unstructured"),
        ("erk", "unstructured"),
        ("uniform", "2:4"),
    ],
)
def test_pruning_runs_end_with_the_same_masks_under_both_strategies(monkeypatch, criterion, allocation, pattern):
    host, device = _both(monkeypatch, lambda: _pruning_run(criterion, allocation, pattern))
    for h, d in zip(host, device, strict=True):
        assert h.keys() == d.keys() and all(torch.equal(h[n], d[n]) for n in h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rigl_swaps_the_same_entries_under_both_strategies(monkeypatch, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=generator) * (torch.rand(64, 48, generator=generator) > 0.5)).to(dtype)
    grad = torch.randn(64, 48, generator=generator).to(dtype)
    grad[:8] = 0.0  # ties among the regrowth candidates
    mask = weight != 0
    host, device = _both(monkeypatch, lambda: swapped_entries(mask, weight, grad, 0.3, "rigl"))
    assert torch.equal(host, device) and int((host & mask).sum()) == int((host & ~mask).sum()) > 0


def test_select_lowest_kept_takes_the_device_strategy_without_fallback(monkeypatch):
    monkeypatch.setattr(selection, "STRATEGY", "device")
    monkeypatch.setattr(selection, "_Z", -50.0)  # would miss the host bracket; the device strategy has none
    layer = ScoredLayer.of(torch.randn(5000, generator=torch.Generator().manual_seed(0)))
    assert int(select_lowest_kept([layer], 2500)[0].sum()) == 2500


def _device_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(0)
        full = [torch.randn(60, 50, generator=generator), torch.randint(0, 9, (41, 30), generator=generator).float()]
        kept_full = [torch.rand(f.shape, generator=generator) > 0.25 for f in full]
        rows = [slice(rank * f.shape[0] // world, (rank + 1) * f.shape[0] // world) for f in full]
        scores = [f[r] for f, r in zip(full, rows, strict=True)]
        kept = [m[r].reshape(-1) for m, r in zip(kept_full, rows, strict=True)]
        layers = [ScoredLayer.of(s, m, sc) for s, m, sc in zip(scores, kept, [1.0, 2.5], strict=True)]
        agree = []
        for k in (1, 700, 2000, 3000):
            selection.STRATEGY = "host"
            host = select_lowest_streamed(layers, k, group=dist.group.WORLD, sample_size=64, chunk_size=300)
            exact_host = select_lowest(scores, k, dist.group.WORLD)
            selection.STRATEGY = "device"
            device = select_lowest_streamed(layers, k, group=dist.group.WORLD, chunk_size=300)
            exact_device = select_lowest(scores, k, dist.group.WORLD)
            agree.append(all(torch.equal(h, d) for h, d in zip(host, device, strict=True)))
            agree.append(all(torch.equal(h, d) for h, d in zip(exact_host, exact_device, strict=True)))
        queue.put((rank, agree))
    finally:
        dist.destroy_process_group()


def test_device_strategy_over_two_ranks_equals_the_host_one():
    results = _on_two_ranks(_device_worker, 29_700 + os.getpid() % 1000)
    assert all(all(flags) for flags in results.values()), results


def test_the_environment_strategy_is_read_in_any_case_and_an_unknown_one_is_refused_at_import():
    import subprocess
    import sys

    code = "import pat_callbacks.core.selection as s; print(s.STRATEGY)"
    upper = {**os.environ, "PAT_SELECTION_STRATEGY": "Host"}
    done = subprocess.run([sys.executable, "-c", code], env=upper, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "host"
    garbage = {**os.environ, "PAT_SELECTION_STRATEGY": "garbage"}
    failed = subprocess.run([sys.executable, "-c", code], env=garbage, capture_output=True, text=True)
    expected = "PAT_SELECTION_STRATEGY to be one of ['auto', 'host', 'device'] (any case), but got 'garbage'"
    assert failed.returncode != 0 and expected in failed.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_small_selections_find_the_same_threshold_by_kthvalue_as_by_histograms(monkeypatch, kind):
    import pat_callbacks.core.radix as radix

    scores = _scores(kind, 3)
    generator = torch.Generator().manual_seed(4)
    kept = [torch.rand(s.numel(), generator=generator) > 0.3 for s in scores]
    layers = [ScoredLayer.of(s, m, sc) for s, m, sc in zip(scores, kept, [1.0, 2.5, 1.0, 0.3], strict=True)]
    total = sum(int(m.sum()) for m in kept)
    for k in (0, 1, total // 3, total - 1, total):
        small = radix.radix_select(layers, k)
        monkeypatch.setattr(radix, "SMALL_SELECTION", 0)
        large = radix.radix_select(layers, k, chunk_size=333)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(small, large, strict=True)), (kind, k)
        assert sum(int(m.sum()) for m in small) == k
