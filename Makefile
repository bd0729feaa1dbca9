# Thin aliases. `make run` and `make test` create the environment first if needed.
VENV := .venv
BIN := $(abspath $(VENV))/bin
# The interpreter that installs uv: found before .venv/bin goes first on PATH.
PYTHON := $(shell command -v python3)
UV := $(PYTHON) -m uv
export PATH := $(BIN):$(PATH)

.PHONY: run test lint bench bento serve clean

$(VENV)/.synced: pyproject.toml uv.lock
	$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	touch $@

run: $(VENV)/.synced
	python -m flows.training

test: $(VENV)/.synced
	pytest

serve: $(VENV)/.synced
	bentoml serve service.service:AgeGender

# A Bento with the champion packed inside: the wheel, the model copied from the registry, the build.
bento: $(VENV)/.synced
	$(UV) build --wheel --out-dir dist
	agegender registry to-bentoml
	bentoml build -f service/bentofile.yaml .

lint: $(VENV)/.synced
	ruff check src tests flows service benchmarks

bench: $(VENV)/.synced
	python benchmarks/data_pipeline.py

clean:
	rm -rf artifacts
