# Two commands for a newcomer: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: the CPU wheel on dev/CI machines; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,eval,ray]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/peftserve serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Kernel tests run Triton through its CPU interpreter; it must be set before triton is imported.
test: $(STAMP) browser
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# The console's browser tests (tests/console) drive Debian's chromium through Playwright; nothing is skipped
# without it, so install it once (as root) and do nothing when it is there.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium (Debian package) for the console's browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs chromium for tests/console: run 'sudo apt-get install -y chromium' (or run make test as root)" >&2; \
	    exit 1; \
	  fi; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
