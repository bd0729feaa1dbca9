# Thin aliases. `make run` and `make test` create the environment first if needed.
VENV := .venv
BIN := $(abspath $(VENV))/bin
# The interpreter that installs uv: found before .venv/bin goes first on PATH.
PYTHON := $(shell command -v python3)
UV := $(PYTHON) -m uv
export PATH := $(BIN):$(PATH)

.PHONY: run test lint bench bento serve clean system-deps

# Debian packages the tests use: headless Chromium for the demo page, PostgreSQL for the team
# stack, iproute2 for the network-namespace hosts. Installed only when a command is missing.
DEBIAN_PACKAGES := chromium chromium-driver postgresql iproute2
DEBIAN_COMMANDS := chromium chromedriver /usr/lib/postgresql/15/bin/initdb ip

$(VENV)/.synced: pyproject.toml uv.lock
	$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	touch $@

run: $(VENV)/.synced
	agegender flow run

system-deps:
	@missing=0; for c in $(DEBIAN_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "Installing Debian packages for the tests: $(DEBIAN_PACKAGES)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

test: $(VENV)/.synced system-deps
	pytest

serve: $(VENV)/.synced
	bentoml serve service.service:AgeGender

# A Bento with the champion packed inside: the wheel, the model copied from the registry, the build.
bento: $(VENV)/.synced
	$(UV) build --wheel --out-dir dist
	agegender registry to-bentoml
	bentoml build -f service/bentofile.yaml .

lint: $(VENV)/.synced
	ruff check src tests service benchmarks
	ruff format --check src tests service benchmarks

bench: $(VENV)/.synced
	python benchmarks/data_pipeline.py

clean:
	rm -rf artifacts
