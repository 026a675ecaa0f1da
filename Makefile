# sgrun — `make help` lists the targets.
PYTHON ?= python3
PROFILE ?= cpu
E ?=
SEEDS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint bench gpu-check reproduce report clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: ## install sgrun (CPU torch pinned by constraints.txt) with the test tools
	$(PYTHON) -m pip install -e '.[dev]' -c constraints.txt

test: ## run the test suite (CPU, no network)
	$(PYTHON) -m pytest -q -n auto

test-fast: ## the edit-test loop: the suite without the tests marked slow
	$(PYTHON) -m pytest -q -n auto -m "not slow"

gpu-check: ## on a CUDA machine: device tests, demo, benchmarks and one paper cell on the GPU (~10 min)
	PYTHON=$(PYTHON) bash experiments/gpu_check.sh

lint: ## static checks
	$(PYTHON) -m ruff check sgrun tests experiments

bench: ## throughput: Bprop / DNI / cDNI steps/s, PTB chars/s, in-process vs pipeline samples/s
	$(PYTHON) -m sgrun.bench
	$(PYTHON) -m sgrun.bench_rnn
	$(PYTHON) -m sgrun.bench_pipeline

reproduce: ## run every paper preset (PROFILE=paper|cpu|smoke, E=<preset> for one, SEEDS=N, LAUNCHER=local), then the report
	@# the report is written even when a preset failed; the failure is still the exit status
	@status=0; $(PYTHON) experiments/reproduce.py --profile $(PROFILE) --seeds $(SEEDS) $(if $(E),--only $(E)) \
		$(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(RUNS),--runs $(RUNS)) || status=$$?; \
	$(MAKE) --no-print-directory report PROFILE=$(PROFILE) $(if $(RUNS),RUNS=$(RUNS)) && exit $$status

report: ## archive the finished runs of runs/<PROFILE>/ in experiments/evidence/, then write experiments/RESULTS.md and the figures from both
	$(PYTHON) experiments/report.py --profile $(PROFILE) $(if $(RUNS),--runs $(RUNS))

clean: ## remove caches and build files (never runs/ or data/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
