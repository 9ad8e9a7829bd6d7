# Every target creates .venv and installs the project on first use, so on a fresh
# machine `make run` and `make test` are the only commands needed.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint types pytest bench clean pg

# The PostgreSQL tests run when TEST_PG_DSN names a server (see .ci/postgres);
# `eval "$$(make -s pg)"` starts a private one and exports it.
export TEST_PG_DSN

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@

run: $(STAMP)
	$(BIN)/xcore serve

test: lint types pytest

lint: $(STAMP)
	$(BIN)/ruff check kernel services replay tests bench plugins
	$(BIN)/ruff format --check kernel services replay tests bench plugins

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# `make bench` runs them all; `make bench ONLY=append` runs the benchmarks whose name
# contains "append" (see bench/README.md).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(if $(ONLY),--only $(ONLY))

pg:
	@.ci/postgres start

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
