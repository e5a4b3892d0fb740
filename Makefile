# piscale: set-up, demo and tests. Everything installs into .venv at the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?=
comma := ,
PIP_EXTRAS := test$(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(PIP_EXTRAS))

.PHONY: setup demo test test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-gigabyte CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[$(PIP_EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/piscale models pull smollm2-135m-instruct
	$(BIN)/piscale solve "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?" \
		--algorithm pf --budget 4 --seed 0 --option max_tokens=256 --option max_step_tokens=96 --trace demo-trace.json
	$(BIN)/piscale trace demo-trace.json -o demo-trace.html

test: setup
	$(BIN)/python -m pytest -q

# The OpenAI backend against third-party servers (a llama.cpp server on the
# default model). The llama-cpp-python extra compiles llama.cpp on first install.
test-integration:
	$(MAKE) setup EXTRAS=llamacpp-server
	$(BIN)/python -m pytest -q -m integration --run-integration

clean:
	rm -rf $(VENV)
