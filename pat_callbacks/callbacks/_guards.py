"""Checks of what the pruning callbacks share with the rest of a run: weight-averaging callbacks that keep their
own copy of the weights, targets replaced or removed mid-run, other pruning callbacks on the same parameters,
checkpoints saved by another pruning callback, and frozen layers left out of the targets.

Each is a small function of its inputs (the checks that warn or refuse say so in the owner's name);
:class:`~pat_callbacks.callbacks.base.PruningCallback` calls them from its own hooks, so what happens at a hook is
read there, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

__all__ = [
    "averaged_copies",
    "continues_fit",
    "foreign_states",
    "frozen_targets",
    "mask_averaged_copies",
    "mask_averages",
    "rebind_replaced",
    "refuse_shared_targets",
    "shared_targets",
    "stale",
    "warn_foreign_states",
    "warn_frozen",
    "warn_if_unreached",
]

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging

    _AVERAGING: tuple[type, ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:  # pragma: no cover - older Lightning
    _AVERAGING = (StochasticWeightAveraging,)


def averaged_copies(callbacks: Iterable[Any]) -> list[nn.Module]:
    """The averaged models kept by Lightning's weight-averaging callbacks (``StochasticWeightAveraging``,
    ``WeightAveraging`` and ``EMAWeightAveraging``), once they exist; a copy whose parameters have the model's names.

    Both keep it in ``_average_model`` (a copy of the LightningModule for SWA, a ``torch.optim.swa_utils.AveragedModel``
    wrapping one for ``WeightAveraging``); there is no public accessor.

    Example:
        >>> averaged_copies([StochasticWeightAveraging(swa_lrs=0.1)])  # nothing before `setup`
        []
    """
    copies = []
    for callback in callbacks:
        if isinstance(callback, _AVERAGING):
            model = getattr(callback, "_average_model", None)
            if isinstance(model, torch.optim.swa_utils.AveragedModel):
                model = model.module
            if isinstance(model, nn.Module):
                copies.append(model)
    return copies


def mask_averaged_copies(masks: Mapping[str, Tensor], copies: Iterable[nn.Module]) -> None:
    """Zero the pruned entries (``~mask``) of the same-named parameters of every averaged copy, in place.

    Example:
        >>> copy = nn.Linear(2, 2)
        >>> mask_averaged_copies({"weight": torch.tensor([[True, False], [False, True]])}, [copy])
        >>> (copy.weight == 0).tolist()
        [[False, True], [True, False]]
    """
    with torch.no_grad():
        for model in copies:
            for name, mask in masks.items():
                try:
                    param = model.get_parameter(name)
                except AttributeError:
                    continue
                if param.shape == mask.shape:
                    param.masked_fill_(~mask.to(param.device), 0)


def stale(params: Mapping[str, nn.Parameter], model: nn.Module) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Targets the model no longer holds: ``(replaced, gone)``. ``replaced``: ``{name: the model's new parameter}``
    for a name now bound to another tensor of the same shape; ``gone``: names that are no longer a parameter of the
    model, or now of another shape.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> params = dict(model.named_parameters())
        >>> model[1] = nn.Linear(2, 2)
        >>> replaced, gone = stale(params, model)
        >>> sorted(replaced), gone
        (['1.bias', '1.weight'], [])
        >>> model[1] = nn.Identity()
        >>> stale(params, model)[1]
        ['1.weight', '1.bias']
    """
    replaced: dict[str, nn.Parameter] = {}
    gone: list[str] = []
    for name, param in params.items():
        try:
            live = model.get_parameter(name)
        except AttributeError:
            gone.append(name)
            continue
        if live is not param:
            if live.shape == param.shape:
                replaced[name] = live
            else:
                gone.append(name)
    return replaced, gone


def shared_targets(mine: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> list[str]:
    """Names of ``mine`` whose tensor is also one of ``theirs`` (the same object).

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2))
        >>> shared_targets({"a": w, "b": nn.Parameter(torch.ones(2))}, {"x": w})
        ['a']
    """
    ids = {id(t) for t in theirs.values()}
    return [name for name, t in mine.items() if id(t) in ids]


def foreign_states(own: type, classes: Iterable[type], states: Mapping[Any, Any], claimed: Iterable[str]) -> list[str]:
    """Keys of ``states`` saved by another class of ``classes`` than ``own`` that no callback of the run claims.

    Example:
        >>> class A: ...
        >>> class B: ...
        >>> foreign_states(A, [A, B], {"B{'sparsity': 0.9}": {}, "A{}": {}, "Other{}": {}}, claimed=["A{}"])
        ["B{'sparsity': 0.9}"]
    """
    names = {cls.__qualname__ for cls in classes if cls is not own}
    taken = set(claimed)
    return [key for key in states if isinstance(key, str) and key.split("{", 1)[0] in names and key not in taken]


def frozen_targets(roles: Iterable[str], model: nn.Module, targets: Mapping[str, Any]) -> list[str]:
    """Parameters that would be targets by their role but are frozen (``requires_grad=False``), hence left out.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _ = model[0].weight.requires_grad_(False)
        >>> frozen_targets(["0.weight", "1.weight"], model, {"1.weight": model[1].weight})
        ['0.weight']
    """
    named = dict(model.named_parameters())
    return [name for name in roles if name in named and not named[name].requires_grad and name not in targets]


def all_subclasses(cls: type) -> list[type]:
    """``cls`` and every subclass of it, recursively.

    Example:
        >>> class A: ...
        >>> class B(A): ...
        >>> [c.__name__ for c in all_subclasses(A)]
        ['A', 'B']
    """
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(c for c in all_subclasses(sub) if c not in found)
    return found


def warn_if_unreached(owner: str, trainer: Any, step: int, what: str = "the schedule ends") -> None:
    """Warn when ``step`` (where ``what`` happens) lies at or after the end of training: its sparsity is not reached.

    Example:
        >>> import warnings
        >>> from types import SimpleNamespace
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_unreached("GradualPruning", SimpleNamespace(estimated_stepping_batches=100), 150)
        >>> "the schedule ends at step 150 but training has 100 optimizer steps" in str(caught[0].message)
        True
    """
    total = trainer.estimated_stepping_batches
    if isinstance(total, (int, float)) and total != float("inf") and step >= total:
        rank_zero_warn(
            f"{owner}: {what} at step {step} but training has {int(total)} optimizer steps; the final sparsity will "
            "not be reached"
        )


# ------------------------------------------------------------------------------------------------------------------
# The checks as a pruning callback runs them: each names its owner (the callback's class) in what it says.


def mask_averages(pruner: Any, callbacks: Iterable[Any]) -> None:
    """Zero the pruned entries of the copies kept by weight-averaging ``callbacks`` (SWA, EMA), if ``pruner`` exists
    and is not sharded (:func:`mask_averaged_copies` of :func:`averaged_copies`).

    Weight averaging keeps its own copy of the weights, swaps it in for validation and copies it over the model at
    the end of training; masking it at every hook around those moments keeps the averaged model within the masks,
    whatever the order of the callbacks (averages of kept weights are untouched).

    Example:
        >>> mask_averages(None, [StochasticWeightAveraging(swa_lrs=0.1)])  # before fit start: nothing to do
    """
    if pruner is not None and pruner.group is None:
        mask_averaged_copies(pruner.masks, averaged_copies(callbacks))


def continues_fit(owner: str, pruner: Any, model: nn.Module) -> bool:
    """Whether a new fit continues the previous one of the same model (``pruner`` exists and every target is still
    the model's own tensor), saying so: then the pruner and its masks are kept.

    Example:
        >>> continues_fit("GradualPruning", None, nn.Linear(2, 2))  # a first fit
        False
    """
    if pruner is None:
        return False
    replaced, gone = stale(pruner.params, model)
    if replaced or gone:
        return False
    rank_zero_info(
        f"{owner}: a new fit of the same model continues with the masks reached so far "
        f"(sparsity {pruner.sparsity():.4f}); pruned weights stay pruned"
    )
    return True


def rebind_replaced(owner: str, pruner: Any, model: nn.Module, step: int) -> bool:
    """Re-bind targets replaced by a tensor of the same shape (their masks apply to it, with a warning naming them)
    and return whether any was; refuse removed ones (``RuntimeError``).

    Example:
        >>> from pat_callbacks.core.pruner import Pruner
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> rebind_replaced("GradualPruning", Pruner(model), model, step=3)
        False
    """
    replaced, gone = stale(pruner.params, model)
    if gone:
        raise RuntimeError(_gone_message(owner, pruner.params, model, gone, step))
    if not replaced:
        return False
    rank_zero_warn(
        f"{owner}: {sorted(replaced)[0]!r} was replaced by a new tensor at step {step} "
        f"({sorted(replaced)}); its mask now applies to the new tensor (an optimizer created before the "
        "replacement does not train it)"
    )
    pruner.params.update(replaced)
    pruner.apply()
    return True


def _gone_message(owner: str, params: Mapping[str, Tensor], model: nn.Module, gone: list[str], step: int) -> str:
    """What :func:`rebind_replaced` refuses: targets removed, and targets now of another shape (then and now), with
    the ways on."""
    live = dict(model.named_parameters())
    removed = [name for name in gone if name not in live]
    reshaped = [
        f"{name!r} is now {tuple(live[name].shape)}, its mask {tuple(params[name].shape)}"
        for name in gone
        if name in live
    ]
    parts = [f"{removed} is no longer a parameter of the model"] if removed else []
    if reshaped:
        more = f" and {len(reshaped) - 5} more" if len(reshaped) > 5 else ""
        parts.append(f"a replaced layer has another shape ({'; '.join(reshaped[:5])}{more})")
    return (
        f"{owner}: at step {step}, {'; '.join(parts)}. Masks are bound to the tensors of fit start and cannot "
        "follow a layer of another shape: replace the layer before trainer.fit (e.g. in configure_model) so pruning "
        "starts on it; or keep its shape (copy new values in with load_state_dict or weight.data.copy_); or finish "
        "this fit and start a new one with a new pruning callback"
    )


def refuse_shared_targets(owner: str, params: Mapping[str, Tensor], others: Iterable[tuple[str, Any]]) -> None:
    """Refuse two pruning callbacks on the same parameters: ``others`` are ``(name, params)`` of the run's other
    pruning callbacks (on disjoint parameters they coexist).

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2))
        >>> refuse_shared_targets("GradualPruning", {"a": w}, [("KeepSparsity", {"b": w})])
        Traceback (most recent call last):
        ...
        ValueError: GradualPruning and KeepSparsity both prune ['a']: two pruning callbacks would overwrite each \
other's masks; use one, or give them disjoint `include` / `exclude`
    """
    for other, their_params in others:
        shared = shared_targets(params, their_params)
        if shared:
            raise ValueError(
                f"{owner} and {other} both prune {shared[:5]}: two pruning callbacks "
                "would overwrite each other's masks; use one, or give them disjoint `include` / `exclude`"
            )


def warn_foreign_states(
    owner: type, classes: Iterable[type], states: Mapping[Any, Any], claimed: Iterable[str]
) -> None:
    """Warn about each pruning state of the checkpoint that another class of ``classes`` saved and nothing claims
    (:func:`foreign_states`): its masks are not restored.

    Example:
        >>> class A: ...
        >>> warn_foreign_states(A, [A], {"A{}": {}}, claimed=["A{}"])  # nothing foreign: silent
    """
    name = owner.__name__
    for key in foreign_states(owner, classes, states, claimed):
        saver = key.split("{", 1)[0]
        rank_zero_warn(
            f"{name}: the checkpoint holds the pruning state of {saver} ({key}), "
            f"which {name} does not read: its masks are not restored and pruning starts afresh, so nothing holds "
            f"its zeros: training updates them from the first step on, and {name} makes its own masks on its own "
            f"schedule (e.g. at start_step); resume with {saver} to continue, or fine-tune with KeepSparsity "
            "to hold its zeros"
        )


def warn_frozen(owner: str, model: nn.Module, roles: Iterable[str], params: Mapping[str, Any], follows: bool) -> dict:
    """Name the weights left dense because they are frozen when fitting starts, and return them (``{name:
    parameter}``); ``follows``: whether they join the targets once they train.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _ = model[0].weight.requires_grad_(False)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     sorted(warn_frozen("KeepSparsity", model, ["0.weight", "1.weight"], {}, follows=False))
        ['0.weight']
    """
    frozen = frozen_targets(roles, model, params)
    if frozen:
        later = (
            "they become targets at the first step they train (requires_grad=True, e.g. unfrozen by BackboneFinetuning)"
            if follows
            else "they are not pruned, even if unfrozen later (e.g. by BackboneFinetuning); name them in "
            "`include` (with criterion='magnitude') to prune them"
        )
        more = f" and {len(frozen) - 5} more" if len(frozen) > 5 else ""
        rank_zero_warn(
            f"{owner}: {frozen[:5]}{more} are frozen (requires_grad=False) when fitting starts, so they are left "
            f"dense for now; {later}"
        )
    return {name: model.get_parameter(name) for name in frozen}
