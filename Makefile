# The two commands of the README quick start: `make demo` and `make test`.
# Both create .venv on first use (torch CPU wheel first: a looser spec pulls GBs of CUDA builds).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slurm test-slow lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlrt demo

# Default tier: unit + distributed (gloo) + e2e on CPU. Slurm, GPU and slow tiers have their own targets.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slurm and not gpu and not slow" --timeout 900

# The Slurm tier also needs the `slurm` extra (nemo-run).
SLURM_STAMP := $(VENV)/.installed-slurm
$(SLURM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $(SLURM_STAMP)

test-slurm: $(SLURM_STAMP)
	$(BIN)/python -m pytest -q -m slurm tests/slurm --timeout 1800

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not slurm and not gpu" --timeout 1800

lint: $(STAMP)
	$(BIN)/ruff check rlrt_megatron recipes tools tests benchmarks slurm
	$(BIN)/ruff format --check rlrt_megatron recipes tools tests benchmarks slurm

clean:
	rm -rf $(VENV) runs artifacts
