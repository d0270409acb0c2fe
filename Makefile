# Quick start: `make demo` then `make test`. Everything runs in .venv (created on first use).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast faults cluster lint fmt clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision must match exactly (torch-fidelity imports torchvision)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orchestrator demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not server"

faults: $(STAMP)
	$(PY) -m tests.faults.summary

# network-namespace cluster (root): partitions, node loss, latency, multi-node DDP (docs/cluster.md)
cluster: $(STAMP)
	$(PY) -m tests.cluster

lint: $(STAMP)
	$(VENV)/bin/ruff check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .

clean:
	rm -rf .orchestrator .pytest_cache
