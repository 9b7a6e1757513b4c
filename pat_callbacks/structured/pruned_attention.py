"""``nn.MultiheadAttention`` with fewer heads than its width allows: what
:func:`~pat_callbacks.structured.cutting.shrink_transformer` puts in place of one whose heads were pruned.

Example:
    >>> import torch
    >>> mha = nn.MultiheadAttention(8, 4).eval()
    >>> PrunedMultiheadAttention.from_heads(mha, [0, 2]).in_proj_weight.shape
    torch.Size([12, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads`` heads of ``head_dim`` whose total may be smaller than
    ``embed_dim`` (what is left after pruning heads). Same parameter names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) and call signature; ``_qkv_same_embed_dim`` is ``False`` so ``nn.TransformerEncoderLayer``'s fused
    fast path (which assumes the full width) is not taken. Built by
    :func:`~pat_callbacks.structured.cutting.shrink_transformer`.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 3, 8)
        >>> torch.allclose(PrunedMultiheadAttention.from_heads(mha, [0, 1])(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_heads(cls, mha: nn.Module, keep: Sequence[int]) -> PrunedMultiheadAttention:
        """The attention of ``mha`` restricted to the heads ``keep`` (weights copied)."""
        width, inner = mha.head_dim, mha.num_heads * mha.head_dim
        block = torch.cat([torch.arange(h * width, (h + 1) * width) for h in keep]).to(mha.in_proj_weight.device)
        rows = torch.cat([block + k * inner for k in range(3)])
        new = cls(
            mha.embed_dim,
            len(keep),
            width,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            dropout=float(mha.dropout),
        ).to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight[rows])
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias[rows])
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight[:, block])
        new.train(mha.training)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        batch, t_q, t_k = query.shape[0], query.shape[1], key.shape[1]

        def heads(x: Tensor, w: Tensor, b: Tensor | None, t: int) -> Tensor:
            return F.linear(x, w, b).view(batch, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q, t_q), heads(key, w_k, b_k, t_k), heads(value, w_v, b_v, t_k)
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, self.num_heads, t_q, t_k)
        if is_causal and mask is None:
            mask = torch.full((t_q, t_k), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(batch, t_q, inner)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    dtype: torch.dtype,
    batch: int,
    heads: int,
    t_q: int,
    t_k: int,
) -> Tensor | None:
    """MultiheadAttention's masks (bool: True = not allowed; float: added) as one additive float mask."""
    total = None
    for mask, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, t_k))):
        if mask is None:
            continue
        additive = (
            torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            if mask.dtype == torch.bool
            else mask.to(dtype)
        )
        if shape is not None:
            additive = additive.view(shape)
        elif additive.dim() == 3:
            additive = additive.view(batch, heads, t_q, t_k)
        total = additive if total is None else total + additive
    return total
