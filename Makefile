# qoq: QoQ W4A8KV4 quantization toolchain.
#   make quantize   quantize the embedded default model (SmolLM2-135M-Instruct)
#   make test       run the CPU test suite
#   make gpu-test   run the GPU tests (needs CUDA + the [gpu] extra)

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.qoq-installed

# Local calibration / evaluation data next to the repo (our machines); harmless elsewhere.
ifneq ($(wildcard ../shared/data),)
export QOQ_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: venv quantize test gpu-test clean-venv

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

test: venv
	$(VENV)/bin/python -m pytest

gpu-test: venv
	$(VENV)/bin/python -m pytest -m gpu

clean-venv:
	rm -rf $(VENV)
