# arvision — `make demo` (set-up + the paradigm comparison on Fashion-MNIST, CPU) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# Wheels that match this machine kind (x86_64: on this disk; aarch64: CPU builds). Override TORCH_PKGS to choose.
ifeq ($(ARCH),aarch64)
TORCH_PKGS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
endif
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: help setup data demo test test-slow clean-outputs
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(VENV)/.installed  ## virtual env with torch + arvision[dev,vqp,diffusers,webdataset]

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e '.[dev,vqp,diffusers,webdataset]'
	touch $@

data:  ## Fashion-MNIST from Debian's dataset-fashion-mnist when apt is available
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(dir $(FMNIST))"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "apt-get could not install dataset-fashion-mnist: pass data.root=<dir> or data.download=true"; \
	else echo "no apt: pass data.root=<dir with the Fashion-MNIST *-ubyte.gz files> or data.download=true"; fi

# The paradigm comparison at a CPU budget: 6 generators on their 3 tokenizers, 10k training images, 40% of the
# generators' step budgets (the tokenizers train in full), 500 samples per paradigm against 2,000 test images. Two jobs
# run at once (joblib launcher, one thread each: on 2 cores that beats one 2-thread job at a time). The order balances
# the two workers and starts acdit and mar after flowar has built the vae they share, rar after raster's vq (a file
# lock makes a job wait, not retrain).
# DEMO_DIR collects the six runs; the tables and the per-paradigm sample grids come from there.
DEMO_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_DIR ?= outputs/demo/$(DEMO_STAMP)
PARADIGMS ?= next_scale,flowar,acdit,raster,mar,rar
DEMO_JOBS ?= 2
demo: setup data  ## the paradigm comparison on Fashion-MNIST (CPU, ≈ 17 min with set-up on 2 idle cores): six runs, one table, sample grids
	OMP_NUM_THREADS=1 $(VENV)/bin/arvision-train -m experiment=paradigms paradigm=$(PARADIGMS) budget=0.4 \
	  tokenizer_budget=1.0 data.train_size=10000 metrics.num_samples=500 metrics.num_reference=2000 \
	  hydra/launcher=joblib hydra.launcher.n_jobs=$(DEMO_JOBS) hydra.sweep.dir=$(DEMO_DIR) $(ARGS)
	$(VENV)/bin/arvision-table $(DEMO_DIR) --layout paradigms
	$(VENV)/bin/arvision-table $(DEMO_DIR) --layout stages
	@find $(DEMO_DIR) -name samples.png | sort | sed 's/^/sample grid: /'

test: setup data  ## the test suite (CPU, < 10 min)
	$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

test-slow: setup data  ## the slow tests too
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

clean-outputs:  ## remove runs and cached artifacts
	rm -rf outputs artifacts
