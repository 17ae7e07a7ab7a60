# Two commands: `make serve` (set up + run the service with the demo) and `make test`
# (set up + run the whole test suite). Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned explicitly: a bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup serve test test-unit test-integration protos bench-e2e clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# constraints.txt pins every package (scripts/lock-deps.sh writes it), so a fresh install resolves
# exactly the versions CI tested.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH_CPU)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/tastemaker serve $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

test-unit: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/unit $(ARGS)

test-integration: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/integration $(ARGS)

protos: setup
	PYTHON=$(BIN)/python scripts/gen_protos.sh

bench-e2e: setup
	$(BIN)/tastemaker bench e2e --json bench/results/e2e.json

clean:
	rm -rf $(VENV) .pytest_cache
