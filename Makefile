# Two commands do everything on a fresh machine (Python >= 3.10):
#   make demo   - set up .venv, then run the tiny preset's stages on the demo data (CPU, minutes)
#   make test   - set up .venv, then run the test suite
# TORCH is the torch requirement installed first; the default is the CPU build this project is tested with.
# On a GPU machine: make demo TORCH=torch (or install your CUDA build into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUN ?= runs/tiny
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/llmpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/llmpipe

demo: setup
	$(BIN)/llmpipe tokenizer --config configs/tiny/tokenizer.yaml output_dir=$(RUN)/tokenizer
	$(BIN)/llmpipe pretrain --config configs/tiny/pretrain.yaml tokenizer=$(RUN)/tokenizer output_dir=$(RUN)/pretrain

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
