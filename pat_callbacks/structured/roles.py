"""Transformer structure found by role: which modules are attention heads and FFN neurons, grouped for pruning.

Heads of ``nn.MultiheadAttention`` (packed q/k/v), of Hugging Face GPT-2 attention (``c_attn`` / ``c_proj``,
``Conv1D`` stored in x out), of BERT-style attention (``query`` / ``key`` / ``value`` + ``output.dense``), of
Llama / Qwen2 / Mistral / Gemma-style ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` attention with grouped-query
or multi-query key/value heads (:func:`gqa_group`), and of separate q/k/v/o projection layouts given by name; hidden
neurons of transformer MLPs (``nn.TransformerEncoderLayer`` ``linear1`` / ``linear2``, GPT-2 ``c_fc`` / ``c_proj``,
BERT ``intermediate.dense`` / ``output.dense``, gated ``gate_proj`` / ``up_proj`` / ``down_proj`` (SwiGLU) MLPs, and
any ``nn.Sequential(Linear, activation, Linear)`` block). Mixture-of-experts blocks with fused expert weights
(Mixtral, Qwen2-MoE) keep their experts whole (:func:`moe_blocks`). The residual stream (model width) is left
whole: it couples embeddings, positions, every norm and every projection.

How the groups found here are cut out of a model: :mod:`~pat_callbacks.structured.cutting`.

Example:
    >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    >>> heads, ffn = transformer_groups(layer)
    >>> [(g.root, g.kind, g.n_channels) for g in heads + ffn]
    [('self_attn.in_proj_weight', 'heads', 4), ('linear1.weight', 'ffn', 32)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pat_callbacks.structured.channels import ChannelGroup, Slice
from pat_callbacks.structured.pruned_attention import PrunedMultiheadAttention

__all__ = [
    "HEAD_UNITS",
    "ffn_groups",
    "gqa_group",
    "head_groups",
    "moe_blocks",
    "projection_head_groups",
    "transformer_groups",
]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _is_conv1d(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _heads_group(
    root: str, heads: int, slices_of: Any, gate_of: Any, root_dim: int, layout: dict[str, Any]
) -> ChannelGroup:
    group = ChannelGroup(root=root, n_channels=heads, kind="heads", root_dim=root_dim, layout=layout)
    for head in range(heads):
        group.slices.append(slices_of(head))
        group.gate_slices.append(gate_of(head))
    return group


HeadUnit = Literal["auto", "kv_groups", "query_heads"]
HEAD_UNITS: tuple[str, ...] = ("auto", "kv_groups", "query_heads")


def head_groups(model: nn.Module, heads: HeadUnit = "auto") -> list[ChannelGroup]:
    """One group per attention module found by role (``nn.MultiheadAttention`` with packed q/k/v, Hugging Face
    GPT-2, BERT-style attention, and Llama / Qwen2 / Mistral / Gemma-style ``q_proj`` / ``k_proj`` / ``v_proj`` /
    ``o_proj`` attention with grouped-query (GQA) or multi-query (MQA) key/value heads): per head, its q, k and v
    rows (columns for GPT-2's ``Conv1D``) with their biases and its output-projection columns (rows); the gate is
    the head's v slices, whose scaling scales the head's output (so ``gate`` importance is Michel et al. 2019's head
    importance).

    With fewer key/value heads than query heads, ``heads`` chooses the unit (see :func:`gqa_group`):
    ``"kv_groups"`` (a key/value head with every query head sharing it; root: the k projection) or
    ``"query_heads"`` (query heads, pruned by the same count in every key/value group; root: the q projection);
    ``"auto"``: key/value groups, except multi-query attention (one key/value head): query heads.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> [(g.root, g.n_channels) for g in head_groups(nn.ModuleDict({"attn": attention}))]
        [('attn.in_proj_weight', 2)]
    """
    groups = []
    for name, module in model.named_modules():
        p = _prefix(name)
        if (shape := _gqa_shape(module, name)) is not None:
            n_heads, n_kv, head_dim = shape
            layout = {"type": "gqa", "module": name, **{key: f"{p}{attr}" for key, attr in _GQA_ROLES.items()}}
            groups.append(gqa_group(model, layout, n_heads, n_kv, head_dim, heads))
            continue
        if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            if not getattr(module, "_qkv_same_embed_dim", True) and not isinstance(module, PrunedMultiheadAttention):
                raise ValueError(f"{name!r}: only MultiheadAttention with a packed in_proj_weight is supported")
            heads, width = module.num_heads, module.head_dim
            inner = heads * width
            has_bias = module.in_proj_bias is not None

            def mha_slices(head: int, p: str = p, width: int = width, inner: int = inner, bias: bool = has_bias):
                block = torch.arange(head * width, (head + 1) * width)
                rows = torch.cat([block + k * inner for k in range(3)])
                out = [(f"{p}in_proj_weight", 0, rows), (f"{p}out_proj.weight", 1, block)]
                return out + ([(f"{p}in_proj_bias", 0, rows)] if bias else [])

            def mha_gate(head: int, p: str = p, width: int = width, inner: int = inner, bias: bool = has_bias):
                v_rows = torch.arange(head * width, (head + 1) * width) + 2 * inner
                return [(f"{p}in_proj_weight", 0, v_rows)] + ([(f"{p}in_proj_bias", 0, v_rows)] if bias else [])

            groups.append(
                _heads_group(f"{p}in_proj_weight", heads, mha_slices, mha_gate, 0, {"type": "mha", "module": name})
            )
        elif _is_conv1d(getattr(module, "c_attn", None)) and _is_conv1d(getattr(module, "c_proj", None)):
            if getattr(module, "is_cross_attention", False):
                continue
            heads, width = int(module.num_heads), int(module.head_dim)
            inner = heads * width

            def gpt2_slices(head: int, p: str = p, width: int = width, inner: int = inner):
                block = torch.arange(head * width, (head + 1) * width)
                cols = torch.cat([block + k * inner for k in range(3)])
                return [(f"{p}c_attn.weight", 1, cols), (f"{p}c_attn.bias", 0, cols), (f"{p}c_proj.weight", 0, block)]

            def gpt2_gate(head: int, p: str = p, width: int = width, inner: int = inner):
                v_cols = torch.arange(head * width, (head + 1) * width) + 2 * inner
                return [(f"{p}c_attn.weight", 1, v_cols), (f"{p}c_attn.bias", 0, v_cols)]

            groups.append(
                _heads_group(f"{p}c_attn.weight", heads, gpt2_slices, gpt2_gate, 1, {"type": "gpt2", "module": name})
            )
        elif (self_attention := _bert_self_attention(module)) is not None or _is_albert_attention(module):
            attention = self_attention or module
            heads, width = int(attention.num_attention_heads), int(attention.attention_head_size)
            s, o = ("self.", f"{p}output.dense") if self_attention is not None else ("", f"{p}dense")
            q, k, v = (f"{p}{s}query", f"{p}{s}key", f"{p}{s}value")
            layout = {"type": "bert", "module": name, "q": q, "k": k, "v": v, "out": o}
            groups.append(_projection_group(model, layout, heads, width))
    return groups


def _bert_self_attention(module: nn.Module) -> nn.Module | None:
    """``module.self`` if ``module`` is BERT-style attention (``self.query/key/value`` + ``output.dense``)."""
    self_attention = getattr(module, "self", None)
    output = getattr(module, "output", None)
    if not isinstance(self_attention, nn.Module) or not isinstance(getattr(output, "dense", None), nn.Linear):
        return None
    if not all(isinstance(getattr(self_attention, n, None), nn.Linear) for n in ("query", "key", "value")):
        return None
    if not hasattr(self_attention, "num_attention_heads") or not hasattr(self_attention, "attention_head_size"):
        return None
    return self_attention


def _is_albert_attention(module: nn.Module) -> bool:
    """ALBERT attention: BERT's ``query`` / ``key`` / ``value`` and output ``dense`` in one module."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value", "dense")) and all(
        isinstance(getattr(module, n, None), int) for n in ("num_attention_heads", "attention_head_size")
    )


_GQA_ROLES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}


def _gqa_shape(module: nn.Module, name: str) -> tuple[int, int, int] | None:
    """``(query heads, key/value heads, head_dim)`` of Llama-style attention (``q_proj`` / ``k_proj`` / ``v_proj`` /
    ``o_proj`` Linear layers with a ``head_dim`` attribute or a config giving it), read from the weights' shapes;
    ``None`` if ``module`` is not one. Inconsistent shapes are an error naming the module and the numbers."""
    q, k, v, o = (getattr(module, attr, None) for attr in _GQA_ROLES.values())
    if not all(isinstance(m, nn.Linear) for m in (q, k, v, o)):
        return None
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    if not head_dim and getattr(module, "num_heads", None):
        head_dim = q.out_features // int(module.num_heads)
    if not isinstance(head_dim, int) or head_dim < 1:
        return None  # no way to tell the heads apart: an ``attention=`` layout can name them
    _check_heads(name, q.out_features // head_dim, k.out_features // head_dim, head_dim, q, k, v, o)
    return q.out_features // head_dim, k.out_features // head_dim, head_dim


def _check_heads(
    name: str, heads: int, kv_heads: int, head_dim: int, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear
) -> None:
    """Every projection's size against ``heads`` query heads and ``kv_heads`` key/value heads of ``head_dim``."""
    expected = {
        "q outputs": (q.out_features, heads * head_dim),
        "k outputs": (k.out_features, kv_heads * head_dim),
        "v outputs": (v.out_features, kv_heads * head_dim),
        "out inputs": (o.in_features, heads * head_dim),
    }
    wrong = [f"{what} {got} (expected {want})" for what, (got, want) in expected.items() if got != want]
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        wrong.append(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if wrong:
        raise ValueError(
            f"Attention {name!r} with {heads} heads, {kv_heads} key/value heads and head_dim {head_dim} does not "
            f"match its weights: {'; '.join(wrong)}"
        )


def _rows(heads: Sequence[int], head_dim: int) -> Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def gqa_group(
    model: nn.Module,
    layout: Mapping[str, Any],
    heads: int,
    kv_heads: int,
    head_dim: int,
    unit: HeadUnit = "auto",
) -> ChannelGroup:
    """The head group of attention written as separate q/k/v/out projections (``layout`` names them), with
    ``heads`` query heads sharing ``kv_heads`` key/value heads (grouped-query attention; multi-query at 1, plain
    multi-head attention when equal).

    ``unit="kv_groups"`` (and always when ``heads == kv_heads``): a channel is one key/value head with the
    ``heads // kv_heads`` query heads sharing it: its k and v rows, the query heads' q rows and output-projection
    columns (biases included); removing it keeps the sharing ratio. The gate is its v rows. The root is the k
    projection (the q projection for plain multi-head attention).
    ``unit="query_heads"``: a channel is one query head (its q rows and output columns); the key/value heads stay,
    and every key/value group loses the same number of query heads (``blocks``), so the ratio stays uniform. The gate
    is its output columns. The root is the q projection.
    ``unit="auto"``: ``"kv_groups"``, except for multi-query attention (``kv_heads == 1``): ``"query_heads"``.

    Example:
        >>> attn = nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 4), "v": nn.Linear(8, 4),
        ...                       "o": nn.Linear(8, 8)})
        >>> layout = {"q": "q", "k": "k", "v": "v", "out": "o"}
        >>> kv = gqa_group(attn, layout, 4, 2, 2)
        >>> kv.root, kv.n_channels
        ('k.weight', 2)
        >>> for name, dim, index in kv.slices[1]:  # key/value head 1 and query heads 2, 3 sharing it
        ...     print(name, dim, index.tolist())
        q.weight 0 [4, 5, 6, 7]
        q.bias 0 [4, 5, 6, 7]
        k.weight 0 [2, 3]
        k.bias 0 [2, 3]
        v.weight 0 [2, 3]
        v.bias 0 [2, 3]
        o.weight 1 [4, 5, 6, 7]
        >>> query = gqa_group(attn, layout, 4, 2, 2, unit="query_heads")
        >>> query.root, query.n_channels, query.blocks
        ('q.weight', 4, 2)
    """
    modules = dict(model.named_modules())
    per = heads // kv_heads

    def part(key: str, index: Tensor, dim: int = 0) -> list[Slice]:
        bias = [(f"{layout[key]}.bias", 0, index)] if dim == 0 and modules[layout[key]].bias is not None else []
        return [(f"{layout[key]}.weight", dim, index), *bias]

    full = dict(layout, type=layout.get("type", "projection"), num_heads=heads, num_kv_heads=kv_heads)
    if unit == "auto":
        unit = "query_heads" if kv_heads == 1 else "kv_groups"
    full.update(head_dim=head_dim, unit=unit if per > 1 else "kv_groups")
    if full["unit"] == "query_heads":
        group = ChannelGroup(f"{layout['q']}.weight", heads, kind="heads", layout=full, blocks=kv_heads)
        for head in range(heads):
            block = _rows([head], head_dim)
            group.slices.append(part("q", block) + part("out", block, 1))
            group.gate_slices.append(part("out", block, 1))
        return group
    root = layout["k"] if per > 1 else layout["q"]
    group = ChannelGroup(f"{root}.weight", kv_heads, kind="heads", layout=full)
    for kv in range(kv_heads):
        q_rows, kv_rows = _rows(range(kv * per, (kv + 1) * per), head_dim), _rows([kv], head_dim)
        group.slices.append(part("q", q_rows) + part("k", kv_rows) + part("v", kv_rows) + part("out", q_rows, 1))
        group.gate_slices.append(part("v", kv_rows))
    return group


def _projection_group(model: nn.Module, layout: Mapping[str, Any], heads: int, width: int) -> ChannelGroup:
    return gqa_group(model, layout, heads, heads, width)


def projection_head_groups(
    model: nn.Module, layouts: Sequence[Mapping[str, Any]], heads: HeadUnit = "auto"
) -> list[ChannelGroup]:
    """Head groups for attention written as separate projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
    Linear layers, as in most transformer code). Each layout names the four modules and ``num_heads``, and may give
    ``num_kv_heads`` (grouped-query attention; default ``num_heads``), ``head_dim`` (default: q outputs /
    ``num_heads``) and ``heads_attr`` (``"module.attribute"`` holding the head count, updated by
    :func:`~pat_callbacks.structured.cutting.shrink_transformer`). Every projection's size is checked against the
    layout: a mismatch is an error naming the layer and the numbers. Groups as :func:`gqa_group` builds them
    (``heads`` is its ``unit``).

    Example:
        >>> attn = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("q", "k", "v", "o")})
        >>> layout = {"q": "q", "k": "k", "v": "v", "out": "o", "num_heads": 2}
        >>> [(g.root, g.n_channels) for g in projection_head_groups(attn, [layout])]
        [('q.weight', 2)]
        >>> attn.k = nn.Linear(8, 4)
        >>> try:
        ...     projection_head_groups(attn, [layout])
        ... except ValueError as error:
        ...     print(str(error).split(": ")[-1])
        k outputs 4 (expected 8)
    """
    modules = dict(model.named_modules())
    groups = []
    for layout in layouts:
        missing = [key for key in ("q", "k", "v", "out", "num_heads") if key not in layout]
        if missing:
            raise ValueError(f"Attention layout {dict(layout)!r} lacks {missing}; it needs q, k, v, out, num_heads")
        for key in ("q", "k", "v", "out"):
            if not isinstance(modules.get(layout[key]), nn.Linear):
                raise ValueError(f"Attention layout `{key}`={layout[key]!r} is not a Linear module of the model")
        q, k, v, o = (modules[layout[key]] for key in ("q", "k", "v", "out"))
        n_heads = int(layout["num_heads"])
        n_kv = int(layout.get("num_kv_heads", n_heads))
        head_dim = int(layout.get("head_dim", q.out_features // n_heads if n_heads > 0 else 0))
        if n_heads < 1 or head_dim < 1:
            raise ValueError(
                f"Attention layout for {layout['q']!r}: num_heads={n_heads} and head_dim={head_dim} must be >= 1 "
                f"({layout['q']!r} has {q.out_features} outputs)"
            )
        _check_heads(layout["q"], n_heads, n_kv, head_dim, q, k, v, o)
        groups.append(gqa_group(model, {"type": "projection", **layout}, n_heads, n_kv, head_dim, heads))
    return groups


def ffn_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per transformer MLP: its hidden neurons, each the up-projection's row (column for ``Conv1D``) and
    bias entry and the down-projection's column (row for ``Conv1D``); in a gated MLP (SwiGLU / GeGLU:
    ``down_proj(act(gate_proj(x)) * up_proj(x))``, Llama / Qwen2 / Mistral / Gemma) also the gate projection's row.
    The gate (for ``gate`` importance) is the up-projection slices, whose scaling scales the neuron's output.

    Example:
        >>> block = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))})
        >>> [(g.root, g.n_channels) for g in ffn_groups(block)]
        [('mlp.0.weight', 16)]
        >>> glu = nn.ModuleDict({n: nn.Linear(4, 8) for n in ("gate_proj", "up_proj")} | {"down_proj": nn.Linear(8, 4)})
        >>> for name, dim, index in ffn_groups(nn.ModuleDict({"mlp": glu}))[0].slices[5]:
        ...     print(name, dim, index.tolist())
        mlp.up_proj.weight 0 [5]
        mlp.up_proj.bias 0 [5]
        mlp.gate_proj.weight 0 [5]
        mlp.gate_proj.bias 0 [5]
        mlp.down_proj.weight 1 [5]
    """
    groups = []
    for name, module in model.named_modules():
        roles = _ffn_roles(module)
        if roles is None:
            continue
        up_name, down_name, gate_name = roles
        up, down = module.get_submodule(up_name), module.get_submodule(down_name)
        p = _prefix(name)
        up_dim = 1 if _is_conv1d(up) else 0
        down_dim = 0 if _is_conv1d(down) else 1
        hidden = up.weight.shape[up_dim]
        layout = {"type": "ffn", "module": name, "up": f"{p}{up_name}", "down": f"{p}{down_name}"}
        if gate_name is not None:
            layout["gate"] = f"{p}{gate_name}"
        gate_bias = gate_name is not None and module.get_submodule(gate_name).bias is not None
        group = ChannelGroup(root=f"{p}{up_name}.weight", n_channels=hidden, kind="ffn", root_dim=up_dim, layout=layout)
        for neuron in range(hidden):
            index = torch.tensor([neuron])
            gate = [(f"{p}{up_name}.weight", up_dim, index)]
            if up.bias is not None:
                gate.append((f"{p}{up_name}.bias", 0, index))
            group.gate_slices.append(gate)
            gated = [(f"{p}{gate_name}.weight", 0, index)] if gate_name is not None else []
            gated += [(f"{p}{gate_name}.bias", 0, index)] if gate_bias else []
            group.slices.append([*gate, *gated, (f"{p}{down_name}.weight", down_dim, index)])
        groups.append(group)
    return groups


def _ffn_roles(module: nn.Module) -> tuple[str, str, str | None] | None:
    """The (up, down, gate) projections of a transformer MLP, by role (gate ``None`` when not gated)."""
    gated = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(m, nn.Linear) for m in gated):
        gate, up, down = gated
        if gate.out_features == up.out_features == down.in_features:
            return "up_proj", "down_proj", "gate_proj"
    pair = _ffn_pair(module)
    return None if pair is None else (*pair, None)


def moe_blocks(model: nn.Module) -> list[str]:
    """Names of mixture-of-experts blocks (a module with ``experts`` and a router ``gate`` or ``router``) whose
    experts are not separate gated MLPs: their expert weights are left whole by structured pruning.

    Example:
        >>> moe_blocks(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    names = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        routed = isinstance(experts, nn.Module) and (hasattr(module, "gate") or hasattr(module, "router"))
        if routed and not any(_ffn_roles(m) is not None for m in experts.modules()):
            names.append(name)
    return names


def _ffn_pair(module: nn.Module) -> tuple[str, str] | None:
    """The (up, down) projections of a transformer MLP, by role; ``None`` if ``module`` is not one."""
    if isinstance(getattr(module, "linear1", None), nn.Linear) and isinstance(
        getattr(module, "linear2", None), nn.Linear
    ):
        return "linear1", "linear2"
    if _is_conv1d(getattr(module, "c_fc", None)) and _is_conv1d(getattr(module, "c_proj", None)):
        return "c_fc", "c_proj"
    up, down = getattr(module, "ffn", None), getattr(module, "ffn_output", None)  # ALBERT's layer
    if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
        return "ffn", "ffn_output"
    intermediate = getattr(getattr(module, "intermediate", None), "dense", None)
    output = getattr(getattr(module, "output", None), "dense", None)
    if (
        isinstance(intermediate, nn.Linear)
        and isinstance(output, nn.Linear)
        and intermediate.out_features == output.in_features
    ):
        return "intermediate.dense", "output.dense"
    if isinstance(module, nn.Sequential) and len(module) >= 3:
        first, *middle, last = list(module)
        if (
            isinstance(first, nn.Linear)
            and isinstance(last, nn.Linear)
            and all(isinstance(m, _ACTIVATIONS) for m in middle)
            and first.out_features == last.in_features
        ):
            return "0", str(len(module) - 1)
    return None


def transformer_groups(
    model: nn.Module, layouts: Sequence[Mapping[str, Any]] = (), heads: HeadUnit = "auto"
) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """``(head groups, FFN groups)`` of a model with attention; ``([], [])`` for a model without any (then channels
    are traced as conv filters / linear neurons instead). Attention named in ``layouts`` replaces the same attention
    found by role; ``heads`` is the unit of grouped-query attention (see :func:`gqa_group`).

    Example:
        >>> heads, ffn = transformer_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> heads, ffn
        ([], [])
    """
    given = projection_head_groups(model, layouts, heads)
    named = {name for g in given for name in g.params()}
    found = [g for g in head_groups(model, heads) if not g.params() & named]
    if not found + given:
        return [], []
    return found + given, ffn_groups(model)
