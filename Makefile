# Two commands for a fresh machine (README): `make demo` and `make test`. Both install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This workplace's CPU machines hold a local torch 2.13.0 CPU wheel; elsewhere this pulls the default build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench soak gpu-check gpu-wheels clean

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

test: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check idql_pl tests

bench: install
	$(BIN)/python -m idql_pl.benchmark --json benchmark.json

# On a CUDA machine (torch + Lightning present, maybe no simulators/W&B, no internet): CUDA tests, a 2-minute
# fit, the benchmark at K = 1 and 10 with compile on/off; missing packages come from wheels/ (make gpu-wheels).
gpu-check:
	$(PY) -m idql_pl.gpu_check --out gpu_check --wheels wheels

# On a networked machine: the wheels of everything but torch/lightning, for a GPU machine's Python (GPU_PY).
GPU_PY ?= 3.11
gpu-wheels:
	$(PY) -m pip download -q -d wheels --only-binary=:all: --python-version $(GPU_PY) --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
		gymnasium gymnasium-robotics minari mujoco wandb "jsonargparse[signatures]" h5py matplotlib torchmetrics \
		pytest pytest-timeout PyYAML

soak: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -q -s tests/test_soak.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
