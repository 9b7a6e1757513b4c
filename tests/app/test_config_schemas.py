"""The Hydra schemas of the callbacks are made from their signatures: a key and its default cannot drift from the
argument (issue: the ``*Conf`` dataclasses repeated every argument by hand)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import pytest
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ValidationError

from pat_callbacks.app.config import SCHEMAS, check_against_schema, conf_type, schema_from_signature
from pat_callbacks.core.windows import WindowArguments


def _arguments(cls: type) -> dict[str, Any]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    arguments = {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        arguments.update(dict.fromkeys(WindowArguments.__annotations__))
    return arguments


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_every_schema_has_each_argument_of_its_callback_with_its_default(key):
    schema = SCHEMAS[key]
    target = OmegaConf.structured(schema)._target_
    import pat_callbacks

    callback = getattr(pat_callbacks, target.rsplit(".", 1)[1])
    arguments = _arguments(callback)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert set(fields) - {"_target_"} == set(arguments) - set(schema.left_out)
    for name, default in arguments.items():
        if name in schema.left_out or name in schema.differs:
            continue
        field = fields[name]
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert value == (list(default) if isinstance(default, tuple) else default), name
    for name, (kind, default, why) in schema.differs.items():
        assert (fields[name].type, fields[name].default) == (kind, default) and why


def test_the_generated_types_are_those_the_hand_written_schemas_had():
    def types(key: str) -> dict[str, str]:
        return {f.name: repr(f.type) for f in dataclasses.fields(SCHEMAS[key])}

    gradual, dst, distill = types("pruning/gradual"), types("pruning/dynamic"), types("recovery/distillation")
    assert (gradual["sparsity"], gradual["start_step"]) == ("typing.Optional[float]", "typing.Optional[int]")
    assert (gradual["end_epoch"], gradual["include"]) == ("typing.Optional[float]", "typing.Optional[typing.List[str]]")
    assert (gradual["criterion"], gradual["remask_weights"]) == ("<class 'str'>", "typing.Any")
    assert gradual["layer_sparsity"] == "typing.Any"
    assert (dst["sparsity"], dst["end_step"]) == ("<class 'float'>", "typing.Optional[int]")
    assert dst["update_every"] == "<class 'int'>"
    assert (distill["teacher_step"], distill["teacher_dtype"]) == ("typing.Any", "typing.Optional[str]")
    with pytest.raises(ValidationError, match="full_key: start_step"):
        OmegaConf.structured(SCHEMAS["pruning/structured"]).start_step = "abc"


def test_a_new_or_renamed_argument_flows_into_the_schema_and_a_stale_declaration_fails():
    class Callback:
        def __init__(self, sparsity: float = 0.5, *, end_step: int | None = None, names: Sequence[str] = ()): ...

    Conf = schema_from_signature("Conf", Callback, "Schema.")
    cfg = OmegaConf.structured(Conf)
    assert (cfg.sparsity, cfg.end_step, list(cfg.names)) == (0.5, None, [])
    with pytest.raises(TypeError, match=r"\['stop_step'\] are not arguments of Callback"):
        schema_from_signature("Conf", Callback, "Schema.", left_out={"stop_step": "renamed"})
    node = OmegaConf.structured(Conf)
    with open_dict(node):
        node.end_stp = 3
    with pytest.raises(ValueError, match="did you mean `end_step`"):
        check_against_schema(node)


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ("float", "<class 'float'>"),
        ("int | None", "typing.Optional[int]"),
        ("str | Schedule | Callable[[int], float]", "<class 'str'>"),
        ("str | torch.dtype | None", "typing.Optional[str]"),
        ("str | Sequence[str] | None", "typing.Optional[typing.List[str]]"),
        ("Mapping[str, float] | None", "typing.Any"),
        ("int | Literal['pruning_start']", "typing.Any"),
        ("bool | Literal['auto']", "typing.Any"),
    ],
)
def test_conf_type(annotation, expected):
    assert repr(conf_type(annotation)) == expected


def test_structured_configs_take_the_odd_even_phase_like_gradual_ones():
    cfg = OmegaConf.merge(OmegaConf.structured(SCHEMAS["pruning/structured"]), {"phase_steps": 10})
    assert cfg.phase_steps == 10  # StructuredPruning takes every window argument; its old schema missed these


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_configs_of_generated_schemas_pickle_for_multirun_launchers(key):
    import pickle

    config = OmegaConf.structured(SCHEMAS[key])
    assert OmegaConf.get_type(pickle.loads(pickle.dumps(config))) is SCHEMAS[key]  # joblib, submitit
