"""Which parameters are pruned: every weight matrix that a matmul or convolution consumes, found by role.

By default a weight is a target because of what it does, not because its module is on a class list:

- ``nn.Linear`` (incl. ``MultiheadAttention.out_proj``) and ``nn.Conv*`` / ``nn.ConvTranspose*`` ``weight``;
- ``nn.MultiheadAttention``: ``in_proj_weight`` (packed q/k/v) or ``q/k/v_proj_weight``;
- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: ``weight_ih_l*``, ``weight_hh_l*`` (and LSTM's ``weight_hr_l*``);
- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections; its weight is stored ``in x out``);
- any module type added with :func:`register_target`.

Embeddings, norms, biases and frozen parameters (``requires_grad=False``) stay dense unless named in ``include``.
An output head whose weight *is* an input embedding (weight tying, as in GPT-2 and BERT) counts as the embedding.
A tied parameter is one parameter, known by its canonical name (the first in ``named_parameters()``); patterns
match any of its names. ``include`` / ``exclude`` take glob patterns; a pattern that matches nothing is an error
(almost always a typo).

An ``include`` pattern selects by role too: a pattern that covers default targets selects *those* (the weight
matrices by role under it), so ``include="encoder.*"`` on a Hugging Face ``BertModel`` prunes the encoder's
Linear weights and leaves its LayerNorms and biases dense. A pattern that covers no default target selects what it
names (an embedding, a tied head by either name, a custom matrix); one that would then select vectors (norm gains,
biases) is refused without ``allow_vectors=True``, with which every pattern selects every parameter it matches.

A Hugging Face ``pooler`` (BERT's ``pooler.dense``) is an ``nn.Linear`` and stays a default target: whether it is
used depends on the head, not on the module (``BertForSequenceClassification`` classifies from the pooled output,
so leaving it dense there would silently leave a layer on the logits' path unpruned), and a pruner cannot see
which outputs the training loss reads. Where it is unused (sentence embeddings mean-pooled from
``last_hidden_state``, as in sentence-transformers), prune only the encoder with ``include="encoder.*"`` or drop it
with ``exclude="pooler.*"``: its weights would otherwise count towards the sparsity without changing any output.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    >>> list(select_parameters(model))
    ['0.weight', '2.weight']
    >>> list(select_parameters(model, exclude=["2.*"]))
    ['0.weight']
    >>> list(select_parameters(nn.GRU(4, 8, num_layers=2)))
    ['weight_ih_l0', 'weight_hh_l0', 'weight_ih_l1', 'weight_hh_l1']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import Tensor, nn

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "TargetRole",
    "check_real_parameters",
    "describe_targets",
    "normalize_patterns",
    "parameter_aliases",
    "register_target",
    "select_parameters",
    "target_roles",
    "weight_matrices",
]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")


@dataclass(frozen=True)
class TargetRole:
    """Why a parameter is a target: its module type and whether its matrix is stored ``in x out`` (transposed
    with respect to ``nn.Linear``'s ``out x in``; N:M groups and output channels then run along the other axis).

    Example:
        >>> TargetRole("Linear").transposed
        False
    """

    module_type: str
    transposed: bool = False


# User-registered module types: {type: (parameter names, transposed)}.
_REGISTERED: dict[type[nn.Module], tuple[tuple[str, ...], bool]] = {}


def register_target(module_type: type[nn.Module], *param_names: str, transposed: bool = False) -> None:
    """Make the named parameters of every ``module_type`` module default targets (e.g. a custom projection).

    Example:
        >>> import torch
        >>> class Bilinear(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.core = nn.Parameter(torch.randn(4, 4))
        >>> register_target(Bilinear, "core")
        >>> list(select_parameters(nn.Sequential(Bilinear(), nn.Linear(4, 2))))
        ['0.core', '1.weight']
        >>> del _REGISTERED[Bilinear]
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"Expected `module_type` to be an nn.Module subclass, but got {module_type!r}")
    if not param_names or not all(isinstance(n, str) and n for n in param_names):
        raise ValueError(f"Expected parameter names of {module_type.__name__} to register, but got {param_names!r}")
    _REGISTERED[module_type] = (tuple(param_names), bool(transposed))


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _roles_of(module: nn.Module) -> dict[str, TargetRole]:
    """``{local parameter name: role}`` of the weights ``module`` itself consumes in a matmul / convolution."""
    kind = type(module).__name__
    for registered, (names, transposed) in _REGISTERED.items():
        if isinstance(module, registered):
            return {name: TargetRole(kind, transposed) for name in names}
    if isinstance(module, DEFAULT_MODULE_TYPES):
        return {"weight": TargetRole(kind)}
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return {name: TargetRole(kind) for name in names if getattr(module, name, None) is not None}
    if isinstance(module, nn.RNNBase):
        return {
            name: TargetRole(kind) for name, _ in module.named_parameters(recurse=False) if _RNN_WEIGHT.fullmatch(name)
        }
    if _is_hf_conv1d(module):
        return {"weight": TargetRole(kind, transposed=True)}
    return {}


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """``{any name: canonical name}`` for every parameter, tied ones included (canonical: first in
    ``named_parameters()``).

    Example:
        >>> embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = embed.weight
        >>> parameter_aliases(nn.ModuleDict({"embed": embed, "head": head}))
        {'embed.weight': 'embed.weight', 'head.weight': 'embed.weight'}
    """
    canonical: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(param), name)
    return aliases


def target_roles(model: nn.Module) -> dict[str, TargetRole]:
    """``{canonical name: role}`` of every default target of ``model``, in model order (frozen ones included;
    embeddings and output heads tied to them excluded).

    Example:
        >>> roles = target_roles(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16))
        >>> list(roles)
        ['self_attn.in_proj_weight', 'self_attn.out_proj.weight', 'linear1.weight', 'linear2.weight']
    """
    aliases = parameter_aliases(model)
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, _EMBEDDING_TYPES) for p in m.parameters(recurse=False)
    }
    found: dict[str, TargetRole] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, role in _roles_of(module).items():
            param = getattr(module, local, None)
            if not isinstance(param, nn.Parameter) or id(param) in embedding_ids:
                continue
            full = f"{module_name}.{local}" if module_name else local
            found.setdefault(aliases.get(full, full), role)
    order = {name: i for i, name in enumerate(dict(model.named_parameters()))}
    return dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))


def normalize_patterns(name: str, patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    """Turn ``None``, one pattern or a list of patterns into a tuple of strings, refusing anything else.

    Example:
        >>> normalize_patterns("exclude", "fc.*")
        ('fc.*',)
        >>> normalize_patterns("exclude", [3])
        Traceback (most recent call last):
        ...
        ValueError: Expected `exclude` to be a glob pattern or a list of them, but got [3]
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        if not patterns:
            raise ValueError(f"Expected `{name}` to be a glob pattern or a list of them, but got ''")
        return (patterns,)
    items = tuple(patterns) if isinstance(patterns, Sequence) else None
    if items is None or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"Expected `{name}` to be a glob pattern or a list of them, but got {patterns!r}")
    return items


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    allow_vectors: bool = False,
    include_frozen: bool | None = None,
) -> dict[str, nn.Parameter]:
    """Return ``{canonical name: parameter}`` of the parameters to prune, in model order.

    Args:
        model: the module whose parameters are searched.
        include: glob patterns; a pattern that covers default targets selects those it covers (by role: the
            weight matrices under it, not its norms or biases); a pattern that covers none selects every parameter
            it matches (an embedding, a custom matrix). When ``None``, the default targets by role (see the
            module docstring).
        exclude: glob patterns removed from the targets (matched against every name of a tied parameter).
        allow_vectors: let ``include`` select parameters with fewer than 2 dimensions (norm gains, biases); every
            pattern then selects every parameter it matches, whatever its role.
        include_frozen: keep parameters with ``requires_grad=False``; default: only those ``include`` names (by
            role they are left dense: nothing trains them).

    Raises:
        ValueError: a pattern matches no parameter, an include selects vectors without ``allow_vectors``, or
            nothing is left to prune.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
        >>> list(select_parameters(model, include=["2.*"]))                    # by role: the weight, not the bias
        ['2.weight']
        >>> list(select_parameters(model, include=["*"], allow_vectors=True))  # everything the pattern names
        ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
        >>> list(select_parameters(model, include=["1.*"]))
        Traceback (most recent call last):
        ...
        ValueError: `include` selects parameters with fewer than 2 dimensions (norm gains, biases): ['1.weight', \
'1.bias'], under patterns that cover no weight matrix to prune by role; pruning them is rarely intended: name the \
weight matrices to prune or pass allow_vectors=True
    """
    include = normalize_patterns("include", include)
    exclude = normalize_patterns("exclude", exclude)
    aliases = parameter_aliases(model)
    named = dict(model.named_parameters())
    names_of: dict[str, list[str]] = {}
    for alias, canonical in aliases.items():
        names_of.setdefault(canonical, []).append(alias)

    def matches(canonical: str, patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(alias, pattern) for alias in names_of[canonical] for pattern in patterns)

    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(alias, pattern) for alias in aliases):
                raise ValueError(_no_match(argument, pattern, named))
    if include and allow_vectors:
        candidates = [name for name in named if matches(name, include)]
    elif include:
        candidates = _included_by_role(model, named, include, matches)
    else:
        candidates = list(target_roles(model))
    keep_frozen = bool(include) if include_frozen is None else include_frozen
    selected = {
        name: named[name]
        for name in candidates
        if not matches(name, exclude) and (keep_frozen or named[name].requires_grad)
    }
    if not selected:
        raise ValueError(
            f"No parameter to prune in {type(model).__name__} (include={list(include)}, exclude={list(exclude)}); "
            "by default the weights that a Linear, Conv, MultiheadAttention, RNN/GRU/LSTM or Hugging Face Conv1D "
            "layer multiplies are pruned (embeddings, norms, biases and frozen parameters stay dense)"
        )
    check_real_parameters(selected)
    check_dense_gradients(model, selected)
    return selected


def check_dense_gradients(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Refuse targets owned by an embedding with ``sparse=True``: their sparse gradients fit no mask pass,
    criterion history or regrowth score, and would fail at the first update instead of here.

    Example:
        >>> check_dense_gradients(nn.Embedding(4, 2, sparse=True), {"weight": nn.Linear(2, 4).weight})  # not its
        >>> model = nn.Embedding(4, 2, sparse=True)
        >>> check_dense_gradients(model, {"weight": model.weight})
        Traceback (most recent call last):
        ...
        ValueError: Cannot prune 'weight': its Embedding has sparse=True (sparse gradients); build it with ...
    """
    ids = {id(p): name for name, p in params.items()}
    for module in model.modules():
        if isinstance(module, _EMBEDDING_TYPES) and getattr(module, "sparse", False):
            for param in module.parameters(recurse=False):
                if id(param) in ids:
                    raise ValueError(
                        f"Cannot prune {ids[id(param)]!r}: its {type(module).__name__} has sparse=True (sparse "
                        "gradients); build it with sparse=False or leave it out of `include`"
                    )


def check_real_parameters(params: Mapping[str, Tensor]) -> None:
    """Refuse targets that are not real floating-point tensors (complex or integer), naming them and their dtype.

    Scores, masks and sparsity compare magnitudes of real values; a complex weight would fail deep inside
    training (``abs_`` of a complex tensor), so it is refused when the targets are chosen.

    Example:
        >>> import torch
        >>> check_real_parameters({"0.weight": torch.zeros(2, 2)})
        >>> check_real_parameters({"0.weight": torch.zeros(2, 2, dtype=torch.complex64)})
        Traceback (most recent call last):
        ...
        ValueError: Expected real floating-point parameters to prune, but 0.weight is torch.complex64; exclude \
it (exclude=['0.weight']) or keep the layer real (float32, float16, bfloat16, float64)
    """
    bad = {name: p.dtype for name, p in params.items() if not p.is_floating_point()}
    if bad:
        described = ", ".join(f"{name} is {dtype}" for name, dtype in bad.items())
        raise ValueError(
            f"Expected real floating-point parameters to prune, but {described}; exclude "
            f"{'it' if len(bad) == 1 else 'them'} (exclude={list(bad)}) or keep the layer real (float32, float16, "
            "bfloat16, float64)"
        )


def _included_by_role(
    model: nn.Module, named: Mapping[str, nn.Parameter], include: Sequence[str], matches: Callable[..., bool]
) -> list[str]:
    """The parameters ``include`` selects without ``allow_vectors``: per pattern, the default targets it covers,
    or every parameter it matches when it covers none (refusing vectors there), in model order."""
    roles = target_roles(model)
    chosen: set[str] = set()
    for pattern in include:
        by_role = [name for name in roles if matches(name, (pattern,))]
        chosen.update(by_role or (name for name in named if matches(name, (pattern,))))
    candidates = [name for name in named if name in chosen]
    vectors = [name for name in candidates if named[name].dim() < 2]
    if vectors:
        raise ValueError(
            f"`include` selects parameters with fewer than 2 dimensions (norm gains, biases): {vectors}, under "
            "patterns that cover no weight matrix to prune by role; pruning them is rarely intended: name the weight "
            "matrices to prune or pass allow_vectors=True"
        )
    return candidates


def weight_matrices(model: nn.Module, *, embeddings: bool = True) -> dict[str, nn.Parameter]:
    """The model's *weights*, as every report means them: each distinct parameter with 2 or more dimensions, a tied
    tensor once under its first name, embeddings included (``pruning/sparsity_all``, ``metrics.json``'s
    ``sparsity_all`` and ``weight_sparsity``). ``embeddings=False`` leaves out embedding tables and the output
    heads tied to them.

    Example:
        >>> model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 5))
        >>> model[2].weight = model[0].weight  # a tied output head
        >>> list(weight_matrices(model)), list(weight_matrices(model, embeddings=False))
        (['0.weight'], [])
    """
    skipped = set()
    if not embeddings:
        skipped = {id(p) for m in model.modules() if isinstance(m, _EMBEDDING_TYPES) for p in m.parameters()}
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2 and id(p) not in skipped}


def describe_targets(model: nn.Module, targets: Mapping[str, nn.Parameter]) -> str:
    """A table of the weight matrices (and any other target) of ``model``: pruned or left dense, and why.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        >>> print(describe_targets(model, select_parameters(model)))  # doctest: +NORMALIZE_WHITESPACE
        parameter  shape    numel  pruned  role
        0.weight   (10, 4)     40  no      embedding
        1.weight   (4, 4)      16  yes     Linear
        targets: 16 of 56 weight-matrix entries (28.6%) in 1 parameter; 1 left dense
    """
    roles = target_roles(model)
    aliases = parameter_aliases(model)
    tied = {canonical: [a for a, c in aliases.items() if c == canonical and a != canonical] for canonical in aliases}
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, _EMBEDDING_TYPES) for p in m.parameters()}
    named = dict(model.named_parameters())
    shown = {**weight_matrices(model), **{name: named[name] for name in targets if name in named}}
    rows = [("parameter", "shape", "numel", "pruned", "role")]
    for name, param in shown.items():
        if id(param) in embedding_ids:
            role = "embedding"
        elif name in roles:
            role = roles[name].module_type + (" (in x out)" if roles[name].transposed else "")
        else:
            role = "other"
        if not param.requires_grad:
            role += ", frozen"
        if tied.get(name):
            role += f", tied to {', '.join(tied[name])}"
        rows.append((name, str(tuple(param.shape)), str(param.numel()), "yes" if name in targets else "no", role))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(
            cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    total = sum(p.numel() for p in weight_matrices(model).values())
    covered = sum(p.numel() for p in targets.values())
    dense = len(shown) - len(targets)
    share = 100 * covered / max(total, 1)
    plural = "" if len(targets) == 1 else "s"
    lines.append(
        f"targets: {covered} of {total} weight-matrix entries ({share:.1f}%) in {len(targets)} parameter{plural}; "
        f"{dense} left dense"
    )
    return "\n".join(line.rstrip() for line in lines)


def _no_match(argument: str, pattern: str, named: dict[str, nn.Parameter]) -> str:
    sample = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
    return f"`{argument}` pattern {pattern!r} matches no parameter; parameter names are: {sample}"
