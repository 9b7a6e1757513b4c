"""The test zoo: models people prune, ours and ones no one here wrote (Hugging Face from small random configs).

Each case builds a fresh LightningModule and its (offline) data, and names the parameters that must be pruned by
default and those that must stay dense (embeddings, output heads tied to them).
"""

from __future__ import annotations

import inspect
import json
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from pat_callbacks.app.data import CharDataModule, DigitsDataModule
from pat_callbacks.app.data.text import VOCAB_SIZE
from pat_callbacks.app.models import CharGPT, Classifier, LanguageModel

CONTEXT = 16


class TransformerClassifier(nn.Module):
    """Digits as 8 tokens of 8 features: linear embedding, learned positions, nn.TransformerEncoder, mean-pool."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos).mean(1))


class RecurrentClassifier(nn.Module):
    """Digits as a sequence of 8 rows of 8 pixels through a GRU or an LSTM; the last state classifies."""

    def __init__(self, kind: str = "gru", hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](8, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.view(-1, 8, 8))
        return self.fc(out[:, -1])


class SmallResNet(nn.Module):
    """Digits as 1x8x8 images: conv-BN stem, one residual block (conv-BN-ReLU-conv-BN + skip), pool, linear."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.fc = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x.view(-1, 1, 8, 8))
        h = torch.relu(h + self.block(h))
        return self.fc(h.mean((2, 3)))


def text_data(batch_size: int = 8) -> CharDataModule:
    """Real text that ships with Python: the sources of a few standard-library modules."""
    documents = {module.__name__: inspect.getsource(module) for module in (textwrap, string, json)}
    return CharDataModule(documents, context=CONTEXT, batch_size=batch_size, val_docs=["json"], max_eval_windows=64)


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB_SIZE, n_positions=CONTEXT, bos_token_id=0, eos_token_id=0
    )
    # Dropout draws from torch's global RNG, which Lightning checkpoints do not restore: off, for exact resume.
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
    )
    return BertForMaskedLM(config)


@dataclass
class ZooCase:
    build: Callable[[], pl.LightningModule]
    data: Callable[[], pl.LightningDataModule]
    targets: set[str]
    dense: set[str] = field(default_factory=set)  # must keep every entry (embeddings, tied heads)
    example: Callable[[], Tensor] = lambda: torch.rand(2, 64)


def _layers(prefix: str, count: int, names: tuple[str, ...]) -> set[str]:
    return {f"{prefix}.{i}.{name}" for i in range(count) for name in names}


def _digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


def _tokens() -> Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, CONTEXT))


ZOO: dict[str, ZooCase] = {
    "transformer_encoder": ZooCase(
        build=lambda: Classifier(TransformerClassifier()),
        data=_digits,
        targets={"net.embed.weight", "net.fc.weight"}
        | _layers(
            "net.encoder.layers",
            2,
            ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"),
        ),
    ),
    "gpt_tied": ZooCase(
        build=lambda: LanguageModel(CharGPT(VOCAB_SIZE, context=CONTEXT, dim=32, layers=2, heads=4), warmup_steps=2),
        data=text_data,
        targets=_layers(
            "net.blocks", 2, ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight")
        ),
        dense={"net.embed.weight", "net.pos.weight"},
        example=_tokens,
    ),
    "gru": ZooCase(
        build=lambda: Classifier(RecurrentClassifier("gru")),
        data=_digits,
        targets={"net.fc.weight"} | {f"net.rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)},
    ),
    "lstm": ZooCase(
        build=lambda: Classifier(RecurrentClassifier("lstm")),
        data=_digits,
        targets={"net.fc.weight"} | {f"net.rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)},
    ),
    "resnet_bn": ZooCase(
        build=lambda: Classifier(SmallResNet()),
        data=_digits,
        targets={"net.stem.0.weight", "net.block.0.weight", "net.block.3.weight", "net.fc.weight"},
    ),
    "hf_gpt2": ZooCase(
        build=lambda: LanguageModel(hf_gpt2(), warmup_steps=2),
        data=text_data,
        targets=_layers(
            "net.transformer.h", 2, ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ),
        dense={"net.transformer.wte.weight", "net.transformer.wpe.weight"},
        example=_tokens,
    ),
    "hf_bert": ZooCase(
        build=lambda: LanguageModel(hf_bert(), warmup_steps=2),
        data=text_data,
        targets={"net.cls.predictions.transform.dense.weight"}
        | _layers(
            "net.bert.encoder.layer",
            2,
            (
                "attention.self.query.weight",
                "attention.self.key.weight",
                "attention.self.value.weight",
                "attention.output.dense.weight",
                "intermediate.dense.weight",
                "output.dense.weight",
            ),
        ),
        dense={"net.bert.embeddings.word_embeddings.weight", "net.bert.embeddings.position_embeddings.weight"},
        example=_tokens,
    ),
}


# ---------------------------------------------------------------- today's decoders (GQA / MQA attention, SwiGLU MLPs)
def _decoder_config(kind: str) -> Any:
    """A tiny random config (2 layers, width 64, 4 query heads): Llama and Qwen2 (q/k/v biases) with 2 key/value
    heads, Mistral with 2 and a sliding window shorter than the context, Gemma with one (multi-query) and a tied
    head, Mixtral with 4 experts (2 per token)."""
    import transformers

    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2 * CONTEXT,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    extra: dict[str, Any] = {
        "llama": {},
        "qwen2": {},
        "mistral": {"sliding_window": CONTEXT // 2},
        "gemma": {"num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": True},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
    }[kind]
    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "mixtral": transformers.MixtralConfig,
    }[kind]
    return config_class(**(common | extra))


def hf_decoder(kind: str) -> nn.Module:
    """A tiny random Hugging Face causal LM of ``kind`` (``from_config``: nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_decoder_config(kind))


def hf_qwen2_moe() -> nn.Module:
    """A tiny random Qwen2-MoE (2 layers, width 64, 4 experts of 32 neurons fused in 3D weights, a shared expert of
    64 neurons), seeded and in eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@dataclass
class DecoderCase:
    kind: str
    heads: int = 4  # query heads per layer
    kv_heads: int = 2
    moe: bool = False  # experts fused in 3D weights: left whole, with a note
    tied: bool = False

    def build(self) -> pl.LightningModule:
        return LanguageModel(hf_decoder(self.kind), warmup_steps=2)


DECODERS: dict[str, DecoderCase] = {
    "hf_llama": DecoderCase("llama"),
    "hf_qwen2": DecoderCase("qwen2"),
    "hf_mistral": DecoderCase("mistral"),
    "hf_gemma": DecoderCase("gemma", kv_heads=1, tied=True),
    "hf_mixtral": DecoderCase("mixtral", moe=True),
}
"""Llama / Qwen2 / Mistral / Gemma-style decoders (and a mixture-of-experts one), pruned by StructuredPruning."""
