# Quick start: `make demo` then `make test`. Everything runs in .venv (created on first use).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# TORCH=cpu: CPU-only wheels of torch and torchvision (no CUDA libraries: about 3 GB less), from TORCH_CPU_INDEX.
# The default takes torch from the configured index (CUDA wheels on PyPI for Linux).
TORCH  ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# EXTRAS: worker = torch and the ML stack, dev = tests and linters (includes worker); none for a control-plane host.
EXTRAS ?= worker,dev

.PHONY: venv demo test test-fast faults cluster cluster-test lint fmt clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(TORCH),cpu)
	# one resolve for both, within the pyproject's bounds: torchvision pins the exact torch it was built for
	$(PY) -m pip install -q --index-url $(TORCH_CPU_INDEX) 'torch>=2.4,<2.15' 'torchvision>=0.19,<0.30'
endif
	# torch and torchvision must match exactly (torch-fidelity imports torchvision)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
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

cluster-test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/cluster

lint: $(STAMP)
	$(VENV)/bin/ruff check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .

clean:
	rm -rf .orchestrator .pytest_cache
