# Set-up is part of the two commands below: each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
# torch is installed first and on its own so that the right build is chosen. Machines without an NVIDIA driver get
# the pinned CPU-sized release (2.13.0 lies on disk on the project's CI machines); machines with one get the latest
# CUDA build. Override with e.g. `make test TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: demo test lint bench notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-runtime
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed-runtime
	HF_HUB_OFFLINE=1 $(BIN)/lycolab demo --out $(DEMO_OUT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check lycolab tests bench scripts

test: $(VENV)/.installed-test lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Adapter speed/memory vs the lycoris-lora package on an SD1.5-size U-Net (CPU: about 15 minutes).
bench: $(VENV)/.installed-test
	$(BIN)/python bench/networks.py --write docs/benchmarks.md

# Rebuild notebooks/*.ipynb from notebooks/src/*.py (the tests fail when they are stale).
notebooks: $(VENV)/.installed-runtime
	$(BIN)/python scripts/build_notebooks.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
