"""One checkpoint format for sparse and sparse + quantized files: version-1 files of both writers still load bit for
bit, quantization is a per-tensor field, and every field of a quantized entry is checked like the others."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from pat_callbacks.export import (
    FORMAT_NAME,
    FORMAT_VERSION,
    compress_state_dict,
    decompress_state_dict,
    load_quantized,
    load_sparse,
    main,
    quantize_state_dict,
    save_quantized,
    save_sparse,
)
from pat_callbacks.recovery.quantization import QuantSpec, fake_quantize

FIXTURES = Path(__file__).parent / "fixtures"
V1_FILES = ["v1_sparse", "v1_int8", "v1_int4_g16", "v1_int8_dense"]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so -0.0 and +0.0 differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


@pytest.mark.parametrize("name", V1_FILES)
def test_version_1_files_of_both_writers_load_bit_for_bit(name):
    expected = torch.load(FIXTURES / "v1_expected.pt", weights_only=True)["sparse" if name == "v1_sparse" else name]
    for loader in (load_sparse, load_quantized):
        restored = loader(FIXTURES / f"{name}.pt")
        assert list(restored) == list(expected)
        assert all(_same_bits(restored[k], v) for k, v in expected.items()), name
    if name == "v1_sparse":
        assert restored["tied"] is restored["1.weight"] and torch.signbit(restored["very_sparse"][0, 0])


def test_the_fixture_is_what_a_version_2_file_of_the_same_model_loads_as(tmp_path):
    from tests.export.fixtures.write_v1 import model

    net = model()
    expected = torch.load(FIXTURES / "v1_expected.pt", weights_only=True)
    for name, spec, sparse in [
        ("v1_int8", "int8", True),
        ("v1_int4_g16", "int4:g16", True),
        ("v1_int8_dense", "int8", False),
    ]:
        save_quantized(net, tmp_path / "now.pt", spec, sparse=sparse)
        restored = load_quantized(tmp_path / "now.pt")
        assert all(_same_bits(restored[k], v) for k, v in expected[name].items()), name


@pytest.mark.parametrize("name", V1_FILES)
def test_pat_export_refuses_a_version_1_file_as_already_exported(tmp_path, capsys, name):
    with pytest.raises(SystemExit):
        main([str(FIXTURES / f"{name}.pt"), str(tmp_path / "out.pt")])
    assert "is already a pat-callbacks sparse checkpoint" in capsys.readouterr().err


def test_one_header_and_quantization_a_field_of_each_entry():
    torch.manual_seed(0)
    state = {"a": torch.randn(8, 32) * (torch.rand(8, 32) > 0.8), "b": torch.randn(8, 32), "c": torch.randn(8)}
    compressed = compress_state_dict(state, quant={"a": "int4:g16", "b": QuantSpec(8)})
    assert {k: v for k, v in compressed.items() if k != "tensors"} == {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    entries = compressed["tensors"]
    assert (entries["a"]["quant"], entries["b"]["quant"], "quant" in entries["c"]) == ("int4:g16", "int8", False)
    assert entries["a"]["format"] == "bitmask" and entries["b"]["format"] == "dense"  # the smaller encoding
    restored = decompress_state_dict(compressed)
    assert torch.equal(restored["a"], fake_quantize(state["a"], QuantSpec(4, 16)))
    assert torch.equal(restored["b"], fake_quantize(state["b"], QuantSpec(8))) and torch.equal(
        restored["c"], state["c"]
    )
    with pytest.raises(ValueError, match=r"not in the state dict: \['d'\]"):
        compress_state_dict(state, quant={"d": "int8"})


def test_one_tie_rule_for_both_writers():
    net = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 10, bias=False))
    net[2].weight = net[0].weight
    for compressed in (compress_state_dict(net.state_dict()), quantize_state_dict(net, "int8")):
        assert compressed["tensors"]["2.weight"] == {"format": "alias", "of": "0.weight"}


def _quantized_file() -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(8, 32) > 0.75)
    return quantize_state_dict(layer, "int4:g16")


_DELETE = object()
CRAFTED_QUANTIZED = {
    "quant not a spec": ("quant", "int3", "field 'quant': Expected a quantization like"),
    "scales of another shape": ("scales", lambda v: v[:, :1], "field 'scales' has shape (8, 1), expected (8, 2)"),
    "scales not bf16": ("scales", lambda v: v.float(), "field 'scales' has dtype torch.float32"),
    "scales missing": ("scales", _DELETE, "field 'scales' is not a dense tensor"),
    "transposed not a bool": ("transposed", "yes", "field 'transposed' is 'yes'"),
    "int4 values short": ("values", lambda v: v[:-1], "bytes of int4:g16 values for"),
    "int4 code -8": ("values", lambda v: v & 0xF0, "holds codes outside [-7, 7]"),
    "group does not divide": ("quant", "int4:g24", "does not divide the 32 inputs"),
    "values not codes": ("values", lambda v: v.float(), "field 'values' has dtype torch.float32, expected torch.uint8"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_QUANTIZED))
def test_a_crafted_quantized_entry_is_a_one_line_error_naming_the_file_and_field(tmp_path, case):
    key, value, expected = CRAFTED_QUANTIZED[case]
    packed = copy.deepcopy(_quantized_file())
    entry = packed["tensors"]["weight"]
    assert entry["format"] == "bitmask"
    if value is _DELETE:
        del entry[key]
    else:
        entry[key] = value(entry[key]) if callable(value) else value
    torch.save(packed, tmp_path / "crafted.pt")
    with pytest.raises(ValueError) as excinfo:
        load_quantized(tmp_path / "crafted.pt")
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path / 'crafted.pt'}: tensor 'weight': ") and expected in message, message
    assert "\n" not in message


def test_a_quantized_vector_is_refused_on_load():
    packed = compress_state_dict({"b": torch.ones(4)})
    packed["tensors"]["b"].update(quant="int8", transposed=False, scales=torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="is quantized \\(int8\\) but is not a floating weight of 2\\+ dimensions"):
        decompress_state_dict(packed)


def test_crafted_version_1_files_are_checked_as_before(tmp_path):
    sparse = torch.load(FIXTURES / "v1_sparse.pt", weights_only=True)
    sparse["tensors"]["1.bias"]["tensor"] = torch.ones(5)
    torch.save(sparse, tmp_path / "sparse.pt")
    with pytest.raises(
        ValueError, match=r"sparse\.pt: tensor '1\.bias': dense tensor of shape \(5,\), expected \(32,\)"
    ):
        load_sparse(tmp_path / "sparse.pt")
    quantized = torch.load(FIXTURES / "v1_int8.pt", weights_only=True)
    quantized["spec"] = "int5"
    torch.save(quantized, tmp_path / "quantized.pt")
    with pytest.raises(ValueError, match=r"quantized\.pt: field 'spec': Expected a quantization like"):
        load_quantized(tmp_path / "quantized.pt")
    quantized["spec"] = "int8"
    quantized["tensors"]["1.weight"]["q"] = quantized["tensors"]["1.weight"]["q"][:-1]
    torch.save(quantized, tmp_path / "quantized.pt")
    with pytest.raises(ValueError, match=r"tensor '1\.weight': holds \d+ bytes of int8 values for \d+ stored"):
        load_quantized(tmp_path / "quantized.pt")


def test_an_unknown_header_names_what_it_found(tmp_path):
    save_sparse({"w": torch.zeros(4)}, tmp_path / "w.pt")
    future = torch.load(tmp_path / "w.pt", weights_only=True)
    future["version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=r"Not a pat-callbacks sparse checkpoint \(header \{'format': 'pat-callbacks', "
                       r"'version': 3\}"):  # fmt: skip
        decompress_state_dict(future)
