# Two commands set everything up on a fresh machine:
#   make bench   the main job: correctness + timing table of every op on the device at hand (CPU: quick sweep)
#   make test    lint, then the test suite (Triton kernels run under the interpreter when there is no GPU, then
#                are compiled for sm_90 to catch what the interpreter lets through)
# Both create .venv (seeing system packages, so a preinstalled GPU torch is used as is) and install what is missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that the project's CI machines carry; a GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0
# The Triton that tests/tools/kernel_resources.json was proved with: another version recompiles every kernel
# variant in `make test` (bump it together with `make kernel-baseline`).
TRITON_SPEC ?= triton==3.9.0
PYTEST_ARGS ?= -n 2
RUFF_SPEC ?= ruff==0.17.6

.PHONY: setup lint test kernel-baseline bench info clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel numpy scipy einops pytest pytest-xdist matplotlib transformers ninja \
		"$(RUFF_SPEC)"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

lint: setup
	$(BIN)/ruff check .

# Without a GPU, Triton runs under its interpreter, which accepts code the compiler rejects: the tests record
# every kernel launch and the same kernels are then compiled for sm_90 (no GPU needed), except the variants whose
# source the reviewed baseline tests/tools/kernel_resources.json already proved; registers, spills and shared
# memory are reported per kernel, and a new spill in a hot kernel fails.
test: lint
	rm -rf .launches
	FLASHOPS_RECORD_LAUNCHES=.launches $(BIN)/python -m pytest $(PYTEST_ARGS)
	if [ -d .launches ]; then $(BIN)/python -m tests.tools.compile_for_gpu .launches --arch 90; fi

# After changing a kernel: record the variants `make test` compiled in the baseline, and commit the diff with it.
kernel-baseline: test
	$(BIN)/python -m tests.tools.compile_for_gpu .launches --arch 90 --update-baseline

bench: setup
	$(BIN)/python -m bench

info: setup
	$(BIN)/python -m flashops.info

clean:
	rm -rf $(VENV) build *.egg-info
