"""Hugging Face models after :func:`~pat_callbacks.structured.shrink`: a config that says what the weights hold, so
``save_pretrained`` + ``from_pretrained`` reload the smaller model, and a loader for what a config cannot express.

A Llama / Qwen2 / Mistral / Gemma config has one ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
``intermediate_size`` for every layer. :func:`update_config` reads the sizes off the shrunk weights: when every layer
has the same ones (as uniform structured pruning leaves them), it writes them into the config and Hugging Face's own
``from_pretrained`` rebuilds the model. When layers differ (a layer kept whole with ``ignore=``), the config keeps
the largest sizes and records each layer's under ``pat_layer_sizes``; :func:`from_pretrained_shrunk` rebuilds that
(and plain checkpoints too).

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

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pat_callbacks.structured.cutting import _shrink_ffn, shrink_transformer
from pat_callbacks.structured.roles import _ffn_roles, _gqa_shape, ffn_groups

__all__ = ["LAYER_SIZES_KEY", "check_uniform", "from_pretrained_shrunk", "layer_sizes", "update_config"]

LAYER_SIZES_KEY = "pat_layer_sizes"
_HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim")
_OTHER_FFN = "ffn_size"  # a gated MLP the config does not size by ``intermediate_size``: always recorded


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


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per Llama-style attention and gated MLP of ``model`` (by module name), the sizes its weights have now.

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
        elif (roles := _ffn_roles(module)) is not None and roles[2] is not None:
            # a decoder layer's ``mlp`` is what ``intermediate_size`` sizes; any other (a shared expert) is recorded
            key = "intermediate_size" if name.endswith("mlp") else _OTHER_FFN
            sizes[name] = {key: int(module.get_submodule(roles[0]).out_features)}
    return sizes


def _config_values(sizes: Mapping[str, Mapping[str, int]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(every size per config key, the keys whose layers differ: one config cannot hold them) of ``sizes``."""
    keys = [k for k in (*_HEAD_KEYS, "intermediate_size") if any(k in s for s in sizes.values())]
    values = {k: sorted({s[k] for s in sizes.values() if k in s}) for k in keys}
    uneven = {k: v for k, v in values.items() if len(v) > 1}
    if any(_OTHER_FFN in s for s in sizes.values()):
        uneven[_OTHER_FFN] = sorted({s[_OTHER_FFN] for s in sizes.values() if _OTHER_FFN in s})
    return values, uneven


def _not_uniform(prefix: str, hf_model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> str | None:
    """Why ``uniform_per_layer=True`` refuses these sizes of ``hf_model``, or None when one config holds them."""
    _, uneven = _config_values(sizes)
    if not uneven:
        return None
    where = "; ".join(f"{k}: " + ", ".join(f"{n}={s[k]}" for n, s in sizes.items() if k in s) for k in uneven)
    other = " (ffn_size: MLPs the config does not size by intermediate_size, such as shared experts)"
    return (
        f"uniform_per_layer=True, but the layers of {prefix or type(hf_model).__name__!r} differ ({where})"
        f"{other if _OTHER_FFN in uneven else ''}; prune every layer alike (no layer in `exclude`) or shrink with "
        "uniform_per_layer=False and reload with pat_callbacks.structured.from_pretrained_shrunk"
    )


def check_uniform(model: nn.Module, planned: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Refuse (``ValueError`` naming the layers and sizes) Hugging Face models in ``model`` whose layers will not
    all have the sizes one config holds, once the modules in ``planned`` (``{module name in model: {size key:
    value}}``, keys as :func:`layer_sizes`) have the sizes given there. Changes nothing: the check
    :func:`~pat_callbacks.structured.cutting.shrink_transformer` makes before its first cut.

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
    whose layers differ (then reload it with :func:`from_pretrained_shrunk`).

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
        sizes = layer_sizes(hf_model)
        if not sizes:
            continue
        values, uneven = _config_values(sizes)
        for key, options in values.items():
            setattr(config, key, max(options))
        if uneven:
            largest = {k: max(v) for k, v in values.items()}
            record = {n: {k: v for k, v in s.items() if v != largest.get(k)} for n, s in sizes.items()}
            setattr(config, LAYER_SIZES_KEY, {n: s for n, s in record.items() if s})
            notes.append(
                f"{prefix or type(hf_model).__name__}: one config cannot hold every layer's {sorted(uneven)}; it holds "
                f"the largest and `{LAYER_SIZES_KEY}` each layer's: reload with "
                "pat_callbacks.structured.from_pretrained_shrunk"
            )
        elif hasattr(config, LAYER_SIZES_KEY):
            delattr(config, LAYER_SIZES_KEY)
    return notes


def shrink_to_sizes(model: nn.Module, record: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Cut a model built from a shrunk config down to each layer's recorded sizes (keeping the first channels: the
    weights are loaded afterwards), in place.

    Example:
        >>> glu = nn.ModuleDict({n: nn.Linear(4, 8) for n in ("gate_proj", "up_proj")} | {"down_proj": nn.Linear(8, 4)})
        >>> shrink_to_sizes(nn.ModuleDict({"mlp": glu}), {"mlp": {"intermediate_size": 3}}).mlp.up_proj.out_features
        3
    """
    for name, wanted in record.items():
        module = model.get_submodule(name)
        p = f"{name}." if name else ""
        width = wanted.get("intermediate_size", wanted.get(_OTHER_FFN))
        if width is not None:
            (group,) = [g for g in ffn_groups(model) if g.layout["module"] == name]
            _shrink_ffn(model, group, list(range(int(width))))
            continue
        heads, kv_heads, _ = _gqa_shape(module, name) or (0, 0, 0)
        want_kv = int(wanted.get("num_key_value_heads", kv_heads))
        if want_kv < kv_heads:  # whole key/value groups: the k projection is the root
            shrink_transformer(model, {f"{p}k_proj.weight": list(range(want_kv, kv_heads))})
            heads, kv_heads = heads * want_kv // kv_heads, want_kv
        want_heads = int(wanted.get("num_attention_heads", heads))
        if want_heads < heads:  # query heads, the same count from every key/value group
            per, keep = heads // kv_heads, want_heads // kv_heads
            drop = [g * per + i for g in range(kv_heads) for i in range(keep, per)]
            if kv_heads == heads:
                drop = list(range(want_heads, heads))
            shrink_transformer(model, {f"{p}q_proj.weight": drop})
    return model


def _state_dict_from(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(os.path.join(path, file)))
    return state


def from_pretrained_shrunk(path: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`~pat_callbacks.structured.shrink`, from a local
    directory. A config without per-layer sizes goes to ``model_class.from_pretrained`` (Hugging Face's own); one
    with them (layers shrunk differently) is loaded by ``from_pretrained`` at the config's (largest) sizes with the
    smaller layers skipped, which are then cut to their recorded sizes and loaded from the directory's safetensors
    files.

    Args:
        path: the directory ``save_pretrained`` wrote.
        model_class: a Hugging Face model class (default ``AutoModelForCausalLM``).
        kwargs: passed to ``from_pretrained``.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> _ = shrink_transformer(model, {"model.layers.0.mlp.up_proj.weight": list(range(40))})
        >>> update_config(model)[0].split(";")[0]
        "LlamaForCausalLM: one config cannot hold every layer's ['intermediate_size']"
        >>> with tempfile.TemporaryDirectory() as path:
        ...     model.save_pretrained(path)
        ...     loaded = from_pretrained_shrunk(path, LlamaForCausalLM)
        >>> [layer.mlp.up_proj.out_features for layer in loaded.model.layers]
        [24, 64]
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, LAYER_SIZES_KEY, None)
    if not record:
        return model_class.from_pretrained(path, **kwargs)
    # Hugging Face loads (and converts) every weight whose shape the config gives; the layers recorded as smaller
    # are then cut to size and take their own weights, which are plain Linear weights under their module names.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of the skipped (smaller) layers: expected here
    try:
        model = model_class.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    shrink_to_sizes(model, record)
    saved = _state_dict_from(path)
    wanted = {f"{name}.{p}" for name in record for p, _ in model.get_submodule(name).named_parameters()}
    absent = sorted(wanted - saved.keys())
    if absent:
        raise ValueError(f"{path}: the saved weights lack {absent} of the layers recorded in `{LAYER_SIZES_KEY}`")
    model.load_state_dict({key: saved[key] for key in wanted}, strict=False)
    return model.eval()
