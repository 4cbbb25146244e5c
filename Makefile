# Set-up and the two README commands. `make demo` and `make test` build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-heavy lint format bench clean

setup: $(STAMP)

# tests/test_serve_browser.py drives Debian's chromium through Playwright (Playwright's own browser
# download is not reachable from CI); installed once, as root, when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "note: chromium is not installed (needs root: apt-get install chromium); the browser test will say so"

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# Test-only references, installed without their dependencies (they would pull torchvision):
	# OpenAI's `clip` package (reference model + tokenizer + vocabulary), open_clip_torch (its vocabulary)
	# and clip_benchmark (its class-name and prompt files).
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt openai-clip==1.0.1 open_clip_torch==3.3.0 clip-benchmark==1.6.2
	touch $(STAMP)

demo: setup
	$(BIN)/clipforge demo

test: setup browser
	$(BIN)/python -m pytest -q -n 2

test-heavy: setup
	$(BIN)/python -m pytest -q -m heavy

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
