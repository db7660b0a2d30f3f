# Two commands for a fresh machine (README): `make demo` and `make test`. Both install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This workplace's CPU machines hold a local torch 2.13.0 CPU wheel; elsewhere this pulls the default build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# test processes (pytest-xdist; a test file stays in one process, so its module fixtures are built once)
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-tooling test-all lint bench soak gpu-check gpu-check-plan gpu-wheels clean

install: $(VENV)/.installed

# An existing torch (e.g. a CUDA build on a GPU machine) is kept: the venv then sees the system site-packages.
$(VENV)/.installed: pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "[install] keeping the torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/python -m idql_pl fit --config configs/quickstart.yaml

# unit and integration tests, without the slow ones: what CI runs, in under 10 minutes on 2 cores
test: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q -n $(PYTEST_WORKERS) \
		--dist loadfile tests/unit tests/integration $(PYTEST_ARGS)

# the tools' own tests (benchmarks, GPU check); CI runs them after `make test`
test-tooling: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q tests/tooling $(PYTEST_ARGS)

test-all: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m idql_pl.benchmark --json benchmark.json

# On a CUDA machine (torch, Lightning and the scientific stack present, no internet): ONE command, at most
# 8 minutes (`make gpu-check-plan`: each step's limit); missing packages come from wheels/ (make gpu-wheels).
# The one JSON goes to $(OUT)/gpu_check.json. See docs/gpu.md.
OUT ?= gpu_check
gpu-check:
	$(PY) -m idql_pl.gpu_check --out $(OUT) --wheels wheels

gpu-check-plan:
	@$(PY) -m idql_pl.gpu_check --plan

# On a networked machine: the wheels the GPU check installs (CPython 3.12, manylinux x86_64), each runtime
# dependency named and pinned (--no-deps; idql_pl/experiments/gpu_check.py's WHEELS, which tests/tooling/test_gpu_check.py
# compares with this list). No torch, Lightning, W&B, rliable or submitit: the check does not need them.
GPU_PY ?= 3.12
GPU_WHEELS := gymnasium==1.4.0 gymnasium-robotics==1.4.2 mujoco==4.0.1 mujoco-core==4.0.1 minari==0.5.4 \
	pettingzoo==1.27.0 imageio==2.38.2 glfw==2.11.0 cloudpickle==3.1.3 farama-notifications==0.0.6 \
	jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 typing-extensions==4.16.0
gpu-wheels:
	rm -rf wheels
	$(PY) -m pip download -q -d wheels --only-binary=:all: --no-deps --python-version $(GPU_PY) \
		--implementation cp --abi cp$(subst .,,$(GPU_PY)) --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
		--platform any $(GPU_WHEELS)
	du -sh wheels

soak: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -q -s tests/integration/test_soak.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
