"""Hydra structured-config schemas for the pruning configs in ``conf/pruning/`` and the trainer configs.

Registered in Hydra's ConfigStore under ``schema/pruning/{gradual,dynamic,structured,oneshot}`` and
``schema/trainer/lightning``; each YAML of ``conf/pruning/`` and ``conf/trainer/`` starts from one
(``defaults: [/schema/pruning/gradual@_here_, _self_]``), so a misspelled key or a value of the wrong type
(``trainer.max_steps=abc``) fails when the config is composed, naming the key, before anything is built. Range
checks (a sparsity of 1.5, an end before the start) are the callbacks' own and run when the config is
instantiated, still before training. The recovery configs (``conf/recovery/``: distillation, QAT) start from
``schema/recovery/{distillation,quantization}`` the same way; they are packaged under ``callbacks.*``, so
``run_training`` builds them with the other callbacks.

The schemas are written out (this module imports only Hydra: the search-path plugin imports it in every Hydra app
of the environment, and importing the callbacks would import Lightning there). Each is checked against its
callback's ``__init__`` by :func:`pat_callbacks.app.drift.schema_drift` (``tests/app/test_config_schemas.py``),
so a key, its type or its default cannot drift from the argument it configures; what a schema leaves out, or types
differently, is declared on it (``left_out``, ``differs``) with the reason.

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

import difflib
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore

from pat_callbacks.app._choices import HistoryDtype
from pat_callbacks.app._key_hints import unknown_key_hint

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
]

# OmegaConf 2.3 reads these annotations at runtime and knows typing.Optional/Dict/List, not `X | None`.


@dataclass
class _LoggingConf:
    remask_weights: Any = "auto"
    log_per_layer: bool = True
    prog_bar: bool = True
    verbose: bool = True


@dataclass
class _CommonPruningConf(_LoggingConf):
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    keep_first: bool = False
    keep_last: bool = False
    # Any, not Optional[Dict[str, float]]: OmegaConf 2.3 crashes assigning a dict to an Optional[Dict] node that
    # holds None, and merges into a typed dict node under the struct flag (new keys refused). Values are checked
    # by the callbacks (`layer_sparsity['net.fc1.weight']` must be a float in [0, 1)) when instantiated.
    layer_sparsity: Any = None
    allow_vectors: bool = False


@dataclass
class _ScheduleWindowConf:
    # One name for the target in every pruning config (DST's too), so one sweep crosses methods and targets. The
    # window is unset: the callback's default (10% to 70% of training) applies unless one key per bound is given,
    # so a key given on the command line or in a recipe is never in conflict with one from the shipped YAML.
    sparsity: Optional[float] = None
    schedule: str = "cubic"
    initial_sparsity: Optional[float] = None
    start_step: Optional[int] = None
    end_step: Optional[int] = None
    start_epoch: Optional[float] = None
    end_epoch: Optional[float] = None
    start_fraction: Optional[float] = None
    end_fraction: Optional[float] = None
    update_every: Optional[int] = None
    phase_steps: Optional[int] = None
    phase_epochs: Optional[float] = None
    power: Optional[float] = None


@dataclass
class GradualPruningConf(_CommonPruningConf, _ScheduleWindowConf):
    """Schema of :class:`pat_callbacks.GradualPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(GradualPruningConf).schedule
        'cubic'"""

    left_out: ClassVar[Dict[str, str]] = {"final_sparsity": "the target is `sparsity`", "loss_fn": "a callable"}
    differs: ClassVar[Dict[str, str]] = {
        "criterion": "'taylor' spelled out: a config with manual optimization is refused with the reason, where the "
        "unset Python default falls back to magnitude",
        "history_dtype": "an enum of 'bfloat16' / 'float32', so a bad value fails when the config is composed",
    }

    _target_: str = "pat_callbacks.GradualPruning"
    drop_fraction: float = 0.0
    regrow_fraction: Optional[float] = None  # the former name of drop_fraction
    pattern: str = "unstructured"
    criterion: str = "taylor"
    allocation: Optional[str] = None  # global; uniform with an N:M pattern
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    accumulate_window: Optional[int] = 40  # steps of Taylor / Fisher history before each update; null: every step
    history_dtype: HistoryDtype = HistoryDtype.bfloat16  # or float32 (the former history)
    probe_sparsity: float = 0.9
    sensitivity_batches: int = 4
    rewind_step: Optional[int] = None


@dataclass
class DynamicSparseTrainingConf(_CommonPruningConf):
    """Schema of :class:`pat_callbacks.DynamicSparseTraining` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DynamicSparseTrainingConf).regrowth
        'rigl'"""

    _target_: str = "pat_callbacks.DynamicSparseTraining"
    sparsity: float = 0.9
    regrowth: str = "rigl"
    method: Optional[str] = None  # the former name of regrowth
    update_every: int = 100
    drop_fraction: float = 0.3
    decay: str = "cosine"
    end_fraction: float = 0.75
    end_step: Optional[int] = None
    stop_fraction: Optional[float] = None  # the former name of end_fraction
    stop_step: Optional[int] = None  # the former name of end_step
    allocation: str = "erk"
    seed: int = 0


@dataclass
class StructuredPruningConf(_LoggingConf, _ScheduleWindowConf):
    """Schema of :class:`pat_callbacks.StructuredPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(StructuredPruningConf).criterion is None  # the callback's default: l2
        True
    """

    left_out: ClassVar[Dict[str, str]] = {"final_sparsity": "the target is `sparsity`", "example_inputs": "tensors"}
    differs: ClassVar[Dict[str, str]] = {
        "heads": "a Literal alias: a name in a config",
        "attention": "a list of layout mappings",
    }

    _target_: str = "pat_callbacks.StructuredPruning"
    criterion: Optional[str] = None  # l2 (unset, so the former key `importance` can still be given alone)
    exclude: Optional[List[str]] = None
    importance: Optional[str] = None  # the former name of criterion
    ignore: Optional[List[str]] = None  # the former name of exclude
    attention: Optional[List[Any]] = None
    heads: str = "auto"
    round_to: Optional[int] = None
    uniform_per_layer: bool = False
    trace_timeout: Optional[float] = 60.0


@dataclass
class OneShotPruningConf(_LoggingConf):
    """Schema of :class:`pat_callbacks.OneShotPruning` configs (``conf/pruning/wanda.yaml``, ``sparsegpt.yaml``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(OneShotPruningConf).method
        'wanda'
    """

    left_out: ClassVar[Dict[str, str]] = {"forward": "a callable"}
    differs: ClassVar[Dict[str, str]] = {
        "sparsity": "a config states its target (in Python: N:M's, else required)",
        "calibration_batches": "a config calibrates on 16 batches of a loader (in Python: every batch of an iterable)",
    }

    _target_: str = "pat_callbacks.OneShotPruning"
    method: str = "wanda"
    sparsity: Optional[float] = 0.5
    pattern: str = "unstructured"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    calibration_batches: int = 16
    calibration: str = "train"  # train | val (a DataLoader only from Python)
    at_step: int = 0
    per_row: Optional[bool] = None
    allocation: str = "uniform"
    sequential: bool = True
    block_size: int = 128
    damping: float = 0.01
    pipeline: str = "auto"  # auto | blocks | whole: block by block from cached inputs, or whole-model passes
    offload: Any = "auto"  # true | false | auto: blocks moved one at a time to `device`
    device: Optional[str] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    keep_first: bool = False
    keep_last: bool = False


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


@dataclass
class DistillationConf:
    """Schema of :class:`pat_callbacks.Distillation` configs (``conf/recovery/distill.yaml``, at
    ``callbacks.distill``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DistillationConf).temperature
        2.0"""

    left_out: ClassVar[Dict[str, str]] = {"teacher": "a module (a config distils from a copy of the model)"}

    _target_: str = "pat_callbacks.Distillation"
    temperature: float = 2.0
    alpha: float = 1.0
    loss: str = "kl"  # or mse, cosine
    output: Any = "logits"  # a field name or an index of the model's output
    hidden_layers: Any = field(default_factory=list)  # a list of names or {student: teacher}
    hidden_weight: float = 1.0
    hidden_loss: str = "mse"
    task_loss: bool = True
    teacher_step: Any = "pruning_start"  # or a step number
    teacher_dtype: Optional[str] = None
    teacher_device: Optional[str] = None
    student_module: Optional[str] = None
    save_teacher: bool = True
    log: bool = True


@dataclass
class QuantizationConf:
    """Schema of :class:`pat_callbacks.QuantizationAwareTraining` configs (``conf/recovery/qat_*.yaml``, at
    ``callbacks.qat``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(QuantizationConf).spec
        'int8'"""

    _target_: str = "pat_callbacks.QuantizationAwareTraining"
    spec: str = "int8"
    bits: Optional[int] = None  # deprecated: the former spelling of spec
    group_size: Optional[int] = None  # deprecated: the former spelling of spec
    start_step: int = 0
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    finalize: bool = True


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

        A close match of a renamed key suggests its new name:

        >>> with open_dict(cfg):
        ...     del cfg["sparsty"]
        ...     cfg.final_sparsty = 0.9
        >>> check_against_schema(cfg)
        Traceback (most recent call last):
        ...
        ValueError: Unknown key `pruning.final_sparsty` (added with +?): not an argument of \
pat_callbacks.GradualPruning; did you mean `sparsity` (the new name of `final_sparsity`)?
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
            hint = unknown_key_hint(str(name), known)
            raise ValueError(
                f"Unknown key `{key}.{name}` (added with +?): not an argument of {node.get('_target_')}{hint}"
            )


# Each callback's schema, by its ConfigStore name (``schema/<group>/<name>``).
SCHEMAS: Dict[str, type] = {
    "pruning/gradual": GradualPruningConf,
    "pruning/dynamic": DynamicSparseTrainingConf,
    "pruning/structured": StructuredPruningConf,
    "pruning/oneshot": OneShotPruningConf,
    "recovery/distillation": DistillationConf,
    "recovery/quantization": QuantizationConf,
}

# The plain types OmegaConf 2.3 understands; conf_type maps an argument's annotation onto them.
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


def conf_type(annotation: Any) -> Any:
    """The type a config field has for an argument annotated ``annotation`` (as written, or a class): its one plain
    type (bool, int, float, str; ``str | Sequence[str]`` is a list of strings), ``Optional`` when ``None`` is
    allowed; ``Any`` when the argument takes several plain types or a literal (the callback checks the value).

    Example:
        >>> conf_type("str | Criterion | None")  # a name in a config, a Criterion object from Python
        typing.Optional[str]
        >>> conf_type("str | Sequence[str] | None"), conf_type("bool | Literal['auto']")
        (typing.Optional[typing.List[str]], typing.Any)
    """
    if not isinstance(annotation, str):  # a class, or a TypedDict's ForwardRef
        annotation = getattr(annotation, "__forward_arg__", None) or getattr(annotation, "__name__", "Any")
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
