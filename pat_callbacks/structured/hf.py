"""Hugging Face models after :func:`~pat_callbacks.structured.shrink`: a config that says what the weights hold, so
``save_pretrained`` + ``from_pretrained`` reload the smaller model, and a loader for what a config cannot express.

A Llama / Qwen2 / Mistral / Gemma config has one ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
``intermediate_size`` for every layer; a BERT (RoBERTa, MiniLM, ALBERT) config one ``intermediate_size``, a GPT-2
config one ``n_inner``. :func:`update_config` reads the sizes off the shrunk weights: when every layer has the same
ones (as uniform structured pruning leaves them), it writes them into the config and Hugging Face's own
``from_pretrained`` rebuilds the model. When layers differ (a layer kept whole with ``ignore=``), the config keeps the
largest sizes and records each layer's under ``pat_layer_sizes``; :func:`from_pretrained_shrunk` rebuilds that (and
plain checkpoints too). BERT (ALBERT) and GPT-2 attention has no head size of its own (it is the width over
``num_attention_heads``), so no config of theirs holds pruned heads: their counts are always recorded
(``attention_heads``), the config keeps the original count, :func:`update_config` says so (``shrink`` warns) and
:func:`from_pretrained_shrunk` rebuilds them. After writing, the config is checked: a model built from it (on the
``meta`` device, cut to the recorded sizes) must have the shrunk weights' shapes, or :func:`update_config` says which
weights differ and that only ``shrink`` with the same ``pruned`` rebuilds the model.

Example:
    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from pat_callbacks.structured import shrink
    >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(config).eval()
    >>> pruned = {f"model.layers.{i}.mlp.up_proj.weight": list(range(32)) for i in range(2)}
    >>> _ = shrink(model, None, pruned)
    >>> model.config.intermediate_size
    32
    >>> with tempfile.TemporaryDirectory() as path:
    ...     model.save_pretrained(path)
    ...     LlamaForCausalLM.from_pretrained(path).model.layers[0].mlp.up_proj.out_features
    32
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pat_callbacks.structured.reload import (
    _HEAD_KEYS,
    _HEADS,
    _OTHER_FFN,
    LAYER_SIZES_KEY,
    from_pretrained_shrunk,
    shrink_to_sizes,
)
from pat_callbacks.structured.roles import _ffn_roles, _gqa_shape, _is_conv1d

__all__ = [
    "LAYER_SIZES_KEY",
    "check_uniform",
    "from_pretrained_shrunk",
    "layer_sizes",
    "shrink_to_sizes",
    "update_config",
]

_WRITTEN = (*_HEAD_KEYS, "intermediate_size", "n_inner", "d_ff")  # the sizes a config holds, one per model
_FFN_KEYS = {
    ("c_fc", "c_proj"): "n_inner",
    ("intermediate.dense", "output.dense"): "intermediate_size",
    ("ffn", "ffn_output"): "intermediate_size",  # ALBERT
}
# MLPs not found by role (Torch-Pruning traces them): (up, down) Linear layers -> the config key sizing them
_TRACED_FFNS = {("wi", "wo"): "d_ff", ("wi_0", "wo"): "d_ff"}


def _pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost Hugging Face models in ``model`` (a module with ``config`` and ``save_pretrained``), one per
    config object."""
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "save_pretrained") or id(config) in seen:
            continue
        seen.add(id(config))
        found.append((name, module))
    return found


def _fixed_width_heads(module: nn.Module) -> int | None:
    """The head count of BERT-style self-attention (``query`` / ``key`` / ``value``) or GPT-2 self-attention
    (``c_attn`` / ``c_proj``), whose head size their config gives only as the width over the head count."""
    bert = all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
    if (
        bert
        and isinstance(getattr(module, "num_attention_heads", None), int)
        and hasattr(module, "attention_head_size")
    ):
        return int(module.num_attention_heads)
    gpt2 = _is_conv1d(getattr(module, "c_attn", None)) and _is_conv1d(getattr(module, "c_proj", None))
    if gpt2 and not getattr(module, "is_cross_attention", False) and hasattr(module, "num_heads"):
        return int(module.num_heads)
    return None


def _ffn_key(name: str, roles: tuple[str, str, str | None]) -> str | None:
    """The config key sizing an MLP with these (up, down, gate) roles; None for MLPs no config sizes."""
    if roles[2] is not None:  # a decoder layer's ``mlp`` is what ``intermediate_size`` sizes; any other is recorded
        return "intermediate_size" if name.endswith("mlp") else _OTHER_FFN
    return _FFN_KEYS.get(roles[:2])


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per attention and MLP of ``model`` (by module name) the sizes its weights have now: Llama-style attention
    (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) and gated MLPs (``intermediate_size``), BERT,
    ALBERT and GPT-2 attention (``attention_heads``) and MLPs (``intermediate_size``, ``n_inner``), T5 MLPs
    (``d_ff``).

    Example:
        >>> glu = nn.ModuleDict({n: nn.Linear(4, 8) for n in ("gate_proj", "up_proj")} | {"down_proj": nn.Linear(8, 4)})
        >>> layer_sizes(nn.ModuleDict({"mlp": glu}))
        {'mlp': {'intermediate_size': 8}}
    """
    sizes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        shape = _gqa_shape(module, name)
        if shape is not None:
            sizes[name] = dict(zip(_HEAD_KEYS, shape, strict=True))
        elif (heads := _fixed_width_heads(module)) is not None:
            sizes[name] = {_HEADS: heads}
        elif (roles := _ffn_roles(module)) is not None and (key := _ffn_key(name, roles)) is not None:
            up = module.get_submodule(roles[0])
            sizes[name] = {key: int(up.weight.shape[1] if _is_conv1d(up) else up.weight.shape[0])}
        elif (traced := _traced_ffn(module)) is not None:
            sizes[name] = dict([traced])
    return sizes


def _traced_ffn(module: nn.Module) -> tuple[str, int] | None:
    """(config key, width) of a T5 (``wi`` or ``wi_0`` / ``wo``) MLP."""
    for (up, down), key in _TRACED_FFNS.items():
        first, last = getattr(module, up, None), getattr(module, down, None)
        if isinstance(first, nn.Linear) and isinstance(last, nn.Linear):
            return key, int(first.out_features)
    return None


def _config_values(sizes: Mapping[str, Mapping[str, int]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(every size per config key, the keys whose layers differ: one config cannot hold them) of ``sizes``."""
    keys = [k for k in _WRITTEN if any(k in s for s in sizes.values())]
    values = {k: sorted({s[k] for s in sizes.values() if k in s}) for k in keys}
    uneven = {k: v for k, v in values.items() if len(v) > 1}
    if any(_OTHER_FFN in s for s in sizes.values()):
        uneven[_OTHER_FFN] = sorted({s[_OTHER_FFN] for s in sizes.values() if _OTHER_FFN in s})
    return values, uneven


def _largest(sizes: Mapping[str, Mapping[str, int]], values: Mapping[str, list[int]]) -> dict[str, int]:
    """The config sizes every layer of ``sizes`` can be cut down from: the largest of each, and as many query heads
    as the most key/value heads times the most query heads per key/value head (a layer of 8 heads over 2 key/value
    heads and one of 8 over 4 are both cut from 16 over 4)."""
    largest = {key: max(options) for key, options in values.items()}
    pairs = [(s["num_attention_heads"], s["num_key_value_heads"]) for s in sizes.values() if _HEAD_KEYS[1] in s]
    if pairs:
        largest["num_attention_heads"] = largest["num_key_value_heads"] * max(h // kv for h, kv in pairs)
    return largest


def _record(sizes: Mapping[str, Mapping[str, int]], built: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """``pat_layer_sizes``: per layer the sizes that differ from what the config builds; a layer whose attention
    differs gets all its head counts, so the rebuild never infers one from another."""
    record = {}
    for name, layer in sizes.items():
        differ = {key: value for key, value in layer.items() if value != built.get(key)}
        if any(key in differ for key in _HEAD_KEYS):
            differ |= {key: layer[key] for key in _HEAD_KEYS if key in layer}
        if differ:
            record[name] = differ
    return record


def _cut_heads(sizes: Mapping[str, Mapping[str, int]], config: Any) -> dict[str, int]:
    """The BERT / GPT-2 attention modules in ``sizes`` with another head count than ``config`` gives."""
    full = getattr(config, "num_attention_heads", None)
    return {name: s[_HEADS] for name, s in sizes.items() if _HEADS in s and s[_HEADS] != full}


def _not_uniform(prefix: str, hf_model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> str | None:
    """Why ``uniform_per_layer=True`` refuses these sizes of ``hf_model``, or None when one config holds them."""
    _, uneven = _config_values(sizes)
    family = prefix or type(hf_model).__name__
    fix = "shrink with uniform_per_layer=False and reload with pat_callbacks.structured.from_pretrained_shrunk"
    if uneven:
        where = "; ".join(f"{k}: " + ", ".join(f"{n}={s[k]}" for n, s in sizes.items() if k in s) for k in uneven)
        other = " (ffn_size: MLPs the config does not size by intermediate_size, such as shared experts)"
        return (
            f"uniform_per_layer=True, but the layers of {family!r} differ ({where})"
            f"{other if _OTHER_FFN in uneven else ''}; prune every layer alike (no layer in `exclude`) or {fix}"
        )
    cut = _cut_heads(sizes, hf_model.config)
    if cut:
        where = ", ".join(f"{n}={h}" for n, h in cut.items())
        return (
            f"uniform_per_layer=True, but the attention of {family!r} loses heads ({where}) and a "
            f"{type(hf_model.config).__name__} cannot hold fewer heads of the same size (its head size is the width "
            f"over num_attention_heads={hf_model.config.num_attention_heads}); prune MLP neurons only (the attention "
            f"in `exclude`) or {fix}"
        )
    return None


def check_uniform(model: nn.Module, planned: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Refuse (``ValueError`` naming the layers and sizes) Hugging Face models in ``model`` whose layers will not
    all have the sizes one config holds (BERT / GPT-2 attention that loses heads included), once the modules in
    ``planned`` (``{module name in model: {size key: value}}``, keys as :func:`layer_sizes`) have the sizes given
    there. Changes nothing: the check :func:`~pat_callbacks.structured.cutting.shrink_transformer` makes before its
    first cut.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> check_uniform(model, {f"model.layers.{i}.mlp": {"intermediate_size": 32} for i in range(2)})
        >>> check_uniform(model, {"model.layers.0.mlp": {"intermediate_size": 32}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: uniform_per_layer=True, but the layers of 'LlamaForCausalLM' differ (intermediate_size: \
model.layers.0.mlp=32, model.layers.1.mlp=64); ...
    """
    for prefix, hf_model in _pretrained_models(model):
        p = f"{prefix}." if prefix else ""
        sizes = layer_sizes(hf_model)
        for name, new in (planned or {}).items():
            sized = sizes.get(name[len(p) :]) if name.startswith(p) else None
            if sized is not None:
                sized.update({key: int(value) for key, value in new.items() if key in sized})
        if (reason := _not_uniform(prefix, hf_model, sizes)) is not None:
            raise ValueError(reason)


def update_config(model: nn.Module, uniform_per_layer: bool = False) -> list[str]:
    """Write the sizes of the (shrunk) weights into every Hugging Face config in ``model``; return a note per model
    that plain ``from_pretrained`` will not reload: layers that differ, or BERT / GPT-2 heads pruned (then reload it
    with :func:`from_pretrained_shrunk`), or weights its config does not rebuild at all (then only
    :func:`~pat_callbacks.structured.shrink` with the same ``pruned`` does).

    When layers differ, the config holds the largest sizes (and as many query heads as the most key/value heads times
    the most query heads per key/value head, so every layer can be cut from it) and ``pat_layer_sizes`` each layer
    whose sizes differ from those, a layer whose attention differs with all its head counts.

    Args:
        model: a module holding Hugging Face models (or one).
        uniform_per_layer: require the same sizes in every layer (reloadable by ``from_pretrained``); layers that
            differ are then an error naming them, raised before any config changes.

    Example:
        >>> update_config(nn.Linear(2, 2))
        []
    """
    if uniform_per_layer:
        check_uniform(model)
    notes = []
    for prefix, hf_model in _pretrained_models(model):
        config = hf_model.config
        family = prefix or type(hf_model).__name__
        sizes = layer_sizes(hf_model)
        values, uneven = _config_values(sizes)
        cut = _cut_heads(sizes, config)
        largest = _largest(sizes, values)
        for key, value in largest.items():
            setattr(config, key, value)
        if uneven or cut:
            built = largest | {_HEADS: getattr(config, "num_attention_heads", None)}
            setattr(config, LAYER_SIZES_KEY, _record(sizes, built))
        elif hasattr(config, LAYER_SIZES_KEY):
            delattr(config, LAYER_SIZES_KEY)
        if (wrong := _unbuildable(hf_model)) is not None:
            notes.append(
                f"{family}: its config does not rebuild the shrunk weights ({wrong}); neither from_pretrained nor "
                "from_pretrained_shrunk reloads it: keep `pruned` with the state_dict and rebuild the model with "
                "pat_callbacks.structured.shrink (see its docstring)"
            )
            continue
        if uneven:
            notes.append(
                f"{family}: one config cannot hold every layer's {sorted(uneven)}; it holds the largest and "
                f"`{LAYER_SIZES_KEY}` each layer's: reload with pat_callbacks.structured.from_pretrained_shrunk"
            )
        if cut:
            notes.append(
                f"{family}: a {type(config).__name__} cannot hold pruned attention heads (its head size is the width "
                f"over num_attention_heads, left at {config.num_attention_heads}); `{LAYER_SIZES_KEY}` records each "
                "layer's heads: reload with pat_callbacks.structured.from_pretrained_shrunk (from_pretrained refuses "
                "the smaller weights)"
            )
    return notes


def _unbuildable(hf_model: nn.Module) -> str | None:
    """Which weights of ``hf_model`` a model built from its config (cut to the recorded sizes) would not hold, built
    on the ``meta`` device (no memory, no initialization); None when all match or the class is not built from a
    config alone."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the config's own remarks (token ids...) were made when the model was built
    try:
        with torch.device("meta"):
            built = type(hf_model)(copy.deepcopy(hf_model.config))
    except Exception:  # a class that takes more than its config (a wrapper): nothing to compare with
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        shrink_to_sizes(built, getattr(hf_model.config, LAYER_SIZES_KEY, None) or {})
    except Exception as error:  # whatever stops the cut, the config does not rebuild the model: said, not raised
        return f"its recorded sizes do not apply: {error}"
    held = {name: tuple(value.shape) for name, value in hf_model.state_dict().items()}
    wrong = [
        f"{name}: {held[name]} held, {tuple(value.shape)} built"
        for name, value in built.state_dict().items()
        if name in held and tuple(value.shape) != held[name]
    ]
    if not wrong:
        return None
    return "; ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
