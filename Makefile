# ferry: `make demo` and `make test` are all a fresh Debian 12 machine needs.
# Every target is idempotent: it installs or builds only what is missing or stale.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# pip's output goes to a log that is shown only when it fails, so a good run stays quiet.
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP_HOST := $(VENV)/.host-packages
STAMP_VENV := $(VENV)/.installed
NATIVE_SOURCES := $(wildcard ext/*.pyx ext/*.pxd ext/*.h) setup.py
STAMP_BUILD := agent/_native/.built

.PHONY: setup build demo lint test bench clean

setup: $(STAMP_BUILD)

$(STAMP_HOST): scripts/install-host-packages.sh
	@./scripts/install-host-packages.sh
	@mkdir -p $(VENV) && touch $@

$(STAMP_VENV): $(STAMP_HOST) pyproject.toml
	@[ -x $(PY) ] || { echo "ferry setup: creating virtualenv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "ferry setup: installing Python dependencies into $(VENV)"
	@$(PIP) --upgrade pip setuptools wheel "Cython>=3.0" >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(PIP) --no-build-isolation -e '.[test,plots]' >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@touch $@

$(STAMP_BUILD): $(STAMP_VENV) $(NATIVE_SOURCES)
	@echo "ferry setup: building native extensions"
	@$(PY) setup.py -q build_ext --inplace >$(VENV)/build.log 2>&1 || { cat $(VENV)/build.log; exit 1; }
	@touch $@

build: $(STAMP_BUILD)

demo: setup
	@$(PY) -m agent.demo

# ruff (settings in pyproject.toml) over the code and tests; mypy over the package and bench.
lint: setup
	@$(PY) -m ruff check --quiet agent bench tests
	@$(PY) -m mypy --no-error-summary agent bench

test: lint
	@$(PY) -m pytest $(PYTEST_ARGS)

# Every benchmark runs even if one misses its target; the exit status says if any did.
BENCHES := codec channel "migrate --quick" disk import "linux --quick"
bench: setup
	@status=0; for b in $(BENCHES); do echo "== bench $$b"; $(PY) -m bench $$b || status=1; done; exit $$status

clean:
	rm -rf build agent/_native/*.so agent/_native/*.c ext/*.c ext/*.html $(STAMP_BUILD)
