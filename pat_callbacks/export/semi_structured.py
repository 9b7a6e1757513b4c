"""2:4 semi-structured kernels for GPU inference, kept only where they are faster.

cuSPARSELt's 2:4 kernels are slower than a dense GEMM at many common shapes (on an H200, bf16: 4096x4096 weights at
2k tokens run at 0.19x), so :func:`to_semi_structured` by default times each 2:4 layer on the input shape it really
sees (captured from an example input) and converts only the layers whose kernel beats the dense one; then it times
the whole model and undoes everything if the converted model is not faster. A :class:`SemiStructuredReport` says
per layer what was chosen and why, and the measured end-to-end speed-up.

Example:
    >>> from torch import nn
    >>> model = nn.Linear(8, 8)
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(8, 2))  # 2:4 along inputs
    >>> report = to_semi_structured(model, torch.randn(3, 8), kernel=lambda w: w.clone(),  # a stand-in kernel
    ...                             timer=lambda fn, key: 1.0 if key.endswith("2:4") else 2.0)
    >>> [(layer.name, layer.choice) for layer in report.layers], report.speedup
    ([('', '2:4')], 2.0)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_choice

__all__ = [
    "MODES",
    "LayerChoice",
    "SemiStructuredReport",
    "default_timer",
    "semi_structured_unavailable",
    "to_semi_structured",
]

MODES = ("timed", "all")
Timer = Callable[[Callable[[], Any], str], float]


def semi_structured_unavailable() -> str | None:
    """Why PyTorch's 2:4 kernels cannot run here (``None`` where they can): they need CUDA with compute capability
    >= 8.0 (Ampere, Hopper).

    Example:
        >>> reason = semi_structured_unavailable()
        >>> reason is None or "compute capability" in reason
        True
    """
    if not torch.cuda.is_available():
        return "to_semi_structured needs CUDA with compute capability >= 8.0; found no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return f"to_semi_structured needs CUDA with compute capability >= 8.0; found capability {capability}"
    return None


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`to_semi_structured` did with one layer.

    Attributes:
        name: the module's name in the model.
        kind: ``"Linear"`` or ``"Conv1D"`` (HF GPT-2's, stored in x out; converted as its transposed Linear).
        shape: ``(out_features, in_features)``.
        tokens: rows of the input the layer saw in the example (``None``: not seen).
        dense_ms: time of the dense layer on that input (``None``: not timed).
        sparse_ms: time of the 2:4 kernel on that input (``None``: not timed).
        choice: ``"2:4"`` or ``"dense"``.
        reason: why, in words.

    Example:
        >>> LayerChoice("fc", "Linear", (8, 8), 16, 1.0, 2.0, "dense", "the 2:4 kernel was slower").choice
        'dense'
    """

    name: str
    kind: str
    shape: tuple[int, int]
    tokens: int | None
    dense_ms: float | None
    sparse_ms: float | None
    choice: Literal["2:4", "dense"]
    reason: str


@dataclass
class SemiStructuredReport:
    """Per-layer choices and the end-to-end times of the example input (dense model, converted model).

    Example:
        >>> report = SemiStructuredReport(nn.Identity(), [], dense_ms=2.0, converted_ms=1.6)
        >>> report.speedup, report.converted
        (1.25, 0)
    """

    model: nn.Module
    layers: list[LayerChoice] = field(default_factory=list)
    dense_ms: float | None = None
    converted_ms: float | None = None
    reverted: bool = False

    @property
    def converted(self) -> int:
        """Number of layers running the 2:4 kernel."""
        return sum(layer.choice == "2:4" for layer in self.layers)

    @property
    def speedup(self) -> float | None:
        """Dense time over converted time of the example input (``None`` where not timed)."""
        if self.dense_ms is None or self.converted_ms is None or self.converted_ms <= 0:
            return None
        return self.dense_ms / self.converted_ms

    def __str__(self) -> str:
        lines = [
            "| layer | kind | out x in | tokens | dense ms | 2:4 ms | choice | why |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in self.layers:
            lines.append(
                f"| {x.name or '(model)'} | {x.kind} | {x.shape[0]}x{x.shape[1]} | {x.tokens if x.tokens else '-'} | "
                f"{_ms(x.dense_ms)} | {_ms(x.sparse_ms)} | {x.choice} | {x.reason} |"
            )
        speedup = self.speedup
        lines.append(
            f"{self.converted} of {len(self.layers)} layers on the 2:4 kernel; example input end to end: dense "
            f"{_ms(self.dense_ms)} ms, converted {_ms(self.converted_ms)} ms"
            + (f" ({speedup:.3f}x)" if speedup is not None else "")
            + (" -> slower, so every layer was put back to dense" if self.reverted else "")
        )
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _as_out_in(module: nn.Module) -> Tensor:
    """The weight as ``out x in`` (a Conv1D stores ``in x out``)."""
    weight = module.weight.detach()
    return weight.t() if _is_conv1d(module) else weight


def _is_two_four(weight: Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs (and some zeros at all)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((groups <= 2).all())


def default_timer(fn: Callable[[], Any], key: str, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA), after ``warmup`` calls.

    Example:
        >>> default_timer(lambda: sum(range(100)), "example", repeats=3) >= 0
        True
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _input_rows(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    """Rows (tokens) of the input each named layer sees in one forward of the example (hooks removed after)."""
    rows: dict[str, int] = {}
    modules = dict(model.named_modules())

    def seen(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            rows.setdefault(name, args[0].numel() // max(args[0].shape[-1], 1))

        return hook

    handles = [modules[name].register_forward_pre_hook(seen(name)) for name in names]
    try:
        with torch.inference_mode():
            _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear_of(module: nn.Module, weight: Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing what ``module`` does, holding ``weight`` (out x in, maybe a 2:4 tensor)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def to_semi_structured(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    mode: Literal["timed", "all"] = "timed",
    min_speedup: float = 1.0,
    timer: Timer | None = None,
    kernel: Callable[[Tensor], Tensor] | None = None,
) -> SemiStructuredReport:
    """Hand 2:4-sparse ``nn.Linear`` and HF ``Conv1D`` weights to PyTorch's semi-structured kernels, in place, for
    GPU inference (CUDA with compute capability >= 8.0; fp16/bf16 weights). Returns a :class:`SemiStructuredReport`.

    Train with ``GradualPruning(pattern="2:4")`` first (groups of 4 consecutive inputs). Layers whose weights are not
    2:4 stay as they are. A ``Conv1D`` (stored in x out) is replaced by the ``nn.Linear`` of its transposed weight.

    Args:
        model: the pruned model (on the GPU, in its inference dtype).
        example_inputs: a real input (tensor, tuple of positional inputs or dict of keyword inputs); needed by
            ``mode="timed"``, optional with ``"all"`` (then the end-to-end time is measured too).
        mode: ``"timed"`` (default) converts a layer only where its 2:4 kernel is at least ``min_speedup`` times
            faster than its dense layer on the input shape it sees in ``example_inputs``, then puts every layer
            back to dense if the whole converted model is slower on ``example_inputs``; ``"all"`` converts every
            2:4 layer (the kernel may be slower at your shapes).
        min_speedup: the per-layer speed-up a conversion needs in ``"timed"`` mode.
        timer: ``timer(fn, key) -> seconds`` (default: median of 20 synchronised calls); ``key`` is
            ``"<layer>:dense"``, ``"<layer>:2:4"``, ``"model:dense"`` or ``"model:2:4"``. For tests.
        kernel: the conversion of an ``out x in`` weight (default ``torch.sparse.to_sparse_semi_structured``);
            an injected one skips the CUDA check (for tests).

    Elsewhere (CPU, GPUs before Ampere) it raises, naming what is missing, rather than silently doing nothing.

    Example:
        >>> to_semi_structured(nn.Linear(8, 8), torch.zeros(1, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: to_semi_structured needs CUDA with compute capability >= 8.0; ...
    """
    check_choice("mode", mode, MODES)
    if not min_speedup > 0:
        raise ValueError(f"Expected argument `min_speedup` to be > 0, but got {min_speedup}")
    if kernel is None:
        reason = semi_structured_unavailable()
        if reason is not None:
            raise RuntimeError(f"{reason}. On a CPU use to_sparse_inference (CSR) instead")
        from torch.sparse import to_sparse_semi_structured as kernel
    if mode == "timed" and example_inputs is None:
        raise ValueError(
            "to_semi_structured(mode='timed') times each layer on the input it sees: pass example_inputs (a real "
            "batch), or mode='all' to convert every 2:4 layer untimed"
        )
    timer = timer or default_timer
    report = SemiStructuredReport(model)
    candidates = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) or _is_conv1d(module)
    }
    rows = _input_rows(model, list(candidates), example_inputs) if example_inputs is not None else {}
    if example_inputs is not None:
        report.dense_ms = 1e3 * timer(lambda: _forward(model, example_inputs), "model:dense")
    originals: dict[str, tuple[nn.Module, nn.Parameter | None]] = {}
    for name, module in candidates.items():
        choice, replacement = _choose(name, module, rows.get(name), mode, min_speedup, timer, kernel)
        report.layers.append(choice)
        if replacement is not None:
            originals[name] = (module, _replace(model, name, module, replacement))
    if example_inputs is not None and originals:
        report.converted_ms = 1e3 * timer(lambda: _forward(model, example_inputs), "model:2:4")
        if mode == "timed" and report.converted_ms >= report.dense_ms:
            for name, (module, dense) in originals.items():
                _put_back(model, name, module, dense)
            report.reverted = True
            report.layers = [
                _dense(x, "end to end the converted model was slower") if x.choice == "2:4" else x
                for x in report.layers
            ]
            report.converted_ms = report.dense_ms
    elif example_inputs is not None:
        report.converted_ms = report.dense_ms
    return report


def _dense(choice: LayerChoice, reason: str) -> LayerChoice:
    return LayerChoice(
        choice.name, choice.kind, choice.shape, choice.tokens, choice.dense_ms, choice.sparse_ms, "dense", reason
    )


def _choose(
    name: str,
    module: nn.Module,
    tokens: int | None,
    mode: str,
    min_speedup: float,
    timer: Timer,
    kernel: Callable[[Tensor], Tensor],
) -> tuple[LayerChoice, Tensor | None]:
    """The choice for one layer, and its 2:4 weight where converted."""
    kind = "Conv1D" if _is_conv1d(module) else "Linear"
    weight = _as_out_in(module)
    shape = (int(weight.shape[0]), int(weight.shape[1]))

    def choice(picked: str, why: str, dense: float | None = None, sparse: float | None = None) -> LayerChoice:
        return LayerChoice(name, kind, shape, tokens, dense, sparse, picked, why)  # type: ignore[arg-type]

    if not _is_two_four(weight):
        return choice("dense", "not 2:4 along its inputs"), None
    if kind == "Conv1D" and not name:
        return choice("dense", "a bare Conv1D cannot be replaced in place; convert the model holding it"), None
    if mode == "timed" and tokens is None:
        return choice("dense", "not run by the example input"), None
    try:
        sparse = kernel(weight.contiguous())
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:  # shape, dtype or device refused
        return choice("dense", f"the 2:4 kernel refused it: {str(error).splitlines()[0][:120]}"), None
    if mode == "all":
        return choice("2:4", "mode='all'"), sparse
    x = torch.randn(tokens, shape[1], dtype=weight.dtype, device=weight.device)
    bias = None if module.bias is None else module.bias.detach()
    dense_ms = 1e3 * timer(lambda: nn.functional.linear(x, weight, bias), f"{name}:dense")
    sparse_ms = 1e3 * timer(lambda: nn.functional.linear(x, sparse, bias), f"{name}:2:4")
    ratio = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
    if ratio >= min_speedup and sparse_ms < dense_ms:
        return choice("2:4", f"{ratio:.2f}x faster at {tokens} tokens", dense_ms, sparse_ms), sparse
    return choice("dense", f"the kernel is {ratio:.2f}x of dense at {tokens} tokens", dense_ms, sparse_ms), None


def _replace(model: nn.Module, name: str, module: nn.Module, sparse: Tensor) -> nn.Parameter | None:
    """Put the 2:4 weight in; returns the dense weight it took out of an ``nn.Linear`` (``None``: a replaced
    Conv1D, which itself is the original)."""
    if _is_conv1d(module):
        _set_module(model, name, _linear_of(module, sparse))
        return None
    dense = module.weight
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return dense


def _put_back(model: nn.Module, name: str, original: nn.Module, dense: nn.Parameter | None) -> None:
    if dense is None:
        _set_module(model, name, original)
    else:
        original.weight = dense
