# Set-up is part of the two commands below: each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
# torch is installed first and on its own so that the right build is chosen. Machines without an NVIDIA driver get
# the pinned CPU-sized release (2.13.0 lies on disk on the project's CI machines); machines with one get the latest
# CUDA build. Override with e.g. `make test TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

# test-min: the same tests against every dependency at its pyproject floor, in a venv of its own. torch comes first and
# alone, as above: the floor itself (torch==2.5.1) is a CUDA build of about 3 GB from PyPI on Linux, so by default
# test-min keeps TORCH_SPEC; `make test-min TORCH_MIN_SPEC="torch==2.5.1"` tests the real floor (docs/dependencies.md).
MIN_VENV ?= .venv-min
MIN_BIN := $(MIN_VENV)/bin
TORCH_MIN_SPEC ?= $(TORCH_SPEC)
# A subset that touches every dependency (docs/dependencies.md); the shell expands the glob.
MIN_TESTS ?= tests/test_config.py tests/test_data.py tests/test_data_hygiene.py tests/test_files.py tests/test_models.py \
	tests/test_networks.py tests/test_optimizers.py tests/test_single_file.py tests/test_training.py \
	tests/test_download.py tests/test_annotate.py tests/test_fuzz_*.py

.PHONY: demo test test-min fuzz lint bench notebooks clean

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

# ruff, and requirements-colab.txt is what scripts/min_constraints.py --colab makes of pyproject.toml.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check lycolab tests bench scripts
	$(BIN)/python scripts/min_constraints.py --colab --check requirements-colab.txt

test: $(VENV)/.installed-test lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Every dependency at its floor (scripts/min_constraints.py pins them from pyproject.toml): a floor that is too low
# fails here instead of on a user's machine. A subset of the suite: about a minute on 2 idle cores, after the install.
test-min: $(MIN_VENV)/.installed-min
	$(MIN_BIN)/python -m pip install --quiet "$(TORCH_MIN_SPEC)"  # a no-op unless TORCH_MIN_SPEC changed since
	HF_HUB_OFFLINE=1 $(MIN_BIN)/python -m pytest -q $(MIN_TESTS)

$(MIN_BIN)/python:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/python -m pip install --quiet --upgrade pip "tomli>=2.0; python_version < '3.11'"

$(MIN_VENV)/constraints.txt: pyproject.toml scripts/min_constraints.py | $(MIN_BIN)/python
	$(MIN_BIN)/python scripts/min_constraints.py --exclude torch > $@.tmp
	mv $@.tmp $@

$(MIN_VENV)/.installed-min: $(MIN_VENV)/constraints.txt
	$(MIN_BIN)/python -m pip install --quiet "$(TORCH_MIN_SPEC)"
	$(MIN_BIN)/python -m pip install --quiet -c $< -e . pytest hypothesis pytest-randomly onnx ipywidgets schedulefree
	touch $@

# The property-based tests (hypothesis marks each one) and any test marked `fuzz`, with the long "fuzz" profile of
# tests/conftest.py: not derandomized, so every run looks somewhere new. A failure prints the example and the
# @reproduce_failure blob; the header's --randomly-seed repeats the whole run.
fuzz: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -m "hypothesis or fuzz" tests

# Adapter speed/memory vs the lycoris-lora package on an SD1.5-size U-Net, 3 rounds round-robin (CPU: about 40
# minutes); the DoRA/OFT rows: bench/networks.py --algos diag-oft boft lora-dora loha-dora --max-rss-gib 16.
bench: $(VENV)/.installed-test
	$(BIN)/python bench/networks.py --algos lora locon locon-lycoris loha lokr --max-rss-gib 20 \
		--write docs/benchmarks.md

# Rebuild notebooks/*.ipynb from notebooks/src/*.py (the tests fail when they are stale).
notebooks: $(VENV)/.installed-runtime
	$(BIN)/python scripts/build_notebooks.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
