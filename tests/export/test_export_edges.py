"""pat-export / load_sparse on files that are not what they expect (issue #24): crafted, truncated, code-carrying
or nested checkpoints and a missing output folder are one-line errors naming the path (exit 1); -0.0 survives."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from pat_callbacks.export import compress_state_dict, decompress_state_dict, load_sparse, main, save_sparse


def _weights(shape=(64, 48), sparsity=0.9, seed=0) -> torch.Tensor:
    """A pruned weight as training leaves it: a negative weight times a 0 mask is -0.0."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    return weight.mul_(torch.rand(shape, generator=generator) >= sparsity)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.dtype == torch.float32 else torch.int16)


def _exit_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pat-export: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (2, 3000), (500,)])  # bitmask, csr (very sparse rows), 1-D
def test_round_trip_keeps_negative_zeros_bit_exactly(tmp_path, shape, dtype):
    weight = _weights(shape, 0.97 if shape == (2, 3000) else 0.9).to(dtype)
    assert torch.signbit(weight[weight == 0]).any()  # the case under test exists
    save_sparse({"w": weight}, tmp_path / "w.pt")
    restored = load_sparse(tmp_path / "w.pt")["w"]
    assert torch.equal(_bits(restored), _bits(weight))


def test_dropping_zero_signs_gives_plus_zeros_and_a_smaller_file(tmp_path):
    weight = _weights((512, 512), 0.9)
    exact = save_sparse({"w": weight}, tmp_path / "exact.pt")
    plain = save_sparse({"w": weight}, tmp_path / "plain.pt", keep_zero_signs=False)
    restored = load_sparse(tmp_path / "plain.pt")["w"]
    assert torch.equal(restored, weight) and not torch.signbit(restored[restored == 0]).any()
    assert plain.sparse_bytes < exact.sparse_bytes <= plain.sparse_bytes + 0.9 * weight.numel() / 8 + 1024
    # a tensor without any -0.0 pays nothing for the option
    positive = weight.abs()
    assert "neg_zeros" not in compress_state_dict({"w": positive})["tensors"]["w"]


def _valid() -> dict:
    sd = {"w": _weights((32, 32), 0.9), "c": _weights((4, 3000), 0.99), "b": torch.ones(4)}
    sd["tied"] = sd["w"]
    compressed = compress_state_dict(sd)
    assert [compressed["tensors"][k]["format"] for k in sd] == ["bitmask", "csr", "dense", "alias"]
    return compressed


def _mutate(path: tuple, value) -> dict:
    compressed = copy.deepcopy(_valid())
    node = compressed
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return compressed


_DELETE = object()
CRAFTED = {
    "unknown format": (("tensors", "w", "format"), "zip", "unknown format 'zip'"),
    "dtype not a dtype": (("tensors", "w", "dtype"), "Tensor", "dtype 'Tensor' is not one of"),
    "negative shape": (("tensors", "w", "shape"), [-1, 32], "shape [-1, 32]"),
    "shape too large for its bits": (("tensors", "w", "shape"), [64, 32], "bitmask bytes for 2048 entries"),
    "bits missing": (("tensors", "w", "bits"), _DELETE, "field 'bits' is not a dense tensor"),
    "values short": (("tensors", "w", "values"), lambda v: v[:-1], "values for"),
    "values of another dtype": (("tensors", "w", "values"), lambda v: v.double(), "expected torch.float32"),
    "zero signs short": (("tensors", "w", "neg_zeros"), lambda v: v[:-1], "zero-sign bytes"),
    "column past the row": (("tensors", "c", "cols"), lambda v: v + 3000, "column indices do not fit"),
    "row pointers decreasing": (("tensors", "c", "crow"), lambda v: v.flip(0), "row pointers are not"),
    "alias of nothing": (("tensors", "tied", "of"), "nope", "alias of 'nope'"),
    "dense of another size": (("tensors", "b", "values"), torch.ones(5), "holds 5 values for 4 stored positions"),
    "entry not a mapping": (("tensors", "b"), [1, 2], "entry is a list"),
    "tensors not a mapping": (("tensors",), "x", "'tensors' is a str"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_sparse_file_is_a_one_line_error_naming_it(tmp_path, case):
    where, value, expected = CRAFTED[case]
    path = tmp_path / "crafted.pt"
    torch.save(_mutate(where, value), path)
    with pytest.raises(ValueError) as excinfo:
        load_sparse(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


def test_the_valid_file_of_the_crafted_cases_loads(tmp_path):
    restored = decompress_state_dict(_valid())
    assert restored["tied"] is restored["w"] and restored["b"].tolist() == [1.0] * 4


@pytest.mark.parametrize("cut", [0, 0.5, 0.9])
def test_a_truncated_sparse_file_is_a_one_line_error_naming_it(tmp_path, cut):
    save_sparse({"w": _weights()}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable checkpoint \(") as excinfo:
        load_sparse(tmp_path / "cut.pt")
    assert "\n" not in str(excinfo.value)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_code_carrying_checkpoint_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": _Payload(marker)}, tmp_path / "evil.ckpt")
    err = _exit_line([str(tmp_path / "evil.ckpt"), str(tmp_path / "out.pt")], capsys)
    assert f"{tmp_path / 'evil.ckpt'} holds Python objects" in err and "weights_only=True" in err
    with pytest.raises(ValueError, match="holds Python objects"):
        load_sparse(tmp_path / "evil.ckpt")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_output_folder_missing_is_a_one_line_error_naming_it(tmp_path, capsys):
    torch.save({"w": _weights()}, tmp_path / "sd.pt")
    out = tmp_path / "no" / "such" / "out.pt"
    err = _exit_line([str(tmp_path / "sd.pt"), str(out)], capsys)
    assert err == f"pat-export: error: the folder of OUT {out} does not exist: {out.parent}"
    err = _exit_line([str(tmp_path / "sd.pt"), str(tmp_path)], capsys)
    assert err.startswith(f"pat-export: error: OUT {tmp_path} is a folder")


def test_a_nested_state_dict_asks_for_key_and_key_exports_it(tmp_path, capsys):
    weights = {"fc.weight": _weights(), "fc.bias": torch.zeros(64)}
    torch.save({"model": weights, "ema": {"model": weights}, "epoch": 3}, tmp_path / "run.pt")
    err = _exit_line([str(tmp_path / "run.pt"), str(tmp_path / "out.pt")], capsys)
    assert err.endswith("pick one with --key: 'model'"), err
    main([str(tmp_path / "run.pt"), str(tmp_path / "out.pt"), "--key", "ema.model"])
    assert "of the dense" in capsys.readouterr().out
    restored = load_sparse(tmp_path / "out.pt")
    assert all(torch.equal(_bits(restored[k]), _bits(v)) for k, v in weights.items())
    err = _exit_line([str(tmp_path / "run.pt"), str(tmp_path / "out2.pt"), "--key", "ema.modle"], capsys)
    assert "has no key 'ema.modle'" in err and "'model'" in err


def test_a_folder_or_a_sparse_file_as_input_is_named(tmp_path, capsys):
    assert "is a folder, not a checkpoint file" in _exit_line([str(tmp_path), str(tmp_path / "o.pt")], capsys)
    save_sparse({"w": _weights()}, tmp_path / "s.pt")
    err = _exit_line([str(tmp_path / "s.pt"), str(tmp_path / "o.pt")], capsys)
    assert "is already a pat-callbacks sparse checkpoint" in err


def test_min_sparsity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"`min_sparsity` to be a float in \[0, 1\], but got 1.5"):
        compress_state_dict({"w": torch.zeros(2)}, min_sparsity=1.5)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    torch.save({"w": _weights()}, tmp_path / "sd.pt")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = _exit_line([str(tmp_path / "sd.pt"), str(locked / "o.pt")], capsys)
    assert err.startswith(f"pat-export: error: cannot write {locked / 'o.pt'}")
