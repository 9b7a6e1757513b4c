"""Reloading a shrunk Hugging Face model whose config records per-layer sizes (``pat_layer_sizes``, written by
:func:`~pat_callbacks.structured.hf.update_config`): :func:`shrink_to_sizes` cuts a model built from the config down
to the recorded sizes, :func:`from_pretrained_shrunk` loads a saved folder through it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
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


def _entry(name: str, wanted: Mapping[str, int], why: str) -> ValueError:
    return ValueError(f"`{LAYER_SIZES_KEY}` entry {name!r}: {dict(wanted)}: {why}")


def shrink_to_sizes(model: nn.Module, record: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Cut a model built from a shrunk config down to each layer's recorded sizes (keeping the first channels: the
    weights are loaded afterwards), in place. All or nothing: an entry naming no module of ``model``, one whose module
    holds no attention or MLP of the recorded kind, or a size that is not a positive int the module can be cut to is
    a ``ValueError`` naming ``pat_layer_sizes`` and the entry, raised before the first cut.

    Example:
        >>> glu = nn.ModuleDict({n: nn.Linear(4, 8) for n in ("gate_proj", "up_proj")} | {"down_proj": nn.Linear(8, 4)})
        >>> shrink_to_sizes(nn.ModuleDict({"mlp": glu}), {"mlp": {"intermediate_size": 3}}).mlp.up_proj.out_features
        3
        >>> shrink_to_sizes(nn.ModuleDict({"mlp": glu}), {"mlp": {"intermediate_size": 0}})
        Traceback (most recent call last):
        ...
        ValueError: `pat_layer_sizes` entry 'mlp': {'intermediate_size': 0}: sizes are ints from 1 to the built \
model's (3 MLP neurons)
    """
    # the groups are found once (each cut changes only its own layer): BERT / GPT-2 heads and MLPs by their module
    heads = {_owner(g): g for g in head_groups(model, "kv_groups")} if _wants(record, (_HEADS,)) else {}
    ffn = {str(g.layout["module"]): g for g in ffn_groups(model)} if _wants(record, _FFN_WIDTHS) else {}
    cuts: list[Callable[[], None]] = []
    for name, wanted in record.items():
        cuts.append(_planned_cut(model, name, wanted, heads, ffn))
    for cut in cuts:
        cut()
    return model


def _planned_cut(model: nn.Module, name: str, wanted: Mapping[str, int], heads: dict, ffn: dict) -> Callable[[], None]:
    """The cut bringing ``model``'s module ``name`` to ``wanted``, every precondition checked (nothing changes)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise _entry(name, wanted, f"{type(model).__name__} has no module of that name") from None
    if not isinstance(wanted, Mapping) or not all(type(v) is int for v in wanted.values()):
        raise _entry(name, wanted, "sizes are ints")
    key = next((k for k in _FFN_WIDTHS if k in wanted), None)
    if key is not None:
        if name not in ffn:
            raise _entry(name, wanted, "an MLP width, but the module holds no MLP found by role")
        group, width = ffn[name], wanted[key]
        _check_size(name, wanted, width, group.n_channels, "MLP neurons")
        return lambda: _shrink_ffn(model, group, list(range(width)))
    if _HEADS in wanted:
        group = heads.get(name)
        if group is None or group.layout["type"] not in ("bert", "gpt2"):
            raise _entry(name, wanted, "attention heads, but the module holds no BERT / GPT-2 attention")
        count = wanted[_HEADS]
        _check_size(name, wanted, count, group.n_channels, "attention heads")
        return lambda: _shrink_heads(model, group, list(range(count)))
    if any(key in wanted for key in _HEAD_KEYS):
        q_heads, kv_heads, head_dim = _gqa_plan(module, name, wanted)
        return lambda: _cut_gqa(module, q_heads, kv_heads, head_dim)
    return lambda: None  # other keys (T5's d_ff): no cut; update_config said so when it wrote them


def _check_size(name: str, wanted: Mapping[str, int], size: int, full: int, what: str) -> None:
    if not 1 <= size <= full:
        raise _entry(name, wanted, f"sizes are ints from 1 to the built model's ({full} {what})")


def _gqa_plan(module: nn.Module, name: str, wanted: Mapping[str, int]) -> tuple[list[int], int, int]:
    """(query heads kept, key/value heads kept, head_dim) cutting Llama-style attention built at the config's sizes
    to ``wanted``'s counts: the first heads of the first key/value groups (the weights are loaded afterwards). A
    record without ``num_attention_heads`` (written by hand) cuts whole key/value groups with their query heads."""
    shape = _gqa_shape(module, name)
    if shape is None:
        raise _entry(name, wanted, "attention heads, but the module holds no q/k/v/o attention")
    heads, kv_heads, head_dim = shape
    want_kv = wanted.get("num_key_value_heads", kv_heads)
    want_heads = wanted.get("num_attention_heads", heads * want_kv // kv_heads)  # unsaid: whole groups cut
    per, keep_per = heads // kv_heads, want_heads // max(want_kv, 1)
    if (
        not 1 <= want_kv <= kv_heads
        or want_heads % want_kv
        or not 1 <= keep_per <= per
        or wanted.get("head_dim", head_dim) != head_dim
    ):
        raise _entry(
            name,
            wanted,
            f"a layer of {heads} heads over {kv_heads} key/value heads, head_dim {head_dim}, cannot be cut to it "
            "(whole key/value groups, the same number of query heads from each)",
        )
    return [g * per + i for g in range(want_kv) for i in range(keep_per)], want_kv, head_dim


def _cut_gqa(module: nn.Module, q_heads: list[int], kv_heads: int, head_dim: int) -> None:
    q_rows = _rows(q_heads, head_dim)
    _cut(module.q_proj, 0, q_rows, with_bias=True)
    for projection in (module.k_proj, module.v_proj):
        _cut(projection, 0, _rows(range(kv_heads), head_dim), with_bias=True)
    _cut(module.o_proj, 1, q_rows, with_bias=False)
    _set_head_counts(module, len(q_heads), kv_heads)


_WEIGHTS = (  # (index file, single file) save_pretrained writes, safetensors first (as from_pretrained prefers)
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _state_dict_from(folder: str) -> dict[str, torch.Tensor]:
    """The weights in ``folder``: safetensors or ``pytorch_model.bin`` (``torch.load(weights_only=True)``), one
    file or shards listed by an index."""
    for index, single in _WEIGHTS:
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, single)):
            files = [single]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_load_file(os.path.join(folder, file)))
        return state
    names = ", ".join(name for pair in _WEIGHTS for name in pair)
    raise FileNotFoundError(f"{folder}: no weights file ({names})")


def _load_file(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _saved_class(config: Any) -> Any:
    """The class ``save_pretrained`` saved (the config's ``architectures``), else ``AutoModelForCausalLM``."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(name), None)
        if found is not None:
            return found
    return transformers.AutoModelForCausalLM


def _model_class(model_class: Any, config: Any) -> Any:
    """``model_class`` (a class, or a ``transformers`` class name) or the saved class."""
    if model_class is None:
        return _saved_class(config)
    if isinstance(model_class, str):
        import transformers

        found = getattr(transformers, model_class, None)
        if found is None or not hasattr(found, "from_pretrained"):
            raise ValueError(
                f"from_pretrained_shrunk: model_class {model_class!r} is no transformers model class; give the class "
                "or the name of one (e.g. 'AutoModelForCausalLM', 'BertForSequenceClassification')"
            )
        return found
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"from_pretrained_shrunk: model_class {model_class!r} has no from_pretrained")
    return model_class


def _renamer(model: nn.Module, record: Mapping[str, Any], path: str) -> Callable[[str], str]:
    """How the record's module names (and the saved weights' names), relative to the model that was saved, read in
    ``model``: as they are, with ``model``'s ``base_model_prefix`` added (a base model saved, a model with a head on
    top loaded) or stripped (the reverse), as ``from_pretrained`` maps a state dict."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    modules = {name for name, _ in model.named_modules()}
    options: list[Callable[[str], str]] = [lambda n: n]
    if prefix:
        options += [lambda n: f"{prefix}.{n}" if n else prefix, lambda n: n.removeprefix(f"{prefix}.")]
    for rename in options:
        if all(rename(name) in modules for name in record):
            return rename
    missing = next(name for name in record if name not in modules)
    raise ValueError(
        f"{path}: `{LAYER_SIZES_KEY}` entry {missing!r}: {record[missing]} names no module of "
        f"{type(model).__name__}" + (f", with or without its base_model_prefix {prefix!r}" if prefix else "")
    )


def _saved_name(rename: Callable[[str], str], prefix: str) -> Callable[[str], str]:
    """The saved weights' name of a weight of the loaded model, ``rename`` reversed."""
    if rename("x") == f"{prefix}.x":
        return lambda n: n.removeprefix(f"{prefix}.")
    if prefix and rename(f"{prefix}.x") == "x":
        return lambda n: f"{prefix}.{n}"
    return lambda n: n


def from_pretrained_shrunk(path: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`~pat_callbacks.structured.shrink`, from a local
    directory. A config without per-layer sizes goes to ``model_class.from_pretrained`` (Hugging Face's own); one
    with them (layers shrunk differently, BERT / GPT-2 heads pruned) is loaded by ``from_pretrained`` at the
    config's sizes with the smaller layers skipped, which are then cut to their recorded sizes and loaded from the
    directory's weights (safetensors or ``pytorch_model.bin``, sharded or not).

    Another class than the one saved works as with ``from_pretrained``: a shrunk ``BertModel`` (MiniLM) loads into
    ``BertForSequenceClassification`` (its new head initialised, a ``UserWarning`` naming it) and the reverse; the
    recorded module names gain or lose the class's ``base_model_prefix`` (``bert.``, ``model.``).

    Args:
        path: the directory ``save_pretrained`` wrote.
        model_class: a Hugging Face model class or its name in ``transformers`` (default: the class that was saved,
            the first of the config's ``architectures`` that ``transformers`` has; ``AutoModelForCausalLM`` if none).
        kwargs: passed to ``from_pretrained`` (``subfolder`` too). Weights of another size than saved outside the
            recorded layers (a classifier for another ``num_labels``) are refused, as ``from_pretrained`` does,
            unless ``ignore_mismatched_sizes=True`` (then they are initialised anew, with a ``UserWarning``).

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pat_callbacks.structured.cutting import shrink_transformer
        >>> from pat_callbacks.structured.hf import update_config
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> _ = shrink_transformer(model, {"model.layers.0.mlp.up_proj.weight": list(range(40))})
        >>> update_config(model)[0].split(";")[0]
        "LlamaForCausalLM: one config cannot hold every layer's ['intermediate_size']"
        >>> with tempfile.TemporaryDirectory() as path:
        ...     model.save_pretrained(path)
        ...     loaded = from_pretrained_shrunk(path)
        ...     base = from_pretrained_shrunk(path, "LlamaModel")  # the model under the head: names lose 'model.'
        >>> type(loaded).__name__, [layer.mlp.up_proj.out_features for layer in loaded.model.layers]
        ('LlamaForCausalLM', [24, 64])
        >>> [layer.mlp.up_proj.out_features for layer in base.layers]
        [24, 64]
    """
    from transformers import AutoConfig

    path = os.fspath(path)
    folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"from_pretrained_shrunk: no such local folder: {folder}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"from_pretrained_shrunk: {folder} holds no config.json (save_pretrained writes one)")
    config = AutoConfig.from_pretrained(path, subfolder=kwargs.get("subfolder", ""))
    model_class = _model_class(model_class, config)
    record = getattr(config, LAYER_SIZES_KEY, None)
    if not record:
        return model_class.from_pretrained(path, **kwargs)
    ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    if kwargs.get("output_loading_info"):
        raise ValueError(
            "from_pretrained_shrunk: output_loading_info is not supported (the recorded layers load later)"
        )
    # Hugging Face loads (and converts) every weight whose shape the config gives; the layers recorded as smaller
    # are then cut to size and take their own weights, which are plain Linear / Conv1D weights under their names.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of the skipped (smaller) layers: expected here
    try:
        model, info = model_class.from_pretrained(
            path, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    rename = _renamer(model, record, path)
    record = {rename(name): sizes for name, sizes in record.items()}
    shapes = {name: value.shape for name, value in model.named_parameters()}
    shrink_to_sizes(model, record)
    cut = {name for name, value in model.named_parameters() if value.shape != shapes.get(name)}
    wanted = cut | {f"{name}.{p}" for name in record for p, _ in model.get_submodule(name).named_parameters()}
    _check_loaded(info, cut, wanted, ignore_mismatched, path)
    saved = _state_dict_from(folder)
    saved_name = _saved_name(rename, getattr(model, "base_model_prefix", "") or "")
    absent = sorted(saved_name(key) for key in wanted if saved_name(key) not in saved)
    if absent:
        raise ValueError(f"{path}: the saved weights lack {absent} of the layers recorded in `{LAYER_SIZES_KEY}`")
    model.load_state_dict({key: saved[saved_name(key)] for key in wanted}, strict=False)
    return model.eval()


def _check_loaded(info: Mapping[str, Any], cut: set[str], wanted: set[str], ignore_mismatched: bool, path: str) -> None:
    """Refuse (or with ``ignore_mismatched`` warn about) weights of another size than saved outside the recorded
    layers; warn about weights the folder did not hold (a new head), as ``from_pretrained`` would."""
    other = sorted(str(key[0]) for key in info.get("mismatched_keys", ()) if str(key[0]) not in cut)
    if other and not ignore_mismatched:
        raise ValueError(
            f"from_pretrained_shrunk: {path} holds {other} at other sizes than the model built (not recorded in "
            f"`{LAYER_SIZES_KEY}`: e.g. another num_labels); pass ignore_mismatched_sizes=True to initialise them anew"
        )
    new = sorted(set(info.get("missing_keys", ())) - wanted)
    if other or new:
        warnings.warn(
            f"from_pretrained_shrunk: weights initialised anew, not loaded from {path}: {other + new}",
            UserWarning,
            stacklevel=3,
        )
