# The two commands of the README quick start: `make demo` and `make test`.
# Both create .venv on first use (torch CPU wheel first: a looser spec pulls GBs of CUDA builds).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slurm test-faults test-slow test-mcore019 test-all test-sglang lint venv \
	venv-mcore019 sglang-env clean

# megatron-core 0.19 needs Python >= 3.12: a second venv outside the checkout (torch==2.13.0 on
# 3.12 is PyPI's CUDA build, ~3 GB downloaded once), reused by every checkout and CI run.
PY312 ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do \
	"$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
VENV019 ?= /opt/venv-mcore019
BIN019 := $(VENV019)/bin
STAMP019 := $(VENV019)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
# The cross-version checkpoint test (tests/unit/test_mcore_versions.py) runs one interpreter
# per version; each tier tells it where the other one is.
VERSION_ENV := RLRT_MCORE016_PYTHON=$(CURDIR)/$(BIN)/python RLRT_MCORE019_PYTHON=$(BIN019)/python
TIER := -m "not slurm and not gpu and not slow and not faults and not sglang" --timeout 900
# The 0.19 tier: every non-e2e test (unit, distributed: the megatron-core API surface) and the
# e2e tests marked mcore019 (TP, checkpoint save/load/reshard); the other e2e runs repeat the loop.
TIER019 := -m "not slurm and not gpu and not slow and not faults and not sglang and \
	(not e2e or mcore019)" --timeout 900

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
# `make test`: the local interpreter's combination (Python 3.11 -> megatron-core 0.16,
# Python 3.12 -> 0.19); `make test-all`: 0.16 then 0.19.
test: $(STAMP)
	$(VERSION_ENV) $(BIN)/python -m pytest -q $(TIER)

$(STAMP019): pyproject.toml
	@test -n "$(PY312)" || { echo "megatron-core 0.19 needs python3.12 (pyenv install 3.12, or \
	make PY312=/path/to/python3.12 ...)"; exit 1; }
	test -x $(BIN019)/python || $(PY312) -m venv $(VENV019)
	$(BIN019)/python -m pip install -q --upgrade pip
	$(BIN019)/python -c "import torch" 2>/dev/null || $(BIN019)/python -m pip install -q torch==2.13.0
	$(BIN019)/python -m pip install -q -e ".[dev]" "megatron-core>=0.19,<0.20"
	rm -f $(VENV019)/.installed-*
	touch $@

venv-mcore019: $(STAMP019)

# TIER019 (above) on Python 3.12 + megatron-core 0.19, with this checkout's code (PYTHONPATH:
# the venv's editable install may point at another checkout).
test-mcore019: $(STAMP019)
	$(VERSION_ENV) PYTHONPATH=$(CURDIR) $(BIN019)/python -m pytest -q $(TIER019)

test-all: test test-mcore019

# The Slurm tier also needs the `slurm` extra (nemo-run).
SLURM_STAMP := $(VENV)/.installed-slurm
$(SLURM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $(SLURM_STAMP)

# A venv with nothing but torch and `.[slurm]` (tests/slurm/test_extra.py: the extra alone runs
# `rlrt slurm submit`), outside the checkout, rebuilt only when the base dependencies or the
# slurm extra change (~20 min the first time on 2 busy cores, then reused).
SLURM_EXTRA_VENV ?= /opt/venv-rlrt-slurm
SLURM_EXTRA_KEY := $(shell sed -n '/^dependencies = \[/,/^\]/p;/^slurm = /p' pyproject.toml \
	| cksum | cut -d' ' -f1)
SLURM_EXTRA_STAMP := $(SLURM_EXTRA_VENV)/.installed-$(SLURM_EXTRA_KEY)
$(SLURM_EXTRA_STAMP):
	rm -rf $(SLURM_EXTRA_VENV)
	$(PY) -m venv $(SLURM_EXTRA_VENV)
	$(SLURM_EXTRA_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SLURM_EXTRA_VENV)/bin/python -m pip install -q ".[slurm]"
	touch $@

.PHONY: venv-slurm-extra
venv-slurm-extra: $(SLURM_EXTRA_STAMP)

test-slurm: $(SLURM_STAMP) $(SLURM_EXTRA_STAMP)
	RLRT_SLURM_EXTRA_VENV=$(SLURM_EXTRA_VENV) $(BIN)/python -m pytest -q -m slurm tests/slurm \
		--timeout 1800

# Fault injection (tests/faults): damaged checkpoints, full disks, NaNs, dead ranks, bad data.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m "faults and not slurm and not gpu" tests/faults --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not slurm and not gpu" --timeout 1800

# The real SGLang server on CPU (tests/real_sglang): its own venv outside the checkout (Python 3.11,
# sglang pinned with the torch it pins, no CUDA-only packages; ~8 minutes and ~7 GB the first
# time), reused by every checkout and CI run. Move it with `make SGLANG_VENV=/path ...`.
PY311 ?= python3.11
SGLANG_VENV ?= /opt/venv-sglang
SGLANG_VERSION := 0.5.23
SGLANG_REQ := tests/sglang_cpu/requirements.txt
SGLANG_STAMP := $(SGLANG_VENV)/.installed-$(SGLANG_VERSION)-$(shell cksum < $(SGLANG_REQ) | cut -d' ' -f1)

$(SGLANG_STAMP): $(SGLANG_REQ)
	test -x $(SGLANG_VENV)/bin/python || $(PY311) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q -r $(SGLANG_REQ)
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==$(SGLANG_VERSION)
	$(SGLANG_VENV)/bin/python -c "import sglang, sglang.launch_server; print('sglang', sglang.__version__)"
	rm -f $(SGLANG_VENV)/.installed-*
	touch $@

sglang-env: $(SGLANG_STAMP)

# The tier talks to real `sglang.launch_server` processes (tests/real_sglang/conftest.py starts them
# with the CPU flags and tests/sglang_cpu on their PYTHONPATH).
# pytest's exit 5 (nothing collected) is turned into a named failure: never a silent pass.
test-sglang: $(STAMP) $(SGLANG_STAMP)
	RLRT_SGLANG_PYTHON=$(SGLANG_VENV)/bin/python PYTHONPATH=$(CURDIR) \
	  $(BIN)/python -m pytest -q -m sglang tests/real_sglang --timeout 1800; rc=$$?; \
	  if [ $$rc = 5 ]; then echo "test-sglang: pytest collected no tests (exit 5): the tier's \
	  tests in tests/real_sglang are missing or lost their 'sglang' marker" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check rlrt_megatron recipes tools tests benchmarks slurm
	$(BIN)/ruff format --check rlrt_megatron recipes tools tests benchmarks slurm

clean:
	rm -rf $(VENV) runs artifacts
