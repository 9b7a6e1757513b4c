"""Tiny pretrained-model folders written to a temporary directory, as ``save_pretrained`` writes them: a random
2-layer BERT encoder or GPT-2 causal LM and a character-level WordPiece tokenizer built from a vocabulary written
here (no download). ``model=hf_pretrained model.path=<folder>`` and the README's end-to-end block load them."""

from __future__ import annotations

from pathlib import Path

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_LETTERS, *(f"##{c}" for c in _LETTERS), *".,;:!?'-"]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_model_folder(folder: Path, kind: str = "bert", seed: int = 0) -> Path:
    """Write a tiny random ``kind`` ("bert": ``BertModel``; "gpt2": ``GPT2LMHeadModel``) and its tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertModel(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=3
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(f"Unknown kind {kind!r}; expected 'bert' or 'gpt2'")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder
