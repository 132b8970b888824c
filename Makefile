# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The torch pair this project is tested with; elsewhere any torch>=2.6 with its torchvision works (pyproject says why).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST = HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[test,lint]'
	touch $@

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/demo.sh

# Two pytest workers, a test file each at a time (module fixtures are built once): many tests wait on
# trainer processes, so two workers use both cores of a small machine (545 s -> 425 s on 2 cores).
# --durations: the slowest tests in every log, to keep the suite within its ~15 minutes.
test: install
	$(PYTEST) -q -n 2 --dist loadfile --durations=15 tests

# The edit loop: in-process unit tests only (tests/unit mirrors acc_clip/), under 4 minutes on 2 cores.
test-fast: install
	$(PYTEST) -q -n 2 --dist loadfile --durations=10 tests/unit

# Lint and format (ruff), types (mypy), and the layering contracts (import-linter, pyproject.toml).
lint: install
	$(VENV)/bin/ruff check acc_clip tests benchmarks tools
	$(VENV)/bin/ruff format --check acc_clip tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
