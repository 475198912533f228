# The README's two commands. Both create/update .venv first, so a fresh machine needs only
# python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
PIP    := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off

.PHONY: run test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when the dependency list changes. `make run` needs only the `train`
# extra (the benchmark: tiny model, BM25, both envs on the synthetic world); `make test` installs
# every extra, since the tests cover them all.
$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(PIP) "$(TORCH)" -e ".[train]"
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py | $(BIN)/python
	$(PIP) "$(TORCH)" -e ".[test]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/treegym bench --quick

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
