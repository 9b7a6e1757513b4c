"""Compressed sparse checkpoints: exact round trips, size targets, and the CLI on a real pruned checkpoint."""

from __future__ import annotations

import pytest
import torch

from pat_callbacks import GradualPruning
from pat_callbacks.export import compress_state_dict, decompress_state_dict, load_sparse, main, save_sparse


def _sparse(shape, sparsity, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator).to(dtype)
    return values * (torch.rand(shape, generator=generator) >= sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 1.0])
@pytest.mark.parametrize("shape", [(300, 200), (16, 8, 3, 3), (1000,), (1, 5)])
def test_round_trip_is_exact(shape, sparsity):
    state = {
        "w": _sparse(shape, sparsity),
        "steps": torch.tensor(7),
        "half": _sparse(shape, sparsity, dtype=torch.bfloat16),
    }
    restored = decompress_state_dict(compress_state_dict(state, min_sparsity=0.0))
    assert restored.keys() == state.keys()
    for key in state:
        assert restored[key].dtype == state[key].dtype and torch.equal(restored[key], state[key]), key


def test_csr_is_chosen_when_it_is_smaller():
    very_sparse = torch.zeros(50, 4000)
    very_sparse[3, 17] = 1.0
    assert compress_state_dict({"w": very_sparse})["tensors"]["w"]["format"] == "csr"
    assert compress_state_dict({"w": _sparse((100, 100), 0.7)})["tensors"]["w"]["format"] == "bitmask"


@pytest.mark.parametrize("keep_zero_signs", [False, True])
@pytest.mark.parametrize(("sparsity", "limit"), [(0.5, 0.6), (0.8, 0.25), (0.9, 0.15), (0.95, 0.1), (0.98, 0.06)])
def test_file_size_against_dense(tmp_path, sparsity, limit, keep_zero_signs):
    # _sparse's zeros are half -0.0 (negative weights times a 0 mask): bit-exact signs cost one bit per zero
    report = save_sparse({"w": _sparse((512, 512), sparsity)}, tmp_path / "w.pt", keep_zero_signs=keep_zero_signs)
    assert report.ratio <= limit + (sparsity / 32 if keep_zero_signs else 0.0), report


def test_pat_export_cli_on_a_pruned_lightning_checkpoint(tmp_path, fit, capsys):
    pruning = GradualPruning(final_sparsity=0.9, start_step=0, end_step=20, update_every=10)
    trainer, module = fit([pruning], max_steps=25)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    main([str(tmp_path / "pruned.ckpt"), str(tmp_path / "pruned.sparse.pt")])
    assert "of the dense" in capsys.readouterr().out
    restored = load_sparse(tmp_path / "pruned.sparse.pt")
    assert all(torch.equal(restored[k], v) for k, v in module.state_dict().items())
    fresh = type(module)(type(module.net)(64, (32, 32), 10))
    fresh.load_state_dict(restored)
    assert float((fresh.net.layers[0].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)


def test_not_a_sparse_checkpoint_is_refused():
    with pytest.raises(ValueError, match="Not a pat-callbacks sparse checkpoint"):
        decompress_state_dict({"w": torch.ones(1)})


def test_sparse_inference_matches_the_dense_model_and_replaces_only_sparse_layers():
    from torch import nn

    from pat_callbacks.export import SparseLinear, to_sparse_inference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 5))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 32) > 0.9)
        model[2][0].weight.mul_(torch.rand(64, 64) > 0.8)
        model[3].weight.mul_(torch.rand(5, 64) > 0.5)  # 50%: below the crossover, stays dense
    x = torch.randn(7, 3, 32)
    expected = model(x)
    to_sparse_inference(model.eval())
    assert isinstance(model[0], SparseLinear) and isinstance(model[2][0], SparseLinear)
    assert isinstance(model[3], nn.Linear)
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal path of a machine without CUDA")
def test_semi_structured_export_refuses_clearly_without_cuda():
    from torch import nn

    from pat_callbacks.export import to_semi_structured

    with pytest.raises(RuntimeError, match=r"needs CUDA with compute capability >= 8\.0; found no CUDA device"):
        to_semi_structured(nn.Linear(8, 8))


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "is not a readable checkpoint"), (b"garbage" * 10, "is not a readable checkpoint"), (None, "no such file")],
)
def test_pat_export_names_a_bad_file_in_one_line(tmp_path, capsys, content, reason):
    from pat_callbacks.export import main

    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as excinfo:
        main([str(path), str(tmp_path / "out.pt")])
    assert excinfo.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pat-export: error: {path}") and reason in err and len(err.splitlines()) == 1


def test_pat_export_reads_a_truncated_checkpoint_as_an_error(tmp_path, capsys):
    from pat_callbacks.export import main

    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path / "cut.ckpt"), str(tmp_path / "out.pt")])
    assert excinfo.value.code == 1 and "cut.ckpt is not a readable checkpoint" in capsys.readouterr().err
