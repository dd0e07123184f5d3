# Two commands on a fresh machine: `make quickstart` then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STREAMING := mosaicml-streaming==0.13.0
# DeepSpeed/torch JIT builds land in the project, not $HOME, so CI and reruns reuse them
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: env quickstart test test-slow lint bench gpu-check gpu-check-dry clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first and pinned: nothing later may pull a different (CUDA) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# without its declared dependencies: see pyproject.toml for why and for the ones it really uses
	$(BIN)/pip install -q --no-deps $(STREAMING)
	touch $@

env: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tplus train configs/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not extended"

# The second set: slow proofs (layouts x recompute x sequence parallelism...) beyond the main set's 30 minutes.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m extended

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/shellcheck slurm/*.sh slurm/*.sbatch launch/*.sh docker/*.sh tests/gpu/run.sh
	$(BIN)/hadolint docker/Dockerfile

bench: $(STAMP)
	$(BIN)/tplus bench --model gpt2-124m

# On a GPU host after `source .gpu/setup.sh` (../shared/gpu/README.md): pytest -m gpu, the FP8 loss comparison and
# the 1.1B benchmark in at most eight minutes, one table (also JSON and markdown under $$TPLUS_GPU_ARTIFACTS).
# Not through the venv: the kit's python, torch and Transformer Engine are the ones to test.
gpu-check:
	bash tests/gpu/run.sh $(GPU_CHECK_ARGS)

# The same script on CPU: every command built and every config validated, no CUDA needed (CI runs it too).
gpu-check-dry: $(STAMP)
	PY=$(BIN)/python bash tests/gpu/run.sh --dry-run --out $(CURDIR)/runs/gpu-check-dry $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
