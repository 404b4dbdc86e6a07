# Two commands set everything up on a fresh machine:
#   make demo   venv + install + build the demo store (offline default model) + serve the explorer
#   make test   venv + install + Chromium (for the browser tests) + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 5006

.PHONY: install demo demo-build test test-fast lint typecheck bench chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[build,s3,export,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium drives the browser tests (playwright cannot download browsers offline).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

demo: $(STAMP)
	$(BIN)/hoverlay demo --store demo-store --images demo-images --port $(PORT)

demo-build: $(STAMP)
	$(BIN)/hoverlay demo --store demo-store --images demo-images --no-serve

# Two worker processes (most tests wait on browsers, servers and subprocesses), then, alone, the
# tests that measure time or load.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m serial

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ui"

lint: $(STAMP)
	$(BIN)/ruff check hoverlay stores pipeline explorer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf demo-store demo-images .pytest_cache
