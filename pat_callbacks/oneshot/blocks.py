"""Block-by-block calibration: a model's repeated blocks run one at a time from cached block inputs.

Sequential one-shot pruning calibrates each transformer block on the model whose earlier blocks are already
pruned. Running the whole model for every block costs ``depth`` block forwards per batch per block (quadratic in
depth); here the model runs once up to its first block, whose inputs (positional and keyword: attention masks,
position ids / embeddings, rotary caches) a pre-hook stores and then stops the forward (the "Catcher" of the
SparseGPT and llm-compressor reference loops). Each block is then calibrated from the cached inputs, pruned, and run
once more to produce the next block's inputs: two block forwards per batch per block, whatever the depth. The
results are those of the whole-model passes (the same modules on the same inputs).

- :func:`find_blocks`: the ``nn.ModuleList`` of same-class modules holding the targets (Hugging Face
  ``model.layers``, ``transformer.h``, ``encoder.layer``; CharGPT's ``blocks``), or why there is none;
- :func:`check_forward`: one dense forward of the first batch checking, before any weight changes, that every
  target's module runs and sees finite inputs, and whether each block's input is the previous block's output with
  the same other arguments (else the block pipeline would not be the model's, and the caller falls back);
- :class:`BlockInputs`: the cached inputs of the current block, with :meth:`BlockInputs.run` and
  :meth:`BlockInputs.advance`;
- :func:`offloaded`: a block moved to the calibration device for the time of a ``with`` (the model otherwise stays
  where it is, e.g. in CPU memory).

Caches of past keys and values (``past_key_value(s)``, ``layer_past``, ``cache``, any Hugging Face ``Cache``) are
dropped and ``use_cache`` set to
``False`` in the cached arguments: a block runs twice on them, and a cache would grow between the runs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Linear(4, 8)
    ...         self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
    ...     def forward(self, x):
    ...         x = self.embed(x)
    ...         for block in self.blocks:
    ...             x = block(x)
    ...         return x
    >>> net = Net()
    >>> blocks, why = find_blocks(net, ["blocks.0.0.weight", "blocks.2.0.weight"])
    >>> blocks.prefix, len(blocks.modules)
    ('blocks', 3)
    >>> batches = [torch.randn(2, 4), torch.randn(3, 4)]
    >>> inputs = BlockInputs.capture(net, blocks, batches)
    >>> for block in blocks.modules:
    ...     inputs.advance(block)
    >>> torch.equal(inputs.hidden[1], net(batches[1]))
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.oneshot.calibration import InputReader, attention_mask_of, default_forward

__all__ = ["BlockInputs", "Blocks", "check_forward", "find_blocks", "offloaded"]

_CACHES = ("past_key_value", "past_key_values", "layer_past", "cache")


def _is_cache(name: str, value: Any) -> bool:
    """A key/value cache argument (by its name, or a Hugging Face ``Cache`` by its class)."""
    return name in _CACHES or any(cls.__name__ == "Cache" for cls in type(value).__mro__)


class _Caught(Exception):
    """Raised by the pre-hook of the first block to stop the forward once its inputs are stored."""


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model: ``prefix`` (``"model.layers"``) and the ``nn.ModuleList`` itself.

    Example:
        >>> from torch import nn
        >>> Blocks("layers", nn.ModuleList([nn.Linear(2, 2)])).name(0)
        'layers.0'
    """

    prefix: str
    modules: nn.ModuleList

    def name(self, index: int) -> str:
        """The layer-group name of block ``index`` (as :func:`~pat_callbacks.core.owl.layer_groups` writes it)."""
        return f"{self.prefix}.{index}" if self.prefix else str(index)


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[Blocks | None, str]:
    """The ``nn.ModuleList`` of same-class modules holding most of the targets ``names`` (the outermost on a tie),
    with ``""``; or ``None`` and why there is none.

    Example:
        >>> from torch import nn
        >>> find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), ["0.weight"])
        (None, 'Sequential has no nn.ModuleList of same-class blocks holding the targets')
    """
    wanted = list(names)
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        start = f"{prefix}." if prefix else ""
        held = sum(name.startswith(start) for name in wanted)
        if held and (best is None or (held, -prefix.count(".")) > (best[0], best[1])):
            best = (held, -prefix.count("."), prefix, module)
    if best is None:
        return None, f"{type(model).__name__} has no nn.ModuleList of same-class blocks holding the targets"
    return Blocks(best[2], best[3]), ""


# ------------------------------------------------------------------------------------------------- arguments
def _bind(block: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(block.forward).bind(*args, **kwargs)


def _stateless(bound: inspect.BoundArguments) -> dict[str, Any]:
    """The block's arguments by name, past-key-value caches dropped and ``use_cache`` off."""
    arguments = dict(bound.arguments)
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments[name] = dict(arguments[name])
            extra = arguments[name]
            for key, value in extra.items():
                if _is_cache(key, value):
                    extra[key] = None
            if "use_cache" in extra:
                extra["use_cache"] = False
    for key, value in arguments.items():
        if _is_cache(key, value):
            arguments[key] = None
    if "use_cache" in arguments:
        arguments["use_cache"] = False
    return arguments


def _call(block: nn.Module, arguments: dict[str, Any], hidden: Tensor) -> Tensor:
    """Run ``block`` on ``arguments`` with its first argument replaced by ``hidden``; its output hidden states."""
    signature = inspect.signature(block.forward)
    bound = signature.bind_partial()
    bound.arguments.update(arguments)
    bound.arguments[next(iter(signature.parameters))] = hidden
    return _hidden_of(block(*bound.args, **bound.kwargs))


def _hidden_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Expected a block to return a tensor or a tuple starting with one, but got {type(output)}")


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (Tensor, tuple, list, dict)) or isinstance(b, (Tensor, tuple, list, dict)):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == (e.g. caches): not the same
        return False


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


# ------------------------------------------------------------------------------------------------- validation
def check_forward(
    model: nn.Module,
    readers: dict[str, InputReader],
    batch: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    blocks: Blocks | None = None,
) -> str:
    """One dense forward of ``batch`` (no gradients, eval mode): refuse, naming them, targets whose module never
    runs or whose input is not finite; return ``""`` when each of ``blocks`` takes the previous block's output and
    the same other arguments as the first (then the block pipeline is the model's), else why not.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pat_callbacks.oneshot.calibration import input_readers
        >>> class Skip(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.used(x)
        >>> net = Skip()
        >>> check_forward(net, input_readers(net, ["used.weight", "unused.weight"]), torch.ones(1, 2))
        Traceback (most recent call last):
        ...
        ValueError: The calibration forward never runs the module of ['unused.weight'] (on the first batch): \
leave them dense with exclude=[...] or give a `forward` that reaches them
    """
    forward = forward or default_forward
    modules = dict(model.named_modules(remove_duplicate=False))
    reached: set[str] = set()
    bad: dict[str, None] = {}
    chain: list[str] = []
    state: dict[str, Any] = {}

    def reader_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            reached.add(name)
            values = [*args, *kwargs.values()]
            if any(isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all() for v in values):
                bad[name] = None

        return hook

    def block_pre(index: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            arguments = _stateless(_bind(mod, args, kwargs))
            first = next(iter(inspect.signature(mod.forward).parameters))
            hidden = arguments.pop(first, None)
            if index == 0:
                state["arguments"] = arguments
            elif not chain:
                if hidden is not state.get("output") and not _same(hidden, state.get("output")):
                    chain.append(f"block {index} does not take block {index - 1}'s output")
                elif not _same(arguments, state["arguments"]):
                    chain.append(f"block {index} takes other arguments than block 0")
            state["index"] = index

        return hook

    def block_post(index: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            try:
                state["output"] = _hidden_of(output)
            except TypeError as error:
                chain.append(str(error))

        return hook

    handles = []
    try:
        for module_name in {reader.module for reader in readers.values()}:
            handles.append(modules[module_name].register_forward_pre_hook(reader_hook(module_name), with_kwargs=True))
        if blocks is not None:
            for index, block in enumerate(blocks.modules):
                handles.append(block.register_forward_pre_hook(block_pre(index), with_kwargs=True))
                handles.append(block.register_forward_hook(block_post(index)))
        with _eval(model):
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, reader in readers.items() if reader.module not in reached]
    if missing:
        raise ValueError(
            f"The calibration forward never runs the module of {missing} (on the first batch): leave them dense "
            "with exclude=[...] or give a `forward` that reaches them"
        )
    holding = [name for name, reader in readers.items() if reader.module in bad]
    if holding:
        raise ValueError(f"The calibration inputs of {holding} hold NaN or Inf (on the first batch): nothing pruned")
    if blocks is not None and not chain and state.get("index") != len(blocks.modules) - 1:
        chain.append("not every block runs, in order")
    return chain[0] if chain else ""


# ---------------------------------------------------------------------------------------------- cached inputs
@dataclass
class BlockInputs:
    """The inputs of the current block for every calibration batch: ``hidden`` (its first argument), ``arguments``
    (the others, by name; the same for every block), ``masks`` (each batch's attention mask, or ``None``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> BlockInputs(hidden=[torch.ones(1, 2)], arguments=[{}], masks=[None]).run(nn.Identity(), 0).tolist()
        [[1.0, 1.0]]
    """

    hidden: list[Tensor]
    arguments: list[dict[str, Any]]
    masks: list[Tensor | None] = field(default_factory=list)

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        blocks: Blocks,
        batches: Sequence[Any],
        forward: Callable[[nn.Module, Any], Any] | None = None,
        device: torch.device | str | None = None,
    ) -> BlockInputs:
        """Run ``forward(model, batch)`` up to the first block for every batch, storing its inputs (moved to
        ``device``; the forward stops there, so no loss is computed and later blocks never run)."""
        forward = forward or default_forward
        target = None if device is None else torch.device(device)
        first = blocks.modules[0]
        hidden: list[Tensor] = []
        arguments: list[dict[str, Any]] = []

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            named = _stateless(_bind(mod, args, kwargs))
            hidden.append(_to(named.pop(next(iter(inspect.signature(mod.forward).parameters))), target))
            arguments.append(_to(named, target))
            raise _Caught

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with _eval(model):
                for index, batch in enumerate(batches):
                    try:
                        forward(model, batch)
                    except _Caught:
                        continue
                    raise ValueError(f"The calibration forward of batch {index} never ran block {blocks.name(0)!r}")
        finally:
            handle.remove()
        for index, tensor in enumerate(hidden):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(
                    f"The inputs of block {blocks.name(0)!r} hold NaN or Inf on calibration batch {index}: the "
                    "calibration data (or the layers before the blocks) are not finite; nothing pruned"
                )
        masks = [attention_mask_of(batch) for batch in batches]
        return cls(hidden, arguments, masks)

    def run(self, block: nn.Module, index: int) -> Tensor:
        """Block ``block`` on the cached inputs of batch ``index``: its output hidden states."""
        return _call(block, self.arguments[index], self.hidden[index])

    def advance(self, block: nn.Module) -> None:
        """Replace the cached hidden states by ``block``'s outputs on them: the next block's inputs."""
        with _eval(block):
            self.hidden = [self.run(block, index) for index in range(len(self.hidden))]


@contextmanager
def offloaded(block: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """``block`` on ``device`` inside the ``with`` (its parameters keep their identity: moved in place), back on
    its own device afterwards; nothing moves when ``device`` is ``None``.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> weight = layer.weight
        >>> with offloaded(layer, torch.device("cpu")) as moved:
        ...     moved.weight is weight
        True
    """
    if device is None:
        yield block
        return
    home = {name: (t, t.device) for name, t in [*block.named_parameters(), *block.named_buffers()]}
    homes = {t.device for t, _ in home.values()}
    block.to(device)
    try:
        yield block
    finally:
        if len(homes) == 1:
            block.to(next(iter(homes)))
        else:
            for tensor, where in home.values():
                tensor.data = tensor.data.to(where)
