# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The torch pair this project is tested with; elsewhere any torch>=2.1 with its torchvision works.
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

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q tests
