"""The peer adapters used by bench/accuracy.py do what the benchmark table claims."""

from __future__ import annotations

import sys

import pytest

from bench.peers import ModelPruningToSparsity, _stub_torchvision


@pytest.mark.parametrize("final", [0.5, 0.9, 0.98])
def test_model_pruning_amounts_compound_to_the_cubic_target(final):
    callback = ModelPruningToSparsity(final_sparsity=final, start_epoch=15, end_epoch=105)
    remaining = 1.0
    for epoch in range(150):
        remaining *= 1.0 - callback._amount(epoch)
        assert 1.0 - remaining == pytest.approx(callback.ramp(epoch), abs=1e-9)
    assert 1.0 - remaining == pytest.approx(final)


def test_rigl_torch_imports_with_the_torchvision_stub(monkeypatch):
    if "torchvision" in sys.modules:
        pytest.skip("a real torchvision is installed")
    _stub_torchvision()
    from rigl_torch.RigL import RigLScheduler

    assert callable(RigLScheduler)
    for name in ("torchvision", "torchvision.models", "torchvision.models.resnet"):
        monkeypatch.delitem(sys.modules, name)
