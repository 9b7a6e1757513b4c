"""Channel groups for structured pruning, from Torch-Pruning's dependency graph.

A *channel* of a Conv/Linear layer is one output filter or neuron. Removing it also removes whatever is coupled
to it: its bias, the matching BatchNorm scale and shift, and the next layers' input columns (through flatten,
residual adds and concatenations). Torch-Pruning (``torch-pruning`` on PyPI) traces those couplings; this module
turns each coupled set into index slices of named parameters, so masks can zero whole channels during training
and :func:`shrink` can remove them afterwards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> groups = channel_groups(model, torch.zeros(1, 3, 8, 8), ignore=["3.weight"])
    >>> [(g.root, g.n_channels) for g in groups]
    [('0.weight', 4)]
    >>> sorted({name for name, dim, idx in groups[0].slices[0]})
    ['0.bias', '0.weight', '1.bias', '1.weight', '3.weight']
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.structured.channels import ChannelGroup

__all__ = ["TRACE_SECONDS", "channel_groups"]


def _graph(model: nn.Module, example_inputs: Any) -> Any:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


TRACE_SECONDS = 60.0
"""Default bound on tracing a model's channel groups (seconds): a larger model is refused with what to do instead."""


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    ignore: Sequence[str] = (),
    time_limit: float | None = TRACE_SECONDS,
) -> list[ChannelGroup]:
    """Every Conv/Linear output-channel group of ``model`` (roots whose weight or module name matches a glob in
    ``ignore`` are kept whole: typically the classifier, whose outputs are the classes).

    Parameters tied under two names (an output head sharing the token embedding) are named once, by the name
    ``model.named_parameters()`` gives them. Tracing past ``time_limit`` seconds (``None``: no bound) stops with
    a ``TimeoutError`` saying how to name the structure instead.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [(g.root, g.n_channels) for g in channel_groups(model, torch.zeros(1, 4), ignore=["2.weight"])]
        [('0.weight', 3)]"""
    with _tracer_leaves_no_trace(model), _time_limit(time_limit, lambda: _too_long(model, time_limit)):
        graph = _graph(model, example_inputs)
        module_names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
        for name, module in model.named_modules():  # the first name of a module reached twice
            module_names[module] = name
        ignored = [
            m
            for name, m in model.named_modules()
            if any(fnmatchcase(f"{name}.weight".lstrip("."), p) or (name and fnmatchcase(name, p)) for p in ignore)
        ]
        canonical = _canonical_names(model)
        params = dict(model.named_parameters())
        groups = []
        roots = [nn.Conv1d, nn.Conv2d, nn.Linear]
        for group in graph.get_all_groups(root_module_types=roots, ignored_layers=ignored):
            root_dep, root_idxs = group[0].dep, [int(i) for i in group[0].idxs]
            root = root_dep.target.module
            root_name = canonical[f"{module_names[root]}.weight".lstrip(".")]
            result = ChannelGroup(root=root_name, n_channels=len(root_idxs))
            result.slices = _channel_slices(group, module_names, canonical, root_idxs)
            _check_bounds(result, params, module_names[root])
            groups.append(result)
    return groups


@contextmanager
def _tracer_leaves_no_trace(model: nn.Module) -> Iterator[None]:
    """Whatever stops the tracing (a timeout, a forward that raises), the model keeps its own forward hooks only and
    its train / eval modes: Torch-Pruning removes the hooks it adds only after a forward that returns."""
    hooks = {module: set(module._forward_hooks) for module in model.modules()}
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, before in hooks.items():
            for key in [k for k in module._forward_hooks if k not in before]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for module, training in modes.items():
            module.training = training


def _too_long(model: nn.Module, seconds: float | None) -> str:
    return (
        f"Tracing the channel couplings of {type(model).__name__} ({sum(1 for _ in model.modules())} modules) with "
        f"Torch-Pruning took over {seconds:g} s: too large to trace. Name its attention instead "
        "(`attention=[{q, k, v, out, num_heads, num_kv_heads}]` for separate projections; Hugging Face Llama / Qwen2 "
        "/ Mistral / Gemma / GPT-2 / BERT attention is found without tracing), keep parts whole with `exclude=` "
        "globs, or raise `trace_timeout`"
    )


@contextmanager
def _time_limit(seconds: float | None, message: Callable[[], str]) -> Iterator[None]:
    """Raise ``TimeoutError(message())`` if the block runs past ``seconds`` (a real-time interval timer: on the main
    thread of a platform with ``SIGALRM``; elsewhere the block is not bounded).

    The timer repeats every second until the block ends: code inside may swallow one TimeoutError (Torch-Pruning's
    tracer runs the model's forward under a bare ``except:``, and retries it), the next one still stops it. After the
    block a late signal does nothing."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # someone else's timer: leave it alone
    )
    if not usable:
        yield
        return

    active = [True]

    def expire(signum: int, frame: Any) -> None:
        if active[0]:
            raise TimeoutError(message())

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds), 1.0)
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_bounds(group: ChannelGroup, params: dict[str, Tensor], root_module: str) -> None:
    """Torch-Pruning cannot follow every reshape (fused q/k/v split into heads): an index past a parameter's size
    means the trace is wrong for this layer; say so, and how to keep it whole."""
    for channel in group.slices:
        for name, dim, index in channel:
            size = params[name].shape[dim]
            if len(index) and int(index.max()) >= size:
                raise ValueError(
                    f"Torch-Pruning's trace couples the channels of {group.root!r} to index {int(index.max())} of "
                    f"{name!r} (dim {dim} has {size}): it cannot follow this layer's reshapes (attention heads split "
                    f"from a fused projection?). Keep it whole with `exclude=[{root_module!r}]`, or write the "
                    "attention as separate q/k/v/out projections and name them with `attention=`"
                )


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones have several) -> the name ``named_parameters()`` gives it."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def _coupled_params(module: nn.Module, handler: str, name: str) -> list[tuple[str, int]]:
    """The ``(parameter, dim)`` a Torch-Pruning dependency on ``module`` cuts (none for layers we do not mask)."""
    prefix = f"{name}." if name else ""
    bias = [(f"{prefix}bias", 0)] if getattr(module, "bias", None) is not None else []
    if handler == "prune_out_channels" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return [(f"{prefix}weight", 0), *bias]
    if handler == "prune_out_channels" and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(f"{prefix}weight", 0), (f"{prefix}bias", 0)] if module.affine else []
    if handler == "prune_out_channels" and isinstance(module, nn.LayerNorm):
        return [(f"{prefix}weight", 0), *bias] if module.weight is not None else []
    if handler == "prune_out_channels" and isinstance(module, nn.Embedding):
        return [(f"{prefix}weight", 1)]
    if (
        handler == "prune_in_channels"
        and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
        and getattr(module, "groups", 1) == 1
    ):
        return [(f"{prefix}weight", 1)]
    return []


def _channel_slices(
    group: Any, module_names: dict[nn.Module, str], canonical: dict[str, str], root_idxs: list[int]
) -> list[list[tuple[str, int, Tensor]]]:
    """Per root channel, its coupled slices, from one traced group: every dependency's indices carry the root
    index they follow (Torch-Pruning's ``root_idxs``). A parameter reached twice (tied) is sliced once."""
    position = {root: i for i, root in enumerate(root_idxs)}
    per_channel: list[dict[tuple[str, int], set[int]]] = [{} for _ in root_idxs]
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        coupled = _coupled_params(module, dep.handler.__name__, module_names.get(module, ""))
        if not coupled:
            continue
        for local, root in zip(idxs, item.root_idxs, strict=True):
            channel = per_channel[position[int(root)]]
            for name, dim in coupled:
                channel.setdefault((canonical.get(name, name), dim), set()).add(int(local))
    return [
        [(name, dim, torch.tensor(sorted(index), dtype=torch.long)) for (name, dim), index in channel.items()]
        for channel in per_channel
    ]
