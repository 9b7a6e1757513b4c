"""Reloading a shrunk Hugging Face model whose config records per-layer sizes (``pat_layer_sizes``, written by
:func:`~pat_callbacks.structured.hf.update_config`): :func:`shrink_to_sizes` cuts a model built from the config down
to the recorded sizes, :func:`from_pretrained_shrunk` loads a saved folder through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pat_callbacks.structured.cutting import _cut, _owner, _set_head_counts, _shrink_ffn, _shrink_heads
from pat_callbacks.structured.roles import _gqa_shape, _rows, ffn_groups, head_groups

__all__ = ["LAYER_SIZES_KEY", "from_pretrained_shrunk", "shrink_to_sizes"]

LAYER_SIZES_KEY = "pat_layer_sizes"
_HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim")
_OTHER_FFN = "ffn_size"  # a gated MLP the config does not size by ``intermediate_size``: always recorded
_HEADS = "attention_heads"  # BERT / GPT-2 heads: a count no config of theirs holds (head size = width / heads)
_FFN_WIDTHS = ("intermediate_size", "n_inner", _OTHER_FFN)  # the MLP widths from_pretrained_shrunk cuts back


def _wants(record: Mapping[str, Mapping[str, int]], keys: tuple[str, ...]) -> bool:
    return any(key in wanted for wanted in record.values() for key in keys)


def shrink_to_sizes(model: nn.Module, record: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Cut a model built from a shrunk config down to each layer's recorded sizes (keeping the first channels: the
    weights are loaded afterwards), in place. A recorded module that holds no attention or MLP of the recorded kind
    is a ``ValueError`` naming it.

    Example:
        >>> glu = nn.ModuleDict({n: nn.Linear(4, 8) for n in ("gate_proj", "up_proj")} | {"down_proj": nn.Linear(8, 4)})
        >>> shrink_to_sizes(nn.ModuleDict({"mlp": glu}), {"mlp": {"intermediate_size": 3}}).mlp.up_proj.out_features
        3
    """
    # the groups are found once (each cut changes only its own layer): BERT / GPT-2 heads and MLPs by their module
    heads = {_owner(g): g for g in head_groups(model, "kv_groups")} if _wants(record, (_HEADS,)) else {}
    ffn = {str(g.layout["module"]): g for g in ffn_groups(model)} if _wants(record, _FFN_WIDTHS) else {}
    for name, wanted in record.items():
        module = model.get_submodule(name)
        width = next((wanted[k] for k in _FFN_WIDTHS if k in wanted), None)
        if width is not None:
            if name not in ffn:
                raise ValueError(f"{name!r} is recorded with an MLP width {width}, but holds no MLP found by role")
            _shrink_ffn(model, ffn[name], list(range(int(width))))
            continue
        if _HEADS in wanted:
            group = heads.get(name)
            if group is None or group.layout["type"] not in ("bert", "gpt2"):
                raise ValueError(
                    f"{name!r} is recorded with {wanted[_HEADS]} attention heads, but holds no BERT / GPT-2 attention"
                )
            _shrink_heads(model, group, list(range(int(wanted[_HEADS]))))
            continue
        if any(key in wanted for key in _HEAD_KEYS):  # other keys (T5 d_ff): no cut; update_config says so
            _cut_gqa(module, name, wanted)
    return model


def _cut_gqa(module: nn.Module, name: str, wanted: Mapping[str, int]) -> None:
    """Cut Llama-style attention (built at the config's sizes) to ``wanted``'s query and key/value head counts,
    keeping the first heads of the first key/value groups (the weights are loaded afterwards); a count it cannot
    reach from there is a ``ValueError`` naming the module and the counts."""
    shape = _gqa_shape(module, name)
    if shape is None:
        raise ValueError(f"{name!r} is recorded with attention heads {dict(wanted)}, but holds no q/k/v/o attention")
    heads, kv_heads, head_dim = shape
    want_heads = int(wanted.get("num_attention_heads", heads))
    want_kv = int(wanted.get("num_key_value_heads", kv_heads))
    per, keep_per = heads // kv_heads, want_heads // max(want_kv, 1)
    if (
        not 1 <= want_kv <= kv_heads
        or want_heads % want_kv
        or not 1 <= keep_per <= per
        or int(wanted.get("head_dim", head_dim)) != head_dim
    ):
        raise ValueError(
            f"{name!r} is recorded with {dict(wanted)}, which a layer of {heads} heads, {kv_heads} key/value heads "
            f"and head_dim {head_dim} cannot be cut to (whole key/value groups, the same query heads from each)"
        )
    q_rows = _rows([g * per + i for g in range(want_kv) for i in range(keep_per)], head_dim)
    _cut(module.q_proj, 0, q_rows, with_bias=True)
    for projection in (module.k_proj, module.v_proj):
        _cut(projection, 0, _rows(range(want_kv), head_dim), with_bias=True)
    _cut(module.o_proj, 1, q_rows, with_bias=False)
    _set_head_counts(module, want_heads, want_kv)


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


def _saved_class(config: Any) -> Any:
    """The class ``save_pretrained`` saved (the config's ``architectures``), else ``AutoModelForCausalLM``."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(name), None)
        if found is not None:
            return found
    return transformers.AutoModelForCausalLM


def from_pretrained_shrunk(path: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`~pat_callbacks.structured.shrink`, from a local
    directory. A config without per-layer sizes goes to ``model_class.from_pretrained`` (Hugging Face's own); one
    with them (layers shrunk differently, BERT / GPT-2 heads pruned) is loaded by ``from_pretrained`` at the
    config's sizes with the smaller layers skipped, which are then cut to their recorded sizes and loaded from the
    directory's safetensors files.

    Args:
        path: the directory ``save_pretrained`` wrote.
        model_class: a Hugging Face model class (default: the class that was saved, the first of the config's
            ``architectures`` that ``transformers`` has; ``AutoModelForCausalLM`` if none).
        kwargs: passed to ``from_pretrained``.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> from pat_callbacks.structured.cutting import shrink_transformer
        >>> from pat_callbacks.structured.hf import update_config
        >>> model = LlamaForCausalLM(config)
        >>> _ = shrink_transformer(model, {"model.layers.0.mlp.up_proj.weight": list(range(40))})
        >>> update_config(model)[0].split(";")[0]
        "LlamaForCausalLM: one config cannot hold every layer's ['intermediate_size']"
        >>> with tempfile.TemporaryDirectory() as path:
        ...     model.save_pretrained(path)
        ...     loaded = from_pretrained_shrunk(path)
        >>> type(loaded).__name__, [layer.mlp.up_proj.out_features for layer in loaded.model.layers]
        ('LlamaForCausalLM', [24, 64])
    """
    from transformers import AutoConfig

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    model_class = model_class or _saved_class(config)
    record = getattr(config, LAYER_SIZES_KEY, None)
    if not record:
        return model_class.from_pretrained(path, **kwargs)
    # Hugging Face loads (and converts) every weight whose shape the config gives; the layers recorded as smaller
    # are then cut to size and take their own weights, which are plain Linear / Conv1D weights under their names.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of the skipped (smaller) layers: expected here
    try:
        model = model_class.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    shapes = {name: value.shape for name, value in model.named_parameters()}
    shrink_to_sizes(model, record)
    cut = {name for name, value in model.named_parameters() if value.shape != shapes.get(name)}
    saved = _state_dict_from(path)
    wanted = cut | {f"{name}.{p}" for name in record for p, _ in model.get_submodule(name).named_parameters()}
    absent = sorted(wanted - saved.keys())
    if absent:
        raise ValueError(f"{path}: the saved weights lack {absent} of the layers recorded in `{LAYER_SIZES_KEY}`")
    model.load_state_dict({key: saved[key] for key in wanted}, strict=False)
    return model.eval()
