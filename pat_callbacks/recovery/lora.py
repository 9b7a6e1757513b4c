"""Mask-safe LoRA on a pruned model: adapters trained *under the mask* on the frozen pruned base, merged exactly.

PEFT (``peft`` on PyPI, the ``lora`` extra) is the maintained LoRA implementation: it covers ``nn.Linear``,
convolutions, embeddings and Hugging Face GPT-2 ``Conv1D`` (``fan_in_fan_out``), saves adapters on their own and
is what the users of the retired tools already run. :func:`add_lora` fills in a ``LoraConfig`` and, by default
(``masked=True``), makes each adapter's forward ``W x + (mask ⊙ B·A · scaling) x``: the adapter learns only what
the kept weights can hold, so :func:`merge_lora` (``W + mask ⊙ Δw``) gives exactly the trained model, every
pruned weight exactly zero and an N:M layer still N:M. (A dense adapter, ``masked=False``, learns a delta whose
pruned entries the merge must drop: on a 3-layer MLP pruned to 70% and trained 300 steps to match its dense self,
the MSE went 0.0057 pruned → 0.0012 with dense adapters → 0.0043 merged, against 0.0014 → 0.0014 for masked ones
(r=8; ``tests/recovery/test_lora.py`` checks the pattern on a smaller run). :func:`merge_lora` warns with what a
dense merge lost.)

How the mask enters the forward: as a PEFT *LoRA variant* (the extension point PEFT's DoRA uses) set on each
adapted layer: PEFT still runs the base layer, casts, dropout and the disable / merge bookkeeping; the variant adds
``dropout(x) @ (mask ⊙ Δw)ᵀ`` instead of ``B(A(dropout(x)))``, and PEFT's own ``merge_adapter`` /
``merge_and_unload`` merge the masked delta too. A forward hook would have to discard the dense output PEFT already
computed, and a parametrization of the base weight renames its state_dict key and cannot see ``A`` and ``B``. The
cost: each forward forms the layer's ``out x in`` delta (the masked product is not low-rank), one weight-sized
tensor per adapted layer kept for backward. The mask is a non-persistent buffer ``pat_lora_mask`` of the layer
(not in any state_dict; it follows ``.to(device)``).

The mask of each weight is taken from a given :class:`~pat_callbacks.core.masks.MaskStore` or ``{name: mask}``
(names of the model before wrapping, e.g. ``transformer.h.0.attn.c_attn.weight``), else from the weight's
exact zeros (``w != 0`` is kept), which is what a pruned checkpoint carries.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     _ = base[0].weight.mul_(torch.rand(8, 8) > 0.5)               # a pruned layer
    >>> zeros = base[0].weight == 0
    >>> model = add_lora(base, target_modules=["0"], r=2)                  # base frozen, masked adapters trainable
    >>> with torch.no_grad():                                              # stand-in for training the adapters
    ...     _ = model.base_model.model[0].lora_B["default"].weight.normal_()
    >>> x = torch.randn(4, 8)
    >>> trained = model(x)
    >>> merged = merge_lora(model)
    >>> torch.equal(merged[0].weight == 0, zeros)                          # exactly the pruned weights are zero
    True
    >>> torch.allclose(merged(x), trained, atol=1e-6)                      # and the merged model is the trained one
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pat_callbacks.core.masks import MaskStore

__all__ = ["add_lora", "lora_modules", "merge_lora"]

_PREFIX = "base_model.model."
_MASK = "pat_lora_mask"


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - the extra is installed in dev / CI
        raise ImportError("Mask-safe LoRA needs PEFT: pip install 'pat-callbacks[lora]'") from error
    return peft


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _masked_delta(layer: nn.Module, adapter: str) -> Tensor:
    """``mask ⊙ Δw`` of ``adapter`` in the base weight's layout (``in x out`` for a Conv1D)."""
    delta = layer.get_delta_weight(adapter)
    return delta * getattr(layer, _MASK).to(delta.dtype)


def _masked_variant() -> Any:
    """The PEFT LoRA variant whose forward adds ``dropout(x) @ (mask ⊙ Δw)ᵀ`` and whose merges add ``mask ⊙ Δw``."""
    peft = _peft()

    class MaskedLora(peft.tuners.lora.layer.LoraVariant):
        @staticmethod
        def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            """Nothing to set up: the mask is the layer's ``pat_lora_mask`` buffer."""

        @staticmethod
        def merge_safe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
            return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> None:
            orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
            return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def forward(module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
            delta = _masked_delta(module, active_adapter)
            if module.fan_in_fan_out:
                delta = delta.t()  # Conv1D stores (in, out); F.linear takes (out, in)
            lora_b = module.lora_B[active_adapter]
            bias = None if lora_b.bias is None else lora_b.bias * module.scaling[active_adapter]
            x = module.lora_dropout[active_adapter](x)
            return result + F.linear(x.to(delta.dtype), delta, bias)

    return MaskedLora()


def add_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str] | str | None = None,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    masked: bool = True,
    masks: MaskStore | Mapping[str, Tensor] | None = None,
    **config: Any,
) -> Any:
    """Wrap ``model`` with PEFT LoRA adapters; the base (pruned) weights are frozen.

    Args:
        model: the pruned model.
        target_modules: module names (or suffixes) PEFT puts adapters on; default: every ``nn.Linear`` and
            Hugging Face ``Conv1D`` (PEFT's ``"all-linear"`` skips output heads, so the names are listed here).
        r, alpha, dropout: LoRA rank, scaling numerator (default ``2 * r``) and dropout.
        masked: train each adapter under its layer's mask (forward ``W + mask ⊙ B·A``), so that the merge is
            exactly the trained model; ``False``: PEFT's dense adapters, whose pruned entries the merge drops
            (:func:`merge_lora` warns with what that loses).
        masks: the pruning masks (``True`` = kept) by the unwrapped model's parameter names; default: each
            weight's non-zeros. With ``masked=True`` the base weights outside the mask are zeroed here (in place),
            so the trained model is the pruned one.
        config: any other ``peft.LoraConfig`` argument.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ValueError: a bad ``r``, or ``masked=True`` on a layer other than a Linear / Conv1D (PEFT's LoRA for
            convolutions and embeddings has no masked forward here: pass ``masked=False``).

    Example:
        >>> model = add_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), r=2)
        >>> sorted(lora_modules(model))                       # every nn.Linear got an adapter
        ['0', '2']
        >>> any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)   # the base is frozen
        False
    """
    peft = _peft()
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"Expected `r` to be an integer >= 1, but got {r!r}")
    if not isinstance(masked, bool):
        raise ValueError(f"Expected `masked` to be a bool, but got {masked!r}")
    if isinstance(masks, MaskStore):
        masks = masks.masks
    if target_modules is None:
        target_modules = [
            name for name, m in model.named_modules() if name and (isinstance(m, nn.Linear) or _is_hf_conv1d(m))
        ]
        if not target_modules:
            raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to put adapters on")
    fan_in_fan_out = any(_is_hf_conv1d(m) for m in model.modules())
    lora_config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        fan_in_fan_out=config.pop("fan_in_fan_out", fan_in_fan_out),
        **config,
    )
    peft_model = peft.get_peft_model(model, lora_config)
    if masked:
        try:
            _mask_adapters(peft_model, masks)
        except ValueError:
            peft_model.unload()  # the model as it was given
            raise
    return peft_model


@torch.no_grad()
def _mask_adapters(model: nn.Module, masks: Mapping[str, Tensor] | None) -> None:
    """Give every LoRA layer of ``model`` its mask buffer and the masked variant; zero the base outside the mask."""
    peft = _peft()
    variant = _masked_variant()
    layers = lora_modules(model)
    for name, layer in layers.items():  # every check before anything changes
        if not isinstance(layer, peft.tuners.lora.Linear):
            raise ValueError(
                f"Masked LoRA covers Linear and Conv1D layers; {name!r} is a {type(layer.get_base_layer()).__name__}: "
                "leave it out of `target_modules` or pass masked=False"
            )
        if layer.lora_variant:
            raise ValueError(f"Adapters of {name!r} already use a LoRA variant (DoRA?): pass masked=False")
    found = {name: _mask_for(name, layer.get_base_layer().weight, masks) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.get_base_layer().weight.mul_(found[name])
        layer.register_buffer(_MASK, found[name], persistent=False)
        for adapter in layer.lora_A:
            layer.lora_variant[adapter] = variant


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name in the unwrapped model: LoRA layer}`` of a PEFT model.

    Example:
        >>> list(lora_modules(add_lora(nn.Sequential(nn.Linear(4, 4)), target_modules=["0"], r=2)))
        ['0']
    """
    peft = _peft()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layers[name.removeprefix(_PREFIX)] = module
    return layers


def _mask_for(name: str, weight: Tensor, masks: Mapping[str, Tensor] | None) -> Tensor:
    """The mask of layer ``name``'s weight: from ``masks`` by the unwrapped name (or the wrapped model's
    ``base_model.model.<name>.base_layer.weight``), else the weight's non-zeros."""
    keys = (f"{name}.weight", f"{_PREFIX}{name}.base_layer.weight", f"{name}.base_layer.weight")
    key = next((k for k in keys if masks is not None and k in masks), None)
    if key is None:
        return weight != 0
    mask = masks[key]  # type: ignore[index]
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"Mask for {key!r} has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
    return mask.to(weight.device, torch.bool)


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    masks: MaskStore | Mapping[str, Tensor] | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> nn.Module:
    """Merge the active LoRA adapters into the base weights with the delta masked, and remove the adapters.

    Adapters trained under the mask (``add_lora(masked=True)``, the default) merge into exactly the trained model,
    with the mask they were trained under. Dense adapters (``masked=False``) lose the delta's pruned entries: a
    ``UserWarning`` says which share of the delta was dropped and, with ``evaluate``, the loss before and after.

    Args:
        model: a ``peft.PeftModel`` (from :func:`add_lora` or PEFT directly).
        masks: the pruning masks (``True`` = kept), by the unwrapped model's parameter names; default: the
            base weights' non-zeros. Masked adapters merge under the mask they were trained under; a given mask
            that prunes an entry it keeps is refused.
        evaluate: ``model -> loss`` (e.g. on a held-out batch), run before and after merging dense adapters to
            report what the masked merge lost.

    Returns:
        The unwrapped base model, its weights ``w + mask ⊙ Δw``: every pruned weight exactly zero.

    Example:
        >>> base = nn.Sequential(nn.Linear(4, 4))
        >>> mask = torch.tensor([[True, False] * 2] * 4)
        >>> model = add_lora(base, target_modules=["0"], r=2, masks={"0.weight": mask})
        >>> with torch.no_grad():
        ...     _ = model.base_model.model[0].lora_B["default"].weight.fill_(1.0)
        >>> merged = merge_lora(model)
        >>> torch.equal(merged[0].weight != 0, mask)
        True
    """
    if isinstance(masks, MaskStore):
        masks = masks.masks
    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer to merge")
    merged = [name for name, layer in layers.items() if getattr(layer, "merged", False)]
    if merged:
        raise ValueError(f"Adapters of {merged} are already merged by PEFT: unmerge_adapter() first")
    dense = {name: layer for name, layer in layers.items() if getattr(layer, _MASK, None) is None}
    before = None if evaluate is None or not dense else float(evaluate(model))
    dropped: dict[str, float] = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        mask = _mask_for(name, weight, masks)
        trained = getattr(layer, _MASK, None)
        if trained is not None:
            if bool((trained & ~mask).any()):
                raise ValueError(
                    f"The mask given for {name!r} prunes {int((trained & ~mask).sum())} entries that its adapter "
                    "was trained to update (it was trained under another mask): the merge would not be the trained "
                    "model"
                )
            mask = trained  # the given mask keeps at least those (e.g. a kept weight that is exactly 0)
        lost = total = 0.0
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            delta = layer.get_delta_weight(adapter).to(weight.dtype)
            weight.add_(delta * mask)
            if trained is None:
                lost += float(delta.float().masked_fill(mask, 0).pow(2).sum())
                total += float(delta.float().pow(2).sum())
            lora_b = layer.lora_B[adapter]
            if lora_b.bias is not None and layer.get_base_layer().bias is not None:
                layer.get_base_layer().bias.add_(lora_b.bias * layer.scaling[adapter])
        weight.mul_(mask)  # pruned entries exactly zero, whatever the base held there
        if trained is None and total > 0:
            dropped[name] = math.sqrt(lost / total)
    unloaded = model.unload()
    for layer in layers.values():
        layer._buffers.pop(_MASK, None)
    if dropped:
        worst = max(dropped, key=dropped.__getitem__)
        message = (
            f"Merging dense LoRA adapters (add_lora(masked=False)) dropped their deltas' pruned entries: up to "
            f"{dropped[worst]:.1%} of a delta's norm ({worst!r}), so the merged model is not the trained one"
        )
        if evaluate is not None:
            after = float(evaluate(unloaded))
            message += f"; loss {before:.6g} with the adapters -> {after:.6g} merged ({after - before:+.6g})"
        warnings.warn(message + ". Train the adapters under the mask instead (masked=True, the default)", stacklevel=2)
    return unloaded
