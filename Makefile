# Two commands on a fresh clone: `make pretrain` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed on its own, first: other packages that need it must not pull a different build.
# On a CPU machine whose default wheel is a CUDA build, set TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
NPROC ?= 4
PYTEST_ARGS ?=

.PHONY: install pretrain data test test-slow chaos gpu-check compile-report reproduce-docs lint format clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt deepspeed
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,mpi,ray,ft]"
	touch $(STAMP)

data/default/manifest.json: | $(STAMP)
	test -f data/corpus/math.jsonl || $(PY) -m data_pipeline corpus data/corpus
	$(PY) -m data_pipeline build configs/data/default.yaml

data: data/default/manifest.json

pretrain: $(STAMP) data/default/manifest.json
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" deepspeed --num_gpus $(NPROC) launch/pretrain.sh --config configs/pretrain/tiny.yaml

test: $(STAMP) lint
	$(PY) -m pytest -m "not slow and not chaos" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Real faults at length: every fault test, plus the longer scenarios (a writer killed mid-save on a
# slow FUSE disk, ...). The EIO and slow disks are FUSE mounts: fuse3 is installed here when missing.
chaos: $(STAMP)
	command -v fusermount3 >/dev/null || { test "$$(id -u)" = 0 && apt-get install -y -q fuse3; } || echo "no fuse3: the FUSE cases will skip"
	$(PY) -m pytest -m "chaos or not slow" tests/test_faults.py tests/test_launch.py tests/test_resume.py tests/test_restarts.py \
		tests/test_stragglers.py tests/test_watchdog.py tests/test_integrity.py tests/test_replicas.py $(PYTEST_ARGS)

# On a CUDA machine: bf16 kernel tests, kernel benchmark, MFU, and the GPU tables of docs/benchmarks.md.
# It runs with a Python whose PyTorch sees the GPU (the project's .venv holds a CPU build):
# GPU_PYTHON=/path/to/python make gpu-check. Its CPU path: `$(PY) benchmarks/gpu_check.py --smoke`.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --docs docs/benchmarks.md $(GPU_CHECK_ARGS)

# Every table and plot of docs/ registered in docs/figures.yaml, made again from its commands and spliced
# into its doc with the commit, manifest hashes and seeds (hours on 2 cores: `--list` gives each one's cost).
# FIGURES="ID ..." remakes some; FIGURES="--all --gpu" includes the GPU ones.
FIGURES ?= --all
reproduce-docs: $(STAMP)
	$(PY) benchmarks/reproduce_docs.py $(FIGURES)

# Every kernel variant compiled for sm_80 and sm_90 on this CPU: registers, spills, shared memory.
compile-report: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m kernels.compile_report

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs data/default
