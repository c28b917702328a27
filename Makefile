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

# Each stage reads the previous stage's folder; ~10 min on 2 CPU cores. Re-running continues unfinished stages.
demo: setup
	$(BIN)/llmpipe tokenizer --config configs/tiny/tokenizer.yaml output_dir=$(RUN)/tokenizer
	$(BIN)/llmpipe pretrain --config configs/tiny/pretrain.yaml tokenizer=$(RUN)/tokenizer output_dir=$(RUN)/pretrain
	$(BIN)/llmpipe eval --config configs/tiny/eval.yaml model=$(RUN)/pretrain output_dir=$(RUN)/eval_pretrain
	$(BIN)/llmpipe sft --config configs/tiny/sft.yaml init_from=$(RUN)/pretrain output_dir=$(RUN)/sft
	$(BIN)/llmpipe reward --config configs/tiny/reward.yaml init_from=$(RUN)/sft output_dir=$(RUN)/reward
	$(BIN)/llmpipe dpo --config configs/tiny/dpo.yaml init_from=$(RUN)/sft output_dir=$(RUN)/dpo
	$(BIN)/llmpipe ppo --config configs/tiny/ppo.yaml init_from=$(RUN)/sft reward_model=$(RUN)/reward output_dir=$(RUN)/ppo
	$(BIN)/llmpipe eval --config configs/tiny/eval.yaml model=$(RUN)/dpo output_dir=$(RUN)/eval_dpo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
