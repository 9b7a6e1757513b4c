"""Fake-quantized training (QAT) of the kept weights: symmetric int8 / int4, weight-only, masks enforced.

Quantization is symmetric (no zero point): ``q = clamp(round(w / s), -qmax, qmax)``, ``ŵ = q · s`` with
``qmax = 2^(bits-1) - 1`` (127 for int8, 7 for int4), one scale ``s`` per output channel (``group_size=None``)
or per group of ``group_size`` consecutive inputs of a channel. Zero maps to exactly zero, so a pruned weight is
still exactly zero after quantize / dequantize, and N:M groups keep their pattern; the masks are multiplied in
as well, in case a weight and its mask disagree.

Scales are ``max|w| / qmax`` rounded *down* to a bfloat16 value (8 significant bits; stored as bf16 by
:mod:`pat_callbacks.export.quantized`). Rounding down clips the largest weight of a group by at most 1 part in
256, and makes quantization idempotent: quantizing dequantized weights gives back the same ``q`` and ``s`` bit for
bit, so a model whose weights were finalized (:meth:`FakeQuantizer.finalize_`) exports and loads back exactly.

Half-precision weights (``bf16-true`` / ``16-true``) hold ``q · s`` rounded to their dtype (``q · s`` needs up to
15 significant bits; bf16 has 8, fp16 11), and that rounding can move a group's largest weight below
``qmax · s``, so that ``max|w| / qmax`` rounds down to the bf16 value below ``s``. A group of a bf16 / fp16 tensor
whose values are exactly the dequantized values of the next bf16 scale up, and not of the rounded-down one, is
therefore given that scale: quantizing the finalized weights gives back ``q`` and ``s``, and loading gives back
the weights bit for bit, in float32 / float64, in bfloat16, and in float16 wherever every group's largest weight is
a normal float16 (at least ``2**-14``, about 6.1e-5; below that fp16's subnormals cannot hold the codes). A fresh
(not yet quantized) weight is on neither grid and gets the rounded-down scale, in every dtype.

Which weights: :func:`quantized_parameters` (the weights of Linear, Conv, MultiheadAttention and Hugging Face
Conv1D layers, frozen ones included, or ``include`` / ``exclude``), the one rule of both
:class:`FakeQuantizer` (QAT) and :func:`~pat_callbacks.export.quantized.save_quantized`, so the exported model is
the one QAT trained and evaluated. With a group size, a weight whose inputs per output channel the group does not
divide (e.g. the 5 inputs of a first convolution with a kernel of 5) is quantized per channel by both
(:meth:`QuantSpec.for_inputs`); :func:`quantize_tensor` itself refuses such a group size, naming the shape.

Training: :class:`FakeQuantizer` writes the fake-quantized values into the weights before a forward / backward
and the full-precision ("master") values back before the optimizer step. The gradient computed at ``ŵ`` is
applied to ``w``: the straight-through estimator (``dŵ/dw := 1``; with absmax scales nothing is clipped, so it is
exactly the identity). No forward hook, no parametrization, no module swap: the modules, their ``forward`` and
the state_dict keys are untouched, every layer type with a weight matrix is covered (``nn.Linear``, convolutions,
``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj`` which it reads directly, Hugging Face ``Conv1D``),
and the masks of a pruning callback keep applying to the same parameter objects. The cost: one full-precision
copy of the quantized weights, and one quantize + two copies per forward / backward.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.5, -1.0, 0.25]])
    >>> fake_quantize(w, QuantSpec(bits=4)).tolist()   # scale 1/7 rounded down to bf16: 0.142578125
    [[0.0, 0.5703125, -0.998046875, 0.28515625]]
    >>> q, s = quantize_tensor(w, QuantSpec(bits=4))
    >>> q.tolist(), s.dtype
    ([[0, 4, -7, 2]], torch.bfloat16)
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pat_callbacks.core.targets import select_parameters, target_roles

__all__ = [
    "FakeQuantizer",
    "QuantSpec",
    "dequantize_tensor",
    "fake_quantize",
    "layer_specs",
    "quantize_tensor",
    "quantized_parameters",
    "ste_fake_quantize",
]

_BF16_MASK = -65536  # 0xFFFF0000 as int32: the bits a float32 keeps when truncated to bfloat16


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized: ``bits`` (8 or 4), symmetric, one scale per output channel
    (``group_size=None``) or per ``group_size`` consecutive inputs of each channel.

    Example:
        >>> QuantSpec.parse("int4:g32")
        QuantSpec(bits=4, group_size=32)
        >>> QuantSpec(bits=3)
        Traceback (most recent call last):
        ...
        ValueError: Expected `bits` to be 8 or 4, but got 3
    """

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (8, 4):
            raise ValueError(f"Expected `bits` to be 8 or 4, but got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"Expected `group_size` to be None or an integer >= 1, but got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        """The largest quantized magnitude: 127 (int8) or 7 (int4)."""
        return 2 ** (self.bits - 1) - 1

    @classmethod
    def parse(cls, spec: str | QuantSpec) -> QuantSpec:
        """``"int8"`` (per channel), ``"int4"`` (per channel), ``"int8:g64"`` / ``"int4:g32"`` (group-wise)."""
        if isinstance(spec, QuantSpec):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"Expected a quantization like 'int8' or 'int4:g32', but got {spec!r}")
        kind, _, group = spec.partition(":")
        bits = {"int8": 8, "int4": 4}.get(kind)
        if bits is None or (group and not (group.startswith("g") and group[1:].isdigit())):
            raise ValueError(f"Expected a quantization like 'int8', 'int4' or 'int4:g32', but got {spec!r}")
        return cls(bits=bits, group_size=int(group[1:]) if group else None)

    def __str__(self) -> str:
        return f"int{self.bits}" + (f":g{self.group_size}" if self.group_size else "")

    def for_inputs(self, inputs: int) -> QuantSpec:
        """The spec a weight with ``inputs`` inputs per output channel is quantized with by
        :class:`FakeQuantizer` and :func:`~pat_callbacks.export.quantized.save_quantized`: this one, or per channel
        (no group) when the group size does not divide ``inputs`` (e.g. the 5 inputs of a first convolution with a
        kernel of 5, or 75 = 15 channels x 5 under ``int4:g32``); the callback names those weights in one info line
        and the file records the spec of each tensor.

        Example:
            >>> [str(QuantSpec.parse("int4:g32").for_inputs(n)) for n in (5, 64, 75)]
            ['int4', 'int4:g32', 'int4']
        """
        if self.group_size is None or inputs % self.group_size == 0:
            return self
        return QuantSpec(self.bits)


def _rows(weight: Tensor, transposed: bool) -> Tensor:
    """The weight as ``(output channels, inputs)`` (a view where possible)."""
    if weight.dim() < 2:
        raise ValueError(f"Expected a weight with 2 or more dimensions, but got shape {tuple(weight.shape)}")
    if transposed:  # Hugging Face Conv1D stores (in, out)
        return weight.reshape(weight.shape[0], -1).t()
    return weight.reshape(weight.shape[0], -1)


def _grouped(rows: Tensor, spec: QuantSpec) -> Tensor:
    """``(channels, groups, group size)``; one group per channel when ``group_size`` is None."""
    channels, inputs = rows.shape
    size = spec.group_size or inputs
    if inputs % size:
        raise ValueError(
            f"{spec}: group_size={size} does not divide the {inputs} inputs of a weight of shape "
            f"{tuple(rows.shape)} (outputs, inputs); give a group size that divides {inputs}, quantize it per channel "
            f"({str(QuantSpec(spec.bits))!r}, what FakeQuantizer and save_quantized do for it) or exclude it"
        )
    return rows.reshape(channels, inputs // size, size)


def _on_grid(groups: Tensor, scales: Tensor, qmax: int) -> Tensor:
    """Per group: whether its values are exactly ``q · s`` rounded to their dtype (shape ``(channels, groups, 1)``)."""
    values = groups.detach().float()
    q = torch.clamp(torch.round(values / scales), -qmax, qmax)
    return ((q * scales).to(groups.dtype).float() == values).all(dim=-1, keepdim=True)


def _scales(groups: Tensor, qmax: int) -> Tensor:
    """``max|w| / qmax`` per group, rounded down to a bfloat16 value (float32, shape ``(channels, groups, 1)``);
    for a bf16 / fp16 tensor, the next bf16 value up where the group lies exactly on its grid (see the module
    docstring)."""
    amax = groups.detach().abs().amax(dim=-1, keepdim=True).float()
    exact = amax / qmax
    down = (exact.view(torch.int32) & _BF16_MASK).view(torch.float32)  # truncation: round down for positives
    tiny = torch.finfo(torch.bfloat16).tiny
    scales = torch.where(amax == 0, torch.ones_like(down), torch.where(down == 0, torch.full_like(down, tiny), down))
    if groups.dtype in (torch.bfloat16, torch.float16):  # their rounding of q·s may have lowered max|w|
        up = (scales.view(torch.int32) + 65536).view(torch.float32)  # the next bf16 value up
        recovered = _on_grid(groups, up, qmax) & ~_on_grid(groups, scales, qmax) & (amax > 0)
        scales = torch.where(recovered & torch.isfinite(up), up, scales)
    return scales


def quantize_tensor(weight: Tensor, spec: QuantSpec, *, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """``(q, scales)``: int8 values in ``[-qmax, qmax]`` with ``weight``'s shape, and bf16 scales of shape
    ``(channels, groups)``.

    Example:
        >>> q, s = quantize_tensor(torch.tensor([[2.0, -1.0], [0.0, 0.0]]), QuantSpec(bits=8))
        >>> q.tolist(), s.float().tolist()
        ([[127, -64], [0, 0]], [[0.0157470703125], [1.0]])
    """
    rows = _rows(weight, transposed)
    groups = _grouped(rows, spec)
    scales = _scales(groups, spec.qmax)
    q = torch.clamp(torch.round(groups.detach().float() / scales), -spec.qmax, spec.qmax).to(torch.int8)
    q = q.reshape(rows.shape)
    q = q.t() if transposed else q
    return q.reshape(weight.shape).contiguous(), scales.squeeze(-1).to(torch.bfloat16)


def dequantize_tensor(q: Tensor, scales: Tensor, spec: QuantSpec, *, transposed: bool = False) -> Tensor:
    """``q · s`` in float32, ``q``'s shape (the inverse of :func:`quantize_tensor` up to rounding).

    Example:
        >>> q, s = quantize_tensor(torch.tensor([[2.0, -1.0]]), QuantSpec(bits=8))
        >>> dequantize_tensor(q, s, QuantSpec(bits=8)).tolist()
        [[1.9998779296875, -1.0078125]]
    """
    rows = _rows(q, transposed)
    groups = _grouped(rows, spec)
    values = (groups.float() * scales.float().unsqueeze(-1)).reshape(rows.shape)
    values = values.t() if transposed else values
    return values.reshape(q.shape).contiguous()


def fake_quantize(weight: Tensor, spec: QuantSpec, *, transposed: bool = False, mask: Tensor | None = None) -> Tensor:
    """Quantize then dequantize ``weight`` (float32, no gradient), zeroing ``~mask`` entries if a mask is given.

    Example:
        >>> w = torch.tensor([[0.3, 0.0, -0.7, 0.1]])
        >>> bool((fake_quantize(w, QuantSpec(bits=4)) == 0).eq(w == 0).all())
        True
    """
    q, scales = quantize_tensor(weight, spec, transposed=transposed)
    values = dequantize_tensor(q, scales, spec, transposed=transposed)
    if mask is not None:
        values = values * mask.to(values.device, torch.bool)
    return values


def ste_fake_quantize(weight: Tensor, spec: QuantSpec, *, transposed: bool = False) -> Tensor:
    """``ŵ`` in the forward, identity gradient in the backward (straight-through), for a custom layer.

    Example:
        >>> w = torch.tensor([[0.3, -0.7]], requires_grad=True)
        >>> ste_fake_quantize(w, QuantSpec(bits=4)).sum().backward()
        >>> w.grad.tolist()
        [[1.0, 1.0]]
    """
    return weight + (fake_quantize(weight, spec, transposed=transposed).to(weight.dtype) - weight).detach()


def quantized_parameters(
    model: nn.Module, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """``({name: parameter}, transposed names)`` of the weights that are quantized, the one rule of QAT
    (:meth:`FakeQuantizer.from_model`) and of the quantized export
    (:func:`~pat_callbacks.export.quantized.quantize_state_dict`): those
    :func:`~pat_callbacks.core.targets.select_parameters` picks, frozen ones included (a frozen layer is quantized
    in training's forward as in the file; nothing trains it, the others learn around its rounding).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> model[0].requires_grad_(False) and None
        >>> list(quantized_parameters(model)[0])
        ['0.weight', '1.weight']
    """
    params = select_parameters(model, include, exclude, include_frozen=True)
    roles = target_roles(model)
    return params, [name for name in params if name in roles and roles[name].transposed]


def layer_specs(
    params: Mapping[str, Tensor], spec: QuantSpec | str, transposed: Collection[str] = ()
) -> dict[str, QuantSpec]:
    """``{name: the spec it is quantized with}`` (:meth:`QuantSpec.for_inputs` of its inputs per output channel).

    Example:
        >>> specs = layer_specs({"conv": torch.zeros(8, 1, 5), "fc": torch.zeros(4, 64)}, "int4:g32")
        >>> {name: str(s) for name, s in specs.items()}
        {'conv': 'int4', 'fc': 'int4:g32'}
    """
    spec = QuantSpec.parse(spec)
    return {name: spec.for_inputs(_rows(p.detach(), name in transposed).shape[1]) for name, p in params.items()}


class FakeQuantizer:
    """Swaps fake-quantized values into parameters for a forward / backward, and their full-precision values
    back before the optimizer step (see the module docstring).

    Args:
        params: ``{name: parameter}`` to quantize (weights with 2 or more dimensions).
        spec: a :class:`QuantSpec` or its string (``"int8"``, ``"int4:g32"``).
        transposed: names whose weights are stored ``(inputs, outputs)`` (Hugging Face ``Conv1D``).

    Example:
        >>> torch.manual_seed(0) and None
        >>> layer = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(torch.rand(4, 8) > 0.5)            # a pruned layer
        >>> quantizer = FakeQuantizer.from_model(layer, "int4")
        >>> master = layer.weight.detach().clone()
        >>> with quantizer.swapped():
        ...     loss = layer(torch.randn(2, 8)).sum()
        ...     levels = (layer.weight / quantizer.last_scales["weight"].float()).round().unique().numel()
        ...     loss.backward()                                           # gradient at the quantized weights
        >>> torch.equal(layer.weight, master), levels <= 15              # master back, at most 15 levels
        (True, True)
        >>> bool(((layer.weight == 0) <= (quantizer.fake_quantized()["weight"] == 0)).all())  # zeros stay
        True
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        spec: QuantSpec | str = "int8",
        *,
        transposed: Sequence[str] = (),
    ) -> None:
        if not params:
            raise ValueError("FakeQuantizer needs at least one parameter, but got none")
        self.spec = QuantSpec.parse(spec)
        self.params: dict[str, nn.Parameter] = dict(params)
        vectors = [name for name, p in self.params.items() if p.dim() < 2]
        if vectors:
            raise ValueError(f"Only weights with 2 or more dimensions are quantized, but got vectors {vectors}")
        unknown = sorted(set(transposed) - set(self.params))
        if unknown:
            raise ValueError(f"`transposed` names {unknown}, which are not among the quantized parameters")
        self.transposed = frozenset(transposed)
        self.specs = layer_specs(self.params, self.spec, self.transposed)  # a group size that fits each, now
        self._masters: dict[str, Tensor] = {}
        self.swapped_in = False
        self.last_scales: dict[str, Tensor] = {}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        spec: QuantSpec | str = "int8",
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> FakeQuantizer:
        """Quantize the weights :func:`quantized_parameters` picks (by default those of Linear, Conv,
        MultiheadAttention and Hugging Face Conv1D layers, frozen ones included; embeddings stay float)."""
        params, transposed = quantized_parameters(model, include, exclude)
        return cls(params, spec, transposed=transposed)

    @property
    def per_channel(self) -> list[str]:
        """The weights quantized per channel although ``spec`` has a group size (it does not divide their inputs)."""
        return [name for name, spec in self.specs.items() if spec != self.spec]

    def __repr__(self) -> str:
        return f"FakeQuantizer({len(self.params)} parameters, {self.spec}, swapped_in={self.swapped_in})"

    def _fake(self, name: str, value: Tensor, masks: Mapping[str, Tensor] | None) -> Tensor:
        spec = self.specs[name]
        q, scales = quantize_tensor(value, spec, transposed=name in self.transposed)
        self.last_scales[name] = scales
        out = dequantize_tensor(q, scales, spec, transposed=name in self.transposed)
        mask = masks.get(name) if masks else None
        if mask is not None:
            out = out * mask.to(out.device, torch.bool)
        return out.to(value.dtype)

    @torch.no_grad()
    def quantize_(self, masks: Mapping[str, Tensor] | None = None) -> None:
        """Keep the full-precision weights aside and write their fake-quantized values (``~mask`` entries zero)
        into the parameters. A no-op when already swapped in (e.g. the next micro-batch of an accumulation)."""
        if self.swapped_in:
            return
        for name, param in self.params.items():
            master = self._masters.get(name)
            if master is None or master.shape != param.shape or master.device != param.device:
                self._masters[name] = master = torch.empty_like(param.data)
            master.copy_(param.data)
            param.data.copy_(self._fake(name, param.data, masks))
        self.swapped_in = True

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the full-precision weights back (idempotent). Gradients computed meanwhile stay: the optimizer
        applies them to the full-precision weights (straight-through estimator)."""
        if not self.swapped_in:
            return
        for name, param in self.params.items():
            param.data.copy_(self._masters[name])
        self.swapped_in = False

    @contextmanager
    def swapped(self, masks: Mapping[str, Tensor] | None = None) -> Iterator[FakeQuantizer]:
        """Fake-quantized weights inside the block (forward and backward), full-precision ones after."""
        self.quantize_(masks)
        try:
            yield self
        finally:
            self.restore_()

    @torch.no_grad()
    def finalize_(self, masks: Mapping[str, Tensor] | None = None) -> None:
        """Make the fake-quantized values the weights for good (the full-precision copies are dropped)."""
        self.restore_()
        for name, param in self.params.items():
            param.data.copy_(self._fake(name, param.data, masks))
        self._masters = {}

    @torch.no_grad()
    def fake_quantized(self, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{name: ŵ}`` of the current full-precision weights, without touching the parameters."""
        source = self._masters if self.swapped_in else {n: p.data for n, p in self.params.items()}
        return {name: self._fake(name, source[name], masks) for name in self.params}

    def master_bytes(self) -> int:
        """Bytes of the full-precision copies held while training (0 before the first swap)."""
        return sum(t.numel() * t.element_size() for t in self._masters.values())
