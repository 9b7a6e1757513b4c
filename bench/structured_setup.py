"""Seconds StructuredPruner's setup (group discovery) takes on a tiny random Llama (2 layers, hidden 64, 4 heads,
2 key/value heads), the model of issue #21. Run: ``PYTHONPATH=$PWD python bench/structured_setup.py``."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pat_callbacks.app.models import LanguageModel
from pat_callbacks.structured import StructuredPruner


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    module = LanguageModel(LlamaForCausalLM(config))
    start = time.perf_counter()
    pruner = StructuredPruner(module, torch.randint(0, 96, (2, 16)))
    seconds = time.perf_counter() - start
    groups = ", ".join(f"{g.root} {g.kind} x{g.n_channels}" for g in pruner.groups)
    print(f"setup {seconds:.2f} s; {len(pruner.groups)} groups: {groups}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help says what it measures
    main()
