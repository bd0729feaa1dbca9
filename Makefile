# Thin aliases. `make run` and `make test` create the environment first if needed.
VENV := .venv
BIN := $(abspath $(VENV))/bin
UV := python3 -m uv
export PATH := $(BIN):$(PATH)

.PHONY: run test lint bench clean

$(VENV)/.synced: pyproject.toml uv.lock
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	touch $@

run: $(VENV)/.synced
	python -m flows.training

test: $(VENV)/.synced
	pytest

lint: $(VENV)/.synced
	ruff check src tests flows service benchmarks

bench: $(VENV)/.synced
	python benchmarks/data_pipeline.py

clean:
	rm -rf artifacts
