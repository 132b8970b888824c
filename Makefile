# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The torch pair this project is tested with; elsewhere any torch>=2.6 with its torchvision works (pyproject says why).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/demo.sh

# Two pytest workers, a test file each at a time (module fixtures are built once): many tests wait on
# trainer processes, so two workers use both cores of a small machine (545 s -> 425 s on 2 cores).
# --durations: the slowest tests in every log, to keep the suite within its ~15 minutes.
test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 tests
