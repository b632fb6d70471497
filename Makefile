# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# torch/torchvision are pinned here, not in pyproject: elsewhere users install their own CUDA build.
# Ray is pinned in both (pyproject: 2.60.*): tests/test_internals.py checks the internals gatetune uses.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 'ray[tune,default]==2.60.0'
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install test test-slow demo demo-pareto demo-cifar bench bench-gpu chaos clean
install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Multi-process / multi-node scenarios, S3 storage, the dashboard, 5,000 fuzzed configs, a full disk and
# the digits accuracy targets (CI runs these too).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15

# A real search on the bundled digits data, on a local Ray; a new run folder each time.
demo: $(STAMP)
	$(BIN)/gatetune search search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

# The density/accuracy curve: NSGA-II on (top-1, MACs) with density-stratified ASHA, the front confirmed
# over 3 seeds; writes report.md and pareto.png.
demo-pareto: $(STAMP)
	$(BIN)/gatetune search search_spaces/pareto.yaml --name pareto-$$(date +%Y%m%d-%H%M%S)

# The same on natural images: the bundled CIFAR-10 JPEG subset, resnet20, a dense network trained first and
# the gated fine-tunes from it, the front confirmed over 3 seeds (~18 min on 2 cores).
demo-cifar: $(STAMP)
	$(BIN)/gatetune search search_spaces/cifar10_demo.yaml --name cifar10-demo-$$(date +%Y%m%d-%H%M%S)

# Side-by-side ratios, each ending with `bench NAME: ratio=X goal=Y met=yes|no` (~40 min on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/asha_vs_fifo.py
	$(BIN)/python bench/gate_overhead.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/folder_pipeline.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/vs_optuna.py
	$(BIN)/python bench/ladder.py

# The chaos soak: 100 trials on a loopback Ray cluster (a head, two worker nodes) without faults, with a worker node
# SIGKILLed every 15-30 s, and with the driver SIGKILLed once too (~20 min on 2 cores; `--long`: 1,000 trials, hours).
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

# The same on a CUDA machine (AMP and channels-last where a bench has them), plus resnet20's training
# throughput alone and with four trials sharing one GPU, and the CIFAR-10 recipes (search_spaces/cifar10_*.yaml)
# run short on the bundled subset, with the full recipe's time extrapolated. Each bench stops with one line
# without CUDA.
bench-gpu: $(STAMP)
	$(BIN)/python bench/overhead.py --device cuda
	$(BIN)/python bench/asha_vs_fifo.py --device cuda
	$(BIN)/python bench/gate_overhead.py --device cuda --amp
	$(BIN)/python bench/data_pipeline.py --device cuda
	$(BIN)/python bench/folder_pipeline.py --device cuda
	$(BIN)/python bench/inference.py --device cuda
	$(BIN)/python bench/scale.py --device cuda
	$(BIN)/python bench/vs_optuna.py --device cuda
	$(BIN)/python bench/ladder.py --device cuda
	$(BIN)/python bench/gpu_throughput.py --device cuda --amp
	$(BIN)/python bench/cifar_recipes.py --device cuda

clean:
	rm -rf runs build *.egg-info
