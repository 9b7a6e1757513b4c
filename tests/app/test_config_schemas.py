"""The Hydra schemas of the callbacks are checked against their signatures, so a key, its type or its default
cannot drift from the argument it configures (issue: the ``*Conf`` dataclasses repeated every argument by hand)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from pat_callbacks.app.config import SCHEMAS, conf_type
from pat_callbacks.app.drift import schema_drift


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_every_schema_is_in_step_with_its_callbacks_signature(key):
    schema = SCHEMAS[key]
    assert schema_drift(schema, get_class(schema._target_)) == []
    assert all(why for why in {**getattr(schema, "left_out", {}), **getattr(schema, "differs", {})}.values())


class _Callback:
    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        end_step: int | None = None,
        names: str | list[str] | None = None,
        loss_fn: Any = None,
        **window: Any,
    ): ...


def test_drift_names_each_argument_field_type_default_and_stale_declaration():
    Conf = dataclasses.make_dataclass(
        "Conf",
        [
            ("_target_", str, dataclasses.field(default="_Callback")),
            ("sparsity", int, dataclasses.field(default=0)),
            ("start_step", conf_type("int | None"), dataclasses.field(default=None)),
        ],
        namespace={"left_out": {"loss_fn": "a callable", "names": "Python only", "stop_step": "renamed"}},
    )

    drift = schema_drift(Conf, _Callback)
    assert "sparsity: default 0, but the argument's is 0.5" in drift
    assert any(line.startswith("sparsity: type <class 'int'>") for line in drift)
    assert "end_step: an argument of _Callback missing from Conf" in drift
    assert "stop_step: declared by Conf but no argument of _Callback" in drift
    assert not any(line.startswith(("loss_fn", "start_step")) for line in drift)  # left out; a window argument
    assert "end_fraction: an argument of _Callback missing from Conf" in drift  # **window: every window argument


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
        (float, "<class 'float'>"),
    ],
)
def test_conf_type(annotation, expected):
    assert repr(conf_type(annotation)) == expected


def test_structured_configs_take_the_odd_even_phase_like_gradual_ones():
    cfg = OmegaConf.merge(OmegaConf.structured(SCHEMAS["pruning/structured"]), {"phase_steps": 10})
    assert cfg.phase_steps == 10  # StructuredPruning takes every window argument; its schema missed these two


def test_the_schemas_module_does_not_import_lightning():
    # The search-path plugin imports it in every Hydra app of the environment (Lightning: ~10 s more to start).
    code = "import sys, pat_callbacks.app.config; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"
