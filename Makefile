# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned, so the project's range (torch>=2.7) keeps it and never
# pulls a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench gpu-check gpu-wheels floors clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-test,chat
	$(VENV)/bin/hetlm demo

test: $(VENV)/.installed-test,chat
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test,chat
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed-test,chat,bench
	$(PY) benchmarks/bench_vs_hf_trainer.py

# The GPU check (docs/GPU_CHECK.md) uses the Python already on the GPU machine: no venv, no
# download (PYTHON=/path/to/python make gpu-check). Writes benchmarks/results/gpu.{md,json}.
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# What the GPU check's machine lacks (docs/GPU_CHECK.md), as wheels for its Python (3.12 and
# CUDA 13.0 on the lent H200), into .whl/ (git-ignored) to carry there: 7 MiB with bitsandbytes
# trimmed to that CUDA's library. Needs pip to reach an index, not a GPU.
GPU_WHEELS_ARGS ?=
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py $(GPU_WHEELS_ARGS)

# The lowest dependency versions pyproject.toml allows, in a throwaway venv (not part of `make
# test`: it installs other versions). FLOOR_TORCH=torch==2.7.0 checks torch's floor too (a
# CUDA wheel of several GB); the default keeps the pinned CPU build.
FLOOR_VENV ?= /tmp/hetlm-floors
FLOOR_TORCH ?= $(TORCH_SPEC)
floors:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q "$(FLOOR_TORCH)"
	$(FLOOR_VENV)/bin/python -m pip install -q $$($(PYTHON) benchmarks/check_dependency_floors.py pins)
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps -e .
	$(FLOOR_VENV)/bin/python benchmarks/check_dependency_floors.py smoke --require-floors \
		--workdir $(FLOOR_VENV)/work

clean:
	rm -rf $(VENV) runs .pytest_cache
