"""Input statistics of the pruned layers over calibration batches: what Wanda, SparseGPT and OWL read.

For every target weight ``W`` (viewed as ``out x in``, the way ``nn.Linear`` stores it) the rows ``x`` of its input
matrix ``X`` (``n x in``: one row per token, per sample or per convolution patch) are streamed into

- ``sq_norms[name]``: the squared column norms ``||X_j||^2 = sum_x x_j^2`` (float64; Wanda, OWL);
- ``hessians[name]``: ``X^T X = sum_x x x^T`` (``in x in``, float32 products summed in float32; SparseGPT);
- ``rows[name]``: how many rows were seen.

The inputs are read by forward (pre-)hooks that exist only inside :meth:`Calibration.collect` (removed in a
``finally``, even when a forward pass raises), so the library's "no forward hooks during training" guarantee holds.
Under ``torch.distributed`` the sums are all-reduced over the ranks when collection ends, so every rank holds the
statistics of every rank's batches. :meth:`Calibration.state_dict` is plain tensors and numbers.

What a target's input is:

- ``nn.Linear`` and Hugging Face ``Conv1D`` (stored ``in x out``; statistics follow its ``in`` axis): the module's
  input, flattened to ``[-1, in]``;
- ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, any padding mode): the unfolded input patches
  (``in_channels x kernel`` columns, in the order of ``weight.flatten(1)``);
- ``nn.MultiheadAttention``: ``in_proj_weight`` (self-attention: query, key and value the same tensor) or
  ``q/k/v_proj_weight`` take the query / key / value; ``out_proj.weight`` takes the attention context before the
  output projection, which the module never exposes: it is recomputed in the hook with an identity projection
  (one extra attention per calibration batch, during calibration only).

Other targets (grouped or 3-D convolutions, transposed convolutions, RNN weights, cross-attention ``in_proj_weight``,
registered custom types) are refused by name, with the ``exclude=[...]`` that leaves them out.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 2)
    >>> calib = Calibration(layer, {"weight": layer.weight}, hessians=True)
    >>> x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    >>> _ = calib.collect([x])
    >>> calib.sq_norms["weight"].tolist(), calib.rows["weight"]
    ([10.0, 4.0, 1.0], 2)
    >>> calib.hessians["weight"].tolist()
    [[10.0, 2.0, 3.0], [2.0, 4.0, 0.0], [3.0, 0.0, 1.0]]
    >>> sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in layer.modules())  # none left
    0
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pat_callbacks.core.sharding import local

__all__ = ["Calibration", "InputReader", "attention_mask_of", "default_forward", "input_readers"]


@dataclass(frozen=True)
class InputReader:
    """Where a target's input comes from: the module that consumes it, what kind of input, and its width.

    Attributes:
        module: the name of the consuming module (``""``: the model itself).
        kind: ``"features"`` (last dimension), ``"patches"`` (unfolded conv input), ``"query"``, ``"key"``,
            ``"value"`` (of an attention) or ``"context"`` (attention output before its output projection).
        columns: the input width (the ``in`` of ``out x in``).

    Example:
        >>> from torch import nn
        >>> input_readers(nn.Sequential(nn.Linear(4, 2)), ["0.weight"])["0.weight"]
        InputReader(module='0', kind='features', columns=4)
    """

    module: str
    kind: str
    columns: int


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: ``model(**batch)`` for mappings (a Hugging Face ``BatchEncoding``; ``labels``
    left out: calibration needs no loss), ``model(batch[0])`` for ``(inputs, targets, ...)`` tuples, else
    ``model(batch)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> default_forward(nn.Identity(), (torch.ones(1), torch.zeros(1))).tolist()
        [1.0]
        >>> class Net(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids * attention_mask
        >>> default_forward(Net(), {"input_ids": torch.ones(2), "attention_mask": torch.tensor([1, 0]),
        ...                         "labels": torch.zeros(2)}).tolist()
        [1.0, 0.0]
    """
    if isinstance(batch, Mapping):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def attention_mask_of(batch: Any) -> Tensor | None:
    """The ``attention_mask`` a batch carries (a mapping's ``"attention_mask"``; ``None`` otherwise): positions where
    it is 0 (padding) enter no statistics.

    Example:
        >>> import torch
        >>> attention_mask_of({"input_ids": torch.ones(1, 2), "attention_mask": torch.tensor([[1, 0]])}).tolist()
        [[1, 0]]
        >>> attention_mask_of(torch.ones(2)) is None
        True
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, Tensor) else None
    return None


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(
        f"one-shot calibration cannot read the input of {name!r} ({why}); leave it dense with exclude=[{name!r}]"
    )


def _reader_for(module_name: str, module: nn.Module, local_name: str, full: str) -> InputReader:
    """The reader of one target, or a ``ValueError`` saying why its input cannot be read."""
    if isinstance(module, nn.MultiheadAttention):
        if local_name == "in_proj_weight":
            return InputReader(module_name, "query", module.embed_dim)  # checked to be self-attention in the hook
        kinds = {"q_proj_weight": ("query", module.embed_dim), "k_proj_weight": ("key", module.kdim)}
        kinds["v_proj_weight"] = ("value", module.vdim)
        if local_name in kinds:
            return InputReader(module_name, *kinds[local_name])
    if isinstance(module, nn.Linear) and local_name == "weight":
        return InputReader(module_name, "features", module.in_features)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        raise _refuse(full, "transposed convolution")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and local_name == "weight":
        if module.groups != 1:
            raise _refuse(full, f"grouped convolution, groups={module.groups}")
        return InputReader(module_name, "patches", math.prod(module.weight.shape[1:]))
    if isinstance(module, nn.Conv3d):
        raise _refuse(full, "3-D convolution: no unfold")
    if type(module).__name__ == "Conv1D" and local_name == "weight":  # Hugging Face, stored in x out
        return InputReader(module_name, "features", module.weight.shape[0])
    if isinstance(module, nn.RNNBase):
        raise _refuse(full, f"{type(module).__name__} weights see hidden states inside the recurrence")
    raise _refuse(full, f"{type(module).__name__}.{local_name} is not a Linear, Conv1d/2d, Conv1D or attention weight")


def input_readers(model: nn.Module, names: Iterable[str]) -> dict[str, InputReader]:
    """``{target name: InputReader}`` for ``names`` (canonical parameter names of ``model``, e.g. a Pruner's
    ``params``); refuses, naming them, targets whose input cannot be read.

    Example:
        >>> from torch import nn
        >>> mha = nn.MultiheadAttention(8, 2)
        >>> {n: r.kind for n, r in input_readers(mha, ["in_proj_weight", "out_proj.weight"]).items()}
        {'in_proj_weight': 'query', 'out_proj.weight': 'context'}
        >>> input_readers(nn.GRU(4, 4), ["weight_ih_l0"])
        Traceback (most recent call last):
        ...
        ValueError: one-shot calibration cannot read the input of 'weight_ih_l0' (GRU weights see hidden states \
inside the recurrence); leave it dense with exclude=['weight_ih_l0']
    """
    wanted = list(names)
    found: dict[str, InputReader] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    attention_outputs = {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in modules.items()
        if isinstance(module, nn.MultiheadAttention)
    }
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for module_name, module in modules.items():
        for local_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module_name, module, local_name))
    named = dict(model.named_parameters())
    for name in wanted:
        if name not in named:
            raise ValueError(f"{name!r} is not a parameter of {type(model).__name__}")
        module_name, module, local_name = owners[id(named[name])]
        reader = _reader_for(module_name, module, local_name, name)
        if module_name in attention_outputs:  # nn.MultiheadAttention calls F.linear on out_proj.weight itself
            parent = module_name.rsplit(".", 1)[0] if "." in module_name else ""
            reader = InputReader(parent, "context", reader.columns)
        found[name] = reader
    return found


# ----------------------------------------------------------------------------------------------- input matrices
def _features(inputs: Tensor, columns: int) -> Tensor:
    return inputs.detach().reshape(-1, columns)


def _patches(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Unfolded input patches ``[-1, in_channels * prod(kernel)]``, column order as ``weight.flatten(1)``."""
    x = inputs.detach()
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:  # unbatched
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # string paddings ('same') included
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if spatial == 1:
        x, kernel, stride, dilation = x.unsqueeze(2), (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _attention_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _attention_context(module: nn.MultiheadAttention, call: Mapping[str, Any]) -> Tensor:
    """The attention output before ``out_proj`` (``[-1, embed_dim]``), recomputed with an identity projection."""
    query, key, value = call["query"], call["key"], call["value"]
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    eye = torch.eye(module.embed_dim, dtype=query.dtype, device=query.device)
    separate = not module._qkv_same_embed_dim
    context, _ = F.multi_head_attention_forward(
        query,
        key,
        value,
        module.embed_dim,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        0.0,
        eye,
        None,
        training=False,
        key_padding_mask=call["key_padding_mask"],
        need_weights=False,
        attn_mask=call["attn_mask"],
        use_separate_proj_weight=separate,
        q_proj_weight=module.q_proj_weight if separate else None,
        k_proj_weight=module.k_proj_weight if separate else None,
        v_proj_weight=module.v_proj_weight if separate else None,
        average_attn_weights=call["average_attn_weights"],
        is_causal=call["is_causal"],
    )
    return context.detach().reshape(-1, module.embed_dim)


# --------------------------------------------------------------------------------------------------- statistics
class Calibration:
    """Streamed input statistics (squared column norms, ``X^T X``) of target layers over calibration batches.

    Args:
        model: the model the batches run through.
        names: the target parameters (canonical names, e.g. ``Pruner(model).params``).
        norms: collect squared column norms (Wanda, OWL).
        hessians: collect ``X^T X`` (SparseGPT; ``in x in`` floats per target, on the parameter's device).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> calib = Calibration(model, ["0.weight", "2.weight"]).collect([torch.randn(5, 4), torch.randn(3, 4)])
        >>> calib.rows, tuple(calib.norms("2.weight").shape)
        ({'0.weight': 8, '2.weight': 8}, (8,))
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, norms: bool = True, hessians: bool = False) -> None:
        if not (norms or hessians):
            raise ValueError("Expected `norms` or `hessians` (or both) to be collected, but got neither")
        self.model = model
        self.readers = input_readers(model, names)
        self.collect_norms, self.collect_hessians = bool(norms), bool(hessians)
        self.sq_norms: dict[str, Tensor] = {}
        self.hessians: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self.batches = 0
        self._token_mask: Tensor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.readers)} targets, {self.batches} batches)"

    # -------------------------------------------------------------------- reading
    def norms(self, name: str) -> Tensor:
        """``||X_j||_2`` per input column of ``name`` (float64)."""
        if name not in self.sq_norms:
            raise KeyError(f"No input norms for {name!r}: collect with norms=True over at least one batch first")
        return self.sq_norms[name].sqrt()

    def pop_hessian(self, name: str) -> Tensor:
        """Hand over (and forget) ``name``'s ``X^T X``: SparseGPT frees each Hessian after its layer."""
        if name not in self.hessians:
            raise KeyError(f"No Hessian for {name!r}: collect with hessians=True over at least one batch first")
        return self.hessians.pop(name)

    # ------------------------------------------------------------------ collecting
    def collect(
        self,
        batches: Iterable[Any],
        forward: Callable[[nn.Module, Any], Any] | None = None,
        *,
        only: Iterable[str] | None = None,
        mask_of: Callable[[Any], Tensor | None] = attention_mask_of,
    ) -> Calibration:
        """Run ``forward(model, batch)`` on every batch (no gradients, every module in eval mode) with input hooks
        on the targets' modules (``only``: a subset of the targets), removed afterwards even if a batch raises; then
        all-reduce the sums over ranks. Statistics add up over calls. Returns ``self``.

        ``mask_of(batch)``: the batch's ``[batch, tokens]`` attention mask (default: a mapping's
        ``"attention_mask"``); the rows of padded positions (mask 0) are left out of the statistics of every input
        laid out ``[batch, tokens, features]``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(2, 1)
            >>> batch = {"input": torch.ones(1, 3, 2), "attention_mask": torch.tensor([[1, 1, 0]])}
            >>> calib = Calibration(layer, ["weight"]).collect([batch], lambda m, b: m(b["input"]))
            >>> calib.rows
            {'weight': 2}
        """
        forward = forward or default_forward
        names = list(self.readers) if only is None else list(only)
        unknown = sorted(set(names) - set(self.readers))
        if unknown:
            raise ValueError(f"`only` names targets this calibration does not know: {unknown}")
        modes = {module: module.training for module in self.model.modules()}
        seen = 0
        try:
            with self._hooks(names), torch.no_grad():
                self.model.eval()
                for batch in batches:
                    mask = mask_of(batch)
                    self._token_mask = None if mask is None else mask.detach().reshape(mask.shape[0], -1) != 0
                    forward(self.model, batch)
                    seen += 1
        finally:
            self._token_mask = None
            for module, mode in modes.items():
                module.training = mode
        if seen == 0:
            raise ValueError("Expected at least one calibration batch, but the iterable was empty")
        self.batches += seen
        self._all_reduce(names)
        return self

    @contextmanager
    def _hooks(self, names: list[str]) -> Iterator[None]:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        by_module: dict[str, list[str]] = {}
        for name in names:
            by_module.setdefault(self.readers[name].module, []).append(name)
        handles = []
        try:
            for module_name, targets in by_module.items():
                module = modules[module_name]
                hook = self._make_hook(module, targets)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_hook(self, module: nn.Module, targets: list[str]) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                call = _attention_inputs(mod, args, kwargs)
                context = None
                for name in targets:
                    kind = self.readers[name].kind
                    if kind == "context":
                        context = _attention_context(mod, call) if context is None else context
                        self._add(name, context)
                        continue
                    if name.endswith("in_proj_weight") and not (call["query"] is call["key"] is call["value"]):
                        raise _refuse(name, "cross-attention: query, key and value differ")
                    self._add(name, self._unpadded(call[kind], self.readers[name].columns, mod.batch_first))
                return
            inputs = args[0] if args else next(iter(kwargs.values()))
            for name in targets:
                reader = self.readers[name]
                if reader.kind == "patches":
                    self._add(name, _patches(mod, inputs))
                else:
                    self._add(name, self._unpadded(inputs, reader.columns))

        return hook

    def _unpadded(self, inputs: Tensor, columns: int, batch_first: bool = True) -> Tensor:
        """The input rows ``[-1, columns]``, those of padded positions left out when the batch has a mask."""
        rows = _features(inputs, columns)
        mask = self._token_mask
        if mask is None or not batch_first or inputs.dim() < 3 or tuple(inputs.shape[:2]) != tuple(mask.shape):
            return rows
        return rows[mask.to(rows.device).reshape(-1).repeat_interleave(rows.shape[0] // mask.numel())]

    def _add(self, name: str, rows: Tensor) -> None:
        x = rows.float()
        if self.collect_norms:
            square = x.square().sum(0).double()
            self.sq_norms[name] = self.sq_norms[name].add_(square) if name in self.sq_norms else square
        if self.collect_hessians:
            product = x.t() @ x
            self.hessians[name] = self.hessians[name].add_(product) if name in self.hessians else product
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]

    def _all_reduce(self, names: list[str]) -> None:
        """Sum every rank's statistics (a no-op in one process)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in names:
            for table in (self.sq_norms, self.hessians):
                if name in table:
                    dist.all_reduce(table[name])
            count = torch.tensor([self.rows.get(name, 0)], dtype=torch.int64, device=self._device(name))
            dist.all_reduce(count)
            self.rows[name] = int(count.item())

    def _device(self, name: str) -> torch.device:
        named = dict(self.model.named_parameters())
        return local(named[name]).device if name in named else torch.device("cpu")

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers: ``sq_norms``, ``hessians``, ``rows``, ``batches``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(2, 1)
            >>> state = Calibration(layer, ["weight"]).collect([torch.ones(3, 2)]).state_dict()
            >>> again = Calibration(layer, ["weight"]); again.load_state_dict(state)
            >>> again.sq_norms["weight"].tolist(), again.rows
            ([3.0, 3.0], {'weight': 3})
        """
        return {
            "sq_norms": {name: value.clone() for name, value in self.sq_norms.items()},
            "hessians": {name: value.clone() for name, value in self.hessians.items()},
            "rows": dict(self.rows),
            "batches": self.batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (statistics of unknown targets are refused)."""
        for table in ("sq_norms", "hessians"):
            unknown = sorted(set(state.get(table, {})) - set(self.readers))
            if unknown:
                raise ValueError(f"The saved calibration has {table} of {unknown}, which are not targets here")
        self.sq_norms = {name: value.clone() for name, value in state.get("sq_norms", {}).items()}
        self.hessians = {name: value.clone() for name, value in state.get("hessians", {}).items()}
        self.rows = {name: int(value) for name, value in state.get("rows", {}).items()}
        self.batches = int(state.get("batches", 0))
