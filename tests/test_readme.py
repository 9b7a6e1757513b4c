"""The README's (and docs/'s) Python blocks run as a user would paste them.

Every ```python block of README.md, docs/*.md and recipes/README.md runs here, in a fresh namespace and an empty
working directory. The only names a block may leave undefined are the ones it declares as the user's own in a
comment of the form ``# model, datamodule: your LightningModule and LightningDataModule``; the test stands in a
small one for each (``_GLUE``), and nothing else. A block that needs another name fails here, naming it.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "pat_callbacks" / "conf" / "recipe" / "README.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_DECLARED = re.compile(r"^\s*#\s*(\w+(?:\s*,\s*\w+)*)\s*:\s*your\b(.*)$", re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return _BLOCK.search(section).group(1)


def declared_glue(code: str) -> dict[str, str]:
    """``{name: description}`` of the names a block says are the user's (``# a, b: your ...`` comments)."""
    return {
        name.strip(): description.strip() for names, description in _DECLARED.findall(code) for name in names.split(",")
    }


# Stand-ins for what a block declares as the user's: small and fast, built only when a block asks for them.
def _classifier(description: str) -> Any:
    from pat_callbacks.app.models import MLP, Classifier

    return Classifier(MLP(in_features=64, hidden_sizes=[32], num_classes=10), num_classes=10)


def _digits(description: str) -> Any:
    from pat_callbacks.app.data import DigitsDataModule

    return DigitsDataModule(batch_size=64)


def _one_epoch_of_3000_batches(description: str) -> Any:
    """64 features, 10 classes, batches of 4: up to 3,000 steps in one epoch (no epoch-end overhead)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12_000, 64, generator=generator)
    data = TensorDataset(x, (x[:, :10].argmax(dim=1)))
    return pl.LightningDataModule.from_datasets(train_dataset=data, batch_size=4)


def _data(description: str) -> Any:
    if any(word in description for word in ("token", "text", "decoder")):
        from tests.zoo.models import text_data

        return text_data()
    return _one_epoch_of_3000_batches(description)


def _batches(description: str) -> list:
    data = _digits(description)
    data.setup("fit")
    return [x for x, _ in list(data.train_dataloader())[:4]]


def _decoder(description: str) -> Any:
    from tests.zoo.models import DECODERS

    return DECODERS["hf_llama"].build()


def _module(description: str) -> Any:
    return _decoder(description) if "decoder" in description else _classifier(description)


def _transformer_factory(description: str) -> Callable[[], Any]:
    from tests.zoo.models import TransformerClassifier

    return TransformerClassifier


def _pruning(description: str) -> Any:
    from pat_callbacks import GradualPruning

    return GradualPruning(sparsity=0.5)


def _model_folder(description: str) -> str:
    """A tiny random BERT encoder and its tokenizer, written as ``save_pretrained`` writes them (no download)."""
    from tests.app.hf_folders import tiny_model_folder

    return str(tiny_model_folder(Path("hf-model").resolve(), "bert"))


_GLUE: dict[str, Callable[[str], Any]] = {
    "model": _classifier,
    "module": _module,
    "datamodule": _data,
    "data": _data,
    "batches": _batches,
    "build_my_transformer": _transformer_factory,
    "pruning": _pruning,
    "model_folder": _model_folder,
}


def _undefined_names(code: str, namespace: dict) -> set[str]:
    """Names the block loads but neither defines nor imports (a rough, sufficient check)."""
    import symtable

    table = symtable.symtable(code, "<block>", "exec")
    defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    names: set[str] = set()

    def visit(scope: symtable.SymbolTable) -> None:
        for symbol in scope.get_symbols():
            used = symbol.is_global() or (scope.get_type() == "module" and symbol.is_referenced())
            if used and not symbol.is_assigned() and not symbol.is_imported():
                names.add(symbol.get_name())
        for child in scope.get_children():
            visit(child)

    visit(table)
    return {name for name in names - defined if name not in namespace and not hasattr(builtins, name)}


BLOCKS = _blocks()


def _quiet_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's ``PL_TRAINER_*`` variables: defaults for arguments a block leaves out (no bar, no checkpoint, no
    logger files); an argument the block passes (``max_steps``, ``callbacks``) still wins. Nothing is made shorter."""
    for name in ("ENABLE_PROGRESS_BAR", "ENABLE_CHECKPOINTING", "ENABLE_MODEL_SUMMARY", "LOGGER"):
        monkeypatch.setenv(f"PL_TRAINER_{name}", "0")
    monkeypatch.setenv("PL_TRAINER_ACCELERATOR", "cpu")


def test_the_documents_have_python_blocks_and_every_glue_name_is_known():
    assert len(BLOCKS) >= 10
    unknown = {where: set(declared_glue(code)) - set(_GLUE) for where, code in BLOCKS}
    assert not any(unknown.values()), unknown


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[where for where, _ in BLOCKS])
def test_every_python_block_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (lightning_logs/, checkpoints, save_pretrained) stays here
    _quiet_trainers(monkeypatch)
    glue = declared_glue(code)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    missing = _undefined_names(code, {**namespace, **dict.fromkeys(glue)})
    assert not missing, f"the block uses {sorted(missing)} without defining, importing or declaring them as yours"
    namespace.update({name: _GLUE[name](description) for name, description in glue.items()})
    exec(compile(code, "README.md", "exec"), namespace)


def test_the_without_lightning_loop_runs_and_reaches_its_target():
    code = _block_after("## Without Lightning: the core")
    assert "import lightning" not in code and len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # ends with an assert on the reached sparsity
    model = namespace["model"]
    weights = [model[0].weight, model[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.8 * sum(w.numel() for w in weights))


def test_the_one_shot_block_returns_a_result_whose_pruner_keeps_the_zeros(tmp_path, monkeypatch):
    """The prose promised a ``Pruner`` with ``mask_grads()``; ``one_shot_prune`` returns a ``OneShotResult``."""
    monkeypatch.chdir(tmp_path)
    _quiet_trainers(monkeypatch)
    code = _block_after("## From a pretrained model")
    namespace: dict[str, Any] = {name: _GLUE[name](text) for name, text in declared_glue(code).items()}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert type(result).__name__ == "OneShotResult" and result.sparsity == pytest.approx(0.5, abs=0.01)
    result.pruner.mask_grads()  # what the README says keeps the zeros during recovery
    text = README.read_text()
    assert "returns a\n`Pruner`" not in text and "returns an `OneShotResult`" not in text


def _documents_text() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text() for path in DOCUMENTS}


def test_every_tests_path_the_documents_cite_exists():
    """recipes/README.md cited tests/test_train.py after it moved to tests/app/."""
    missing = {
        (where, path)
        for where, text in _documents_text().items()
        for path in re.findall(r"\b(tests/[\w/]+\.py)\b", text)
        if not (ROOT / path).exists()
    }
    assert not missing, missing


def test_the_group_table_lists_every_shipped_option():
    """The README's Hydra group table omitted char_gpt, hf_gpt2 and shakespeare."""
    text = README.read_text()
    conf = ROOT / "pat_callbacks" / "conf"
    for group in ("model", "datamodule", "trainer", "logger", "pruning", "recovery", "hparams_search"):
        row = re.search(rf"^\| `{group}/` \|(.*)$", text, re.M)
        assert row, group
        missing = [p.stem for p in (conf / group).glob("*.yaml") if f"`{p.stem}`" not in row.group(1)]
        assert not missing, f"{group}/: {missing} not in the README's table"


def test_extras_are_installed_from_the_checkout_or_a_wheel_not_from_pypi():
    """`pip install "pat-callbacks[hf]"` fails: the package is not on the package index."""
    help_text = (ROOT / "pat_callbacks" / "conf" / "hydra" / "help" / "pat_callbacks_train.yaml").read_text()
    for where, text in {**_documents_text(), "--help": help_text}.items():
        assert 'pip install "pat-callbacks[' not in text, where


def test_the_readme_gives_the_measured_effect_of_the_recovery_presets_on_a_run_from_scratch():
    """`+recipe=lm_two_four +recovery=[distill,qat_int8]` ended worse than without recovery, with no word about it."""
    section = README.read_text().split("## Recover after pruning")[1].split("\n## ")[0]
    figures = r".*?(\d\.\d{3})" * 3
    said = re.search(r"`python train\.py \+recipe=lm_two_four[^`]*`" + figures, section, re.S)
    assert said, "no measured lm_two_four figures in 'Recover after pruning'"
    without, distill, both = (float(x) for x in said.groups())
    assert distill > without and both > without and "from scratch" in section


def test_the_end_to_end_block_reloads_the_pruned_encoder_with_the_zeros_it_kept(tmp_path, monkeypatch):
    """The block's reloaded model holds exactly the zeros KeepSparsity kept through recovery: 50% of each matrix."""
    monkeypatch.chdir(tmp_path)
    _quiet_trainers(monkeypatch)
    code = _block_after("### End to end: a pretrained Hugging Face model")
    namespace: dict[str, Any] = {name: _GLUE[name](text) for name, text in declared_glue(code).items()}
    exec(compile(code, "README.md", "exec"), namespace)
    masks = namespace["callbacks"][0].store.masks  # KeepSparsity's, named as in the LightningModule (net.)
    reloaded = dict(namespace["reloaded"].named_parameters())
    assert len(masks) == 12 and all(float((~mask).float().mean()) == 0.5 for mask in masks.values())
    for name, mask in masks.items():
        assert torch.equal(reloaded[name.removeprefix("net.")] == 0, ~mask), name
