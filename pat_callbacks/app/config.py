"""Hydra structured-config schemas for the pruning configs in ``conf/pruning/`` and the trainer configs.

Registered in Hydra's ConfigStore under ``schema/pruning/{gradual,dynamic,structured,oneshot}`` and
``schema/trainer/lightning``; each YAML of ``conf/pruning/`` and ``conf/trainer/`` starts from one
(``defaults: [/schema/pruning/gradual@_here_, _self_]``), so a misspelled key or a value of the wrong type
(``trainer.max_steps=abc``) fails when the config is composed, naming the key, before anything is built. Range
checks (a sparsity of 1.5, an end before the start) are the callbacks' own and run when the config is
instantiated, still before training. The recovery configs (``conf/recovery/``: distillation, QAT) start from
``schema/recovery/{distillation,quantization}`` the same way; they are packaged under ``callbacks.*``, so
``run_training`` builds them with the other callbacks.

The callbacks' schemas are made from their ``__init__`` signatures (:func:`schema_from_signature`), so a key and
its default cannot drift from the argument they configure; what a schema leaves out, or types differently, is
declared next to it with the reason.

Example:
    >>> from omegaconf import OmegaConf
    >>> schema = OmegaConf.structured(GradualPruningConf)
    >>> schema.sparsity = "abc"
    Traceback (most recent call last):
    ...
    omegaconf.errors.ValidationError: Value 'abc' of type 'str' could not be converted to Float
        full_key: sparsity
        object_type=GradualPruningConf
"""

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore

from pat_callbacks.callbacks import (
    Distillation,
    DynamicSparseTraining,
    GradualPruning,
    OneShotPruning,
    QuantizationAwareTraining,
    StructuredPruning,
)
from pat_callbacks.core.windows import WindowArguments

__all__ = [
    "SCHEMAS",
    "DistillationConf",
    "DynamicSparseTrainingConf",
    "GradualPruningConf",
    "OneShotPruningConf",
    "QuantizationConf",
    "StructuredPruningConf",
    "TrainerConf",
    "check_against_schema",
    "check_trainer_keys",
    "conf_type",
    "promote_swept_group_keys",
    "register_configs",
    "schema_from_signature",
]

# OmegaConf 2.3 reads the fields' types at runtime and knows typing.Optional/List/Any and plain bool/int/float/str,
# not `X | None`, nor the callbacks' own classes: conf_type maps each argument's annotation onto those.
_PLAIN = {"bool": bool, "int": int, "float": float, "str": str}


def _union_parts(annotation: str) -> list[str]:
    """The top-level members of a ``X | Y`` annotation string (brackets kept whole)."""
    parts, depth, current = [], 0, ""
    for char in annotation:
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def conf_type(annotation: str) -> Any:
    """The type a config field gets for an argument annotated ``annotation``: its one plain type (bool, int, float,
    str; a ``str | Sequence[str]`` is a list of strings), ``Optional`` when ``None`` is allowed; ``Any`` when the
    argument takes several plain types or a literal (the callback checks the value when instantiated).

    Example:
        >>> conf_type("str | Criterion | None")  # a name in a config, a Criterion object from Python
        typing.Optional[str]
        >>> conf_type("str | Sequence[str] | None"), conf_type("bool | Literal['auto']")
        (typing.Optional[typing.List[str]], typing.Any)
    """
    parts = _union_parts(annotation)
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    if any(part.startswith("Literal[") for part in parts):
        return Any
    if "Sequence[str]" in parts and set(parts) <= {"str", "Sequence[str]"}:
        base: Any = List[str]
    else:
        plain = [_PLAIN[part] for part in parts if part in _PLAIN]
        base = plain[0] if len(plain) == 1 else Any
    return Optional[base] if optional and base is not Any else base


def _annotation_text(annotation: Any) -> str:
    """An annotation as written: a string under ``from __future__ import annotations`` (a ``ForwardRef`` in a
    ``TypedDict``), else the class's name."""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__forward_arg__", None) or getattr(annotation, "__name__", "Any")


def schema_from_signature(
    name: str,
    target: type,
    doc: str,
    *,
    left_out: dict[str, str] | None = None,
    differs: dict[str, tuple[Any, Any, str]] | None = None,
) -> type:
    """A structured-config dataclass with one field per argument of ``target.__init__`` (the window arguments of
    ``**window`` included), typed by :func:`conf_type`, with the argument's default, after ``_target_``.

    Args:
        name: the dataclass's name (``GradualPruningConf``).
        target: the callback class; ``_target_`` is ``pat_callbacks.<its name>``.
        doc: the dataclass's docstring.
        left_out: ``{argument: why}`` for arguments a config cannot give (a callable, a module) or gives under
            another key; each must be an argument of ``target``.
        differs: ``{argument: (type, default, why)}`` where the config's field is deliberately not the argument's
            own; each must be an argument of ``target``.

    Example:
        >>> class Callback:
        ...     def __init__(self, sparsity: float = 0.5, *, include: "str | Sequence[str] | None" = None): ...
        >>> Conf = schema_from_signature("Conf", Callback, "Schema of Callback.")
        >>> [(f.name, f.type, f.default) for f in dataclasses.fields(Conf)][1:]
        [('sparsity', <class 'float'>, 0.5), ('include', typing.Optional[typing.List[str]], None)]
    """
    left_out, differs = left_out or {}, differs or {}
    arguments = {
        param.name: (param.annotation, param.default)
        for param in list(inspect.signature(target.__init__).parameters.values())[1:]
        if param.kind is not param.VAR_KEYWORD
    }
    if any(param.kind is param.VAR_KEYWORD for param in inspect.signature(target.__init__).parameters.values()):
        arguments.update({key: (annotation, None) for key, annotation in WindowArguments.__annotations__.items()})
    stale = sorted((set(left_out) | set(differs)) - set(arguments))
    if stale:
        raise TypeError(f"{name}: {stale} are not arguments of {target.__name__} (renamed or removed?)")
    specs: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default=f"pat_callbacks.{target.__name__}"))
    ]
    for key, (annotation, default) in arguments.items():
        if key in left_out:
            continue
        if key in differs:
            kind, default = differs[key][:2]
        else:
            kind = conf_type(_annotation_text(annotation))
        if isinstance(default, (list, tuple, dict)):
            value = dataclasses.field(default_factory=type(default) if isinstance(default, dict) else list)
        else:
            value = dataclasses.field(default=default)
        specs.append((key, kind, value))
    schema = dataclasses.make_dataclass(name, specs, namespace={"__doc__": doc})
    schema.__module__ = __name__  # for doctests, pickling (multirun launchers) and messages
    schema.left_out, schema.differs = left_out, differs
    return schema


_TARGET = "the target is `sparsity` in every pruning config (`final_sparsity` is refused with that hint)"
_PYTHON_ONLY = "a callable or an object: Python only"

GradualPruningConf = schema_from_signature(
    "GradualPruningConf",
    GradualPruning,
    """Schema of :class:`pat_callbacks.GradualPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(GradualPruningConf).schedule
        'cubic'""",
    left_out={"final_sparsity": _TARGET, "loss_fn": _PYTHON_ONLY},
    differs={
        "criterion": (
            str,
            "taylor",
            "spelled out, so a config's run with manual optimization is refused with the reason rather than "
            "falling back to magnitude as the unset Python default does",
        )
    },
)

DynamicSparseTrainingConf = schema_from_signature(
    "DynamicSparseTrainingConf",
    DynamicSparseTraining,
    """Schema of :class:`pat_callbacks.DynamicSparseTraining` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DynamicSparseTrainingConf).method
        'rigl'""",
)

StructuredPruningConf = schema_from_signature(
    "StructuredPruningConf",
    StructuredPruning,
    """Schema of :class:`pat_callbacks.StructuredPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(StructuredPruningConf).criterion is None  # the callback's default: l2
        True
    """,
    left_out={"final_sparsity": _TARGET, "example_inputs": _PYTHON_ONLY},
    differs={
        "heads": (str, "auto", "a Literal alias: a name in a config"),
        "attention": (Optional[List[Any]], None, "a list of layout mappings"),
    },
)

OneShotPruningConf = schema_from_signature(
    "OneShotPruningConf",
    OneShotPruning,
    """Schema of :class:`pat_callbacks.OneShotPruning` configs (``conf/pruning/wanda.yaml``, ``sparsegpt.yaml``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(OneShotPruningConf).method
        'wanda'
    """,
    left_out={"forward": _PYTHON_ONLY},
    differs={"sparsity": (Optional[float], 0.5, "a config states its target (the Python default: N:M's, else none)")},
)

DistillationConf = schema_from_signature(
    "DistillationConf",
    Distillation,
    """Schema of :class:`pat_callbacks.Distillation` configs (``conf/recovery/distill.yaml``, at
    ``callbacks.distill``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DistillationConf).temperature
        2.0""",
    left_out={"teacher": "a module: Python only (a config distils from a copy of the model)"},
)

QuantizationConf = schema_from_signature(
    "QuantizationConf",
    QuantizationAwareTraining,
    """Schema of :class:`pat_callbacks.QuantizationAwareTraining` configs (``conf/recovery/qat_*.yaml``, at
    ``callbacks.qat``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(QuantizationConf).bits
        8""",
)

# Each callback's schema, by its ConfigStore name (``schema/<group>/<name>``).
SCHEMAS: dict[str, type] = {
    "pruning/gradual": GradualPruningConf,
    "pruning/dynamic": DynamicSparseTrainingConf,
    "pruning/structured": StructuredPruningConf,
    "pruning/oneshot": OneShotPruningConf,
    "recovery/distillation": DistillationConf,
    "recovery/quantization": QuantizationConf,
}


@dataclass
class TrainerConf:
    """Schema of the ``trainer`` group: the ``lightning.pytorch.Trainer`` arguments the shipped configs set, typed.

    Other Trainer arguments are added with ``+trainer.NAME=VALUE`` (checked against the Trainer's signature by
    :func:`check_trainer_keys`); ``callbacks``, ``logger`` and ``default_root_dir`` come from ``train.py``.

    Example:
        >>> from omegaconf import OmegaConf
        >>> schema = OmegaConf.structured(TrainerConf)
        >>> schema.max_steps = "abc"
        Traceback (most recent call last):
        ...
        omegaconf.errors.ValidationError: Value 'abc' of type 'str' could not be converted to Integer
            full_key: max_steps
            object_type=TrainerConf
    """

    _target_: str = "lightning.pytorch.Trainer"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    accelerator: str = "auto"
    devices: Any = "auto"  # an int, a list of ids or a string ("auto", "0,1")
    precision: Optional[str] = None  # "32-true", "bf16-mixed", "16-mixed", ...
    log_every_n_steps: Optional[int] = None
    enable_model_summary: Optional[bool] = None
    enable_progress_bar: Optional[bool] = None
    deterministic: Any = None  # true, false or "warn"
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1


# Trainer arguments train.py passes itself: a `+trainer.logger=...` would be silently overridden.
_SET_BY_TRAIN_PY = {
    "callbacks": "the `callbacks` key",
    "logger": "the `logger` group",
    "default_root_dir": "hydra.run.dir",
}


def check_trainer_keys(node: Any, key: str = "trainer") -> None:
    """Refuse ``trainer`` keys that are not arguments of ``lightning.pytorch.Trainer`` (added with ``+``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> check_trainer_keys(OmegaConf.create({"max_steps": 5, "limit_val_batches": 1}))
        >>> check_trainer_keys(OmegaConf.create({"max_step": 5}))
        Traceback (most recent call last):
        ...
        ValueError: Unknown key `trainer.max_step` (added with +?): not an argument of lightning.pytorch.Trainer; \
did you mean `max_steps`?
    """
    from lightning.pytorch import Trainer

    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for name in node:
        if name in _SET_BY_TRAIN_PY:
            raise ValueError(f"`{key}.{name}` is set by train.py: use {_SET_BY_TRAIN_PY[name]} instead")
        if name not in known and name not in ("_target_", "defaults"):
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"Unknown key `{key}.{name}` (added with +?): not an argument of lightning.pytorch.Trainer{hint}"
            )


def promote_swept_group_keys(overrides: Sequence[str]) -> list[str]:
    """The overrides of a multirun, with ``G.key=value`` made ``++G.key=value`` where ``+G=a,b`` sweeps a group
    that has no default (``+pruning=cubic,rigl``).

    Hydra composes a sweep's base config without the swept groups' options, so there a plain ``pruning.key=5``
    has no ``pruning`` node to change ("Key 'pruning' is not in struct") although every job would have one;
    ``++`` sets the key in every job (its type still checked by the job's schema, an unknown key still refused by
    :func:`check_against_schema`). Single runs, swept keys (``pruning.sparsity=0.8,0.9``) and keys with a
    prefix are left as they are. ``train.py`` applies it to its command line; an own project may do the same.

    Example:
        >>> promote_swept_group_keys(["-m", "+pruning=cubic,rigl", "pruning.sparsity=0.8,0.9",
        ...                           "pruning.update_every=5"])
        ['-m', '+pruning=cubic,rigl', 'pruning.sparsity=0.8,0.9', '++pruning.update_every=5']
        >>> promote_swept_group_keys(["+pruning=cubic", "pruning.update_every=5"])  # a single run composes as is
        ['+pruning=cubic', 'pruning.update_every=5']
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = list(overrides)
    if not any(arg in ("-m", "--multirun") for arg in args):
        return args
    parser = OverridesParser.create()
    parsed: dict[int, Any] = {}
    for index, arg in enumerate(args):
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed[index] = parser.parse_override(arg)
        except HydraException:  # Hydra reports it itself, with its own message
            continue
    swept = {
        o.key_or_group for o in parsed.values() if o.is_add() and o.is_sweep_override() and "." not in o.key_or_group
    }
    for index, override in parsed.items():
        group = override.key_or_group.split(".", 1)[0]
        plain = override.get_key_element() == override.key_or_group  # no + / ++ / ~ prefix
        if group in swept and "." in override.key_or_group and plain and not override.is_sweep_override():
            args[index] = f"++{args[index]}"
    return args


def check_against_schema(node: Any, key: str = "pruning") -> None:
    """Refuse keys that a config node's schema does not have, even those added with ``+`` on the command line.

    Hydra adds ``+pruning.sparsty=0.5`` to a structured node on purpose (``force_add``), so the schema
    alone cannot stop it; this check, run on the composed config before anything is built, does.

    Example:
        >>> from omegaconf import OmegaConf, open_dict
        >>> cfg = OmegaConf.structured(GradualPruningConf)
        >>> with open_dict(cfg):
        ...     cfg.sparsty = 0.5
        >>> check_against_schema(cfg)
        Traceback (most recent call last):
        ...
        ValueError: Unknown key `pruning.sparsty` (added with +?): not an argument of \
pat_callbacks.GradualPruning; did you mean `sparsity`?
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if schema is None or schema is dict or not hasattr(schema, "__dataclass_fields__"):
        return
    known = {f.name for f in fields(schema)}
    for name in node:
        if name not in known and name != "defaults":
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; expected one of: {', '.join(sorted(known))}"
            if name == "final_sparsity" and "sparsity" in known:
                hint = "; it is called `sparsity` in every pruning config"
            raise ValueError(
                f"Unknown key `{key}.{name}` (added with +?): not an argument of {node.get('_target_')}{hint}"
            )


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; ``train.py`` calls it before composing).

    Example:
        >>> register_configs()
        >>> "gradual.yaml" in ConfigStore.instance().list("schema/pruning")
        True"""
    store = ConfigStore.instance()
    for key, schema in SCHEMAS.items():
        group, name = key.split("/")
        store.store(group=f"schema/{group}", name=name, node=schema)
    store.store(group="schema/trainer", name="lightning", node=TrainerConf)


register_configs()
