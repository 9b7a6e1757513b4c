"""Mask-safe LoRA on a pruned model: PEFT adapters on the frozen pruned base, and a merge that keeps the zeros.

PEFT (``peft`` on PyPI, the ``lora`` extra) is the maintained LoRA implementation: it covers ``nn.Linear``,
convolutions, embeddings and Hugging Face GPT-2 ``Conv1D`` (``fan_in_fan_out``), saves adapters on their own and
is what the users of the retired tools already run. It is used as is: :func:`add_lora` only fills in a
``LoraConfig``. A plain PEFT merge (``merge_and_unload``) adds the dense low-rank product ``B·A`` to every weight,
so each pruned zero becomes non-zero and an N:M layer becomes dense; :func:`merge_lora` instead adds
``mask ⊙ (B·A · scaling)``, so every pruned weight stays exactly zero, the kept ones get the adapter's update,
and an N:M layer keeps its pattern (counted on the merged weights).

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
    >>> model = add_lora(base, target_modules=["0"], r=2)                  # base frozen, adapters trainable
    >>> with torch.no_grad():                                              # stand-in for training the adapters
    ...     _ = model.base_model.model[0].lora_B["default"].weight.normal_()
    >>> merged = merge_lora(model)
    >>> torch.equal(merged[0].weight == 0, zeros)                          # exactly the pruned weights are zero
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.masks import MaskStore

__all__ = ["add_lora", "lora_modules", "merge_lora"]

_PREFIX = "base_model.model."


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - the extra is installed in dev / CI
        raise ImportError("Mask-safe LoRA needs PEFT: pip install 'pat-callbacks[lora]'") from error
    return peft


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def add_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str] | str | None = None,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    **config: Any,
) -> Any:
    """Wrap ``model`` with PEFT LoRA adapters; the base (pruned) weights are frozen.

    Args:
        model: the pruned model.
        target_modules: module names (or suffixes) PEFT puts adapters on; default: every ``nn.Linear`` and
            Hugging Face ``Conv1D`` (PEFT's ``"all-linear"`` skips output heads, so the names are listed here).
        r, alpha, dropout: LoRA rank, scaling numerator (default ``2 * r``) and dropout.
        config: any other ``peft.LoraConfig`` argument.

    Returns:
        The ``peft.PeftModel``.

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
    return peft.get_peft_model(model, lora_config)


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
def merge_lora(model: nn.Module, masks: MaskStore | Mapping[str, Tensor] | None = None) -> nn.Module:
    """Merge the active LoRA adapters into the base weights with the delta masked, and remove the adapters.

    Args:
        model: a ``peft.PeftModel`` (from :func:`add_lora` or PEFT directly).
        masks: the pruning masks (``True`` = kept), by the unwrapped model's parameter names; default: the
            base weights' non-zeros.

    Returns:
        The unwrapped base model, its weights ``w + mask ⊙ Δw``: every pruned weight exactly zero.

    Example:
        >>> base = nn.Sequential(nn.Linear(4, 4))
        >>> mask = torch.tensor([[True, False] * 2] * 4)
        >>> model = add_lora(base, target_modules=["0"], r=2)
        >>> with torch.no_grad():
        ...     _ = model.base_model.model[0].lora_B["default"].weight.fill_(1.0)
        >>> merged = merge_lora(model, masks={"0.weight": mask})
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
        raise ValueError(f"Adapters of {merged} are already merged by PEFT (dense deltas): unmerge_adapter() first")
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        mask = _mask_for(name, weight, masks)
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            delta = layer.get_delta_weight(adapter).to(weight.dtype)
            weight.add_(delta * mask)
        weight.mul_(mask)  # pruned entries exactly zero, whatever the base held there
    return model.unload()
