"""Hydra structured-config schemas for the pruning configs in ``conf/pruning/``.

Registered in Hydra's ConfigStore under ``schema/pruning/{gradual,dynamic}``; each YAML of ``conf/pruning/``
starts from one (``defaults: [/schema/pruning/gradual@_here_, _self_]``), so a misspelled key or a value of
the wrong type fails when the config is composed, before anything is built. Range checks (a sparsity of 1.5,
an end before the start) are the callbacks' own and run when the config is instantiated, still before training.
The recovery configs (``conf/recovery/``: distillation, QAT) start from ``schema/recovery/{distillation,quantization}``
the same way; they are packaged under ``callbacks.*``, so ``run_training`` builds them with the other callbacks.

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
from dataclasses import dataclass, fields
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

__all__ = [
    "DistillationConf",
    "DynamicSparseTrainingConf",
    "GradualPruningConf",
    "QuantizationConf",
    "StructuredPruningConf",
    "check_against_schema",
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
    power: Optional[float] = None


@dataclass
class GradualPruningConf(_CommonPruningConf, _ScheduleWindowConf):
    """Schema of :class:`pat_callbacks.GradualPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(GradualPruningConf).schedule
        'cubic'"""

    _target_: str = "pat_callbacks.GradualPruning"
    phase_steps: Optional[int] = None
    phase_epochs: Optional[float] = None
    regrow_fraction: float = 0.0
    pattern: str = "unstructured"
    criterion: str = "taylor"
    allocation: Optional[str] = None  # global; uniform with an N:M pattern
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    probe_sparsity: float = 0.9
    sensitivity_batches: int = 4
    rewind_step: Optional[int] = None


@dataclass
class DynamicSparseTrainingConf(_CommonPruningConf):
    """Schema of :class:`pat_callbacks.DynamicSparseTraining` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DynamicSparseTrainingConf).method
        'rigl'"""

    _target_: str = "pat_callbacks.DynamicSparseTraining"
    sparsity: float = 0.9
    method: str = "rigl"
    update_every: int = 100
    drop_fraction: float = 0.3
    decay: str = "cosine"
    stop_fraction: float = 0.75
    stop_step: Optional[int] = None
    allocation: str = "erk"
    seed: int = 0


@dataclass
class StructuredPruningConf(_LoggingConf, _ScheduleWindowConf):
    """Schema of :class:`pat_callbacks.StructuredPruning` configs.

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(StructuredPruningConf).importance
        'l2'
    """

    _target_: str = "pat_callbacks.StructuredPruning"
    importance: str = "l2"
    ignore: Optional[List[str]] = None
    attention: Optional[List[Any]] = None


@dataclass
class DistillationConf:
    """Schema of :class:`pat_callbacks.Distillation` configs (``conf/recovery/distill.yaml``, at
    ``callbacks.distill``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(DistillationConf).temperature
        2.0"""

    _target_: str = "pat_callbacks.Distillation"
    temperature: float = 2.0
    alpha: float = 1.0
    hidden_layers: Any = None  # a list of names or {student: teacher}
    hidden_weight: float = 1.0
    teacher_step: Any = "pruning_start"  # or a step number
    teacher_dtype: Optional[str] = None
    teacher_device: Optional[str] = None
    student_module: str = ""
    save_teacher: bool = True
    log: bool = True


@dataclass
class QuantizationConf:
    """Schema of :class:`pat_callbacks.QuantizationAwareTraining` configs (``conf/recovery/qat_*.yaml``, at
    ``callbacks.qat``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> OmegaConf.structured(QuantizationConf).bits
        8"""

    _target_: str = "pat_callbacks.QuantizationAwareTraining"
    bits: int = 8
    group_size: Optional[int] = None
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
    store.store(group="schema/pruning", name="gradual", node=GradualPruningConf)
    store.store(group="schema/pruning", name="dynamic", node=DynamicSparseTrainingConf)
    store.store(group="schema/pruning", name="structured", node=StructuredPruningConf)
    store.store(group="schema/recovery", name="distillation", node=DistillationConf)
    store.store(group="schema/recovery", name="quantization", node=QuantizationConf)


register_configs()
