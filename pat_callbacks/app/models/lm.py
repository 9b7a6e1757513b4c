"""A small GPT-style character model with tied embeddings, and the LightningModule that trains any language model.

Example:
    >>> import torch
    >>> model = LanguageModel(CharGPT(vocab_size=96, context=16, dim=32, layers=2, heads=4))
    >>> tokens = torch.randint(0, 96, (2, 17))
    >>> model(tokens[:, :-1]).shape
    torch.Size([2, 16, 96])
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pat_callbacks.core._validation import check_int, check_number, check_positive

__all__ = ["Block", "CharGPT", "LanguageModel"]


class Block(nn.Module):
    """Pre-norm transformer block: causal ``nn.MultiheadAttention`` (packed q/k/v) and a GELU MLP.

    Example:
        >>> Block(16, 2)(torch.zeros(1, 5, 16)).shape
        torch.Size([1, 5, 16])
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln_1(x)
        x = x + self.drop(self.attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        return x + self.drop(self.mlp(self.ln_2(x)))


class CharGPT(nn.Module):
    """Token and position embeddings, ``layers`` :class:`Block` s, a final LayerNorm and an output head *tied* to
    the token embedding (GPT-2's layout at toy scale). Embeddings are initialised at std 0.02.

    Args:
        vocab_size: number of tokens.
        context: longest sequence (size of the position embedding).
        dim, layers, heads: width, depth and attention heads.
        dropout: dropout after attention and MLP.

    Example:
        >>> net = CharGPT(vocab_size=10, context=8, dim=16, layers=1, heads=2)
        >>> net.head.weight is net.embed.weight, net(torch.zeros(3, 8, dtype=torch.long)).shape
        (True, torch.Size([3, 8, 10]))
    """

    def __init__(
        self,
        vocab_size: int = 96,
        context: int = 128,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = check_int("context", context, minimum=1)
        self.embed = nn.Embedding(check_int("vocab_size", vocab_size, minimum=2), check_int("dim", dim, minimum=1))
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, dropout=dropout) for _ in range(check_int("layers", layers, minimum=1))
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        for embedding in (self.embed, self.pos):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"Expected at most {self.context} tokens, but got a sequence of {t}")
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class LanguageModel(pl.LightningModule):
    """Next-token prediction with any ``net`` mapping tokens to logits (a tensor, or an output with ``.logits``,
    as Hugging Face models return). Batches are ``[batch, context + 1]`` token windows.

    Logs ``train/loss`` (nats), ``val/loss``, ``val/bpc`` and ``test/loss``, ``test/bpc`` (bits per character).
    AdamW with linear warm-up and cosine decay to 10% over ``trainer.estimated_stepping_batches``.

    Args:
        net: the network.
        lr, weight_decay, warmup_steps: AdamW and its schedule (weight decay on matrices only).

    Example:
        >>> lm = LanguageModel(CharGPT(vocab_size=10, context=8, dim=16, layers=1, heads=2))
        >>> float(lm.loss(torch.randint(0, 10, (2, 9)))) > 0
        True
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3, weight_decay: float = 0.1, warmup_steps: int = 100) -> None:
        super().__init__()
        check_positive("lr", lr)
        check_number("weight_decay", weight_decay)
        check_int("warmup_steps", warmup_steps, minimum=0)
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.net(tokens)
        return out.logits if hasattr(out, "logits") else out

    def loss(self, batch: Tensor) -> Tensor:
        """Mean cross-entropy (nats) of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def _evaluate(self, batch: Tensor, stage: str) -> None:
        loss = self.loss(batch)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(batch))
        self.log(f"{stage}/bpc", loss / math.log(2), on_epoch=True, prog_bar=True, batch_size=len(batch))

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        others = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        total = int(total) if math.isfinite(total) else 1000

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
