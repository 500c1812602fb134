# longattn developer entry points.
#   make venv    create/refresh $(VENV) (idempotent; a stamp file skips pip when nothing changed)
#   make build   editable install (pip install --no-build-isolation -e .), incremental CMake in build/
#   make test    venv + build + pytest
#   make bench   venv + build + bench/compare.py
#   make cuda-build  compile every CUDA source (no GPU needed): a second venv $(CUDA_VENV) with the
#                CUDA build of torch, a wheel-style install into it, then an import check
#   make cutlass-carry  copy the CUTLASS/CuTe headers the CUDA build reaches into .cutlass/ (ignored),
#                for a GPU machine without nvidia-cutlass or network: bash bench/gpu_check.sh there
#   make clean   remove build outputs (keeps the venv); make distclean also removes the venv
# Overridable: PYTHON, VENV, TORCH (e.g. TORCH=torch==2.14.1), PYTEST_ARGS, BENCH_ARGS,
# MAX_JOBS, V=1 (verbose build), and the LONGATTN_* knobs read by setup.py.

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
DEPS        ?= $(TORCH) pybind11 cmake ninja nvidia-cutlass pytest pytest-benchmark pytest-timeout expecttest numpy tqdm matplotlib transformers
PYTEST_ARGS ?=
BENCH_ARGS  ?=

VPY   := $(VENV)/bin/python
PIP   := $(VPY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.longattn-deps

MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

# CUDA compile check: torch 2.14.1 is the CUDA 13.0 build; one architecture keeps CI short
# (the full default set is LONGATTN_CUDA_ARCHS=80;90).
CUDA_VENV   ?= .venv-cuda
CUDA_TORCH  ?= torch==2.14.1
CUDA_ARCHS  ?= 80
CUDA_DEPS   ?= $(CUDA_TORCH) pybind11 cmake ninja nvidia-cutlass numpy
CUDA_VPY    := $(CUDA_VENV)/bin/python
CUDA_STAMP  := $(CUDA_VENV)/.longattn-deps

.PHONY: venv build check test bench info clean distclean cuda-venv cuda-build cutlass-carry

venv:
	@if [ -x "$(VPY)" ] && [ -f "$(STAMP)" ] && [ "$$(cat $(STAMP))" = "$(DEPS)" ]; then \
	  echo "venv $(VENV): up to date"; \
	else \
	  set -e; \
	  [ -x "$(VPY)" ] || $(PYTHON) -m venv "$(VENV)"; \
	  $(PIP) install -q $(DEPS); \
	  echo "$(DEPS)" > "$(STAMP)"; \
	fi

build: venv
	$(PIP) install --no-build-isolation --no-deps $(if $(filter 1,$(V)),-v,) -e .
	@$(VPY) -c "import torch, longattn._C as C; print('longattn._C:', C.__file__); print('build_info:', C.build_info())"

# pytest only (no venv/build step). Collecting no test (exit 5) is a failure too.
check:
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

test: venv build check

bench: venv build
	$(VPY) bench/compare.py $(BENCH_ARGS)

cuda-venv:
	@if [ -x "$(CUDA_VPY)" ] && [ -f "$(CUDA_STAMP)" ] && [ "$$(cat $(CUDA_STAMP))" = "$(CUDA_DEPS)" ]; then \
	  echo "venv $(CUDA_VENV): up to date"; \
	else \
	  set -e; \
	  [ -x "$(CUDA_VPY)" ] || $(PYTHON) -m venv "$(CUDA_VENV)"; \
	  $(CUDA_VPY) -m pip install -q --disable-pip-version-check $(CUDA_DEPS); \
	  echo "$(CUDA_DEPS)" > "$(CUDA_STAMP)"; \
	fi

# Installs into $(CUDA_VENV)'s site-packages (not in place, so the CPU build's .so stays), then
# imports it from outside the source tree: no GPU is needed to load the module.
cuda-build: cuda-venv
	LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS="$(CUDA_ARCHS)" $(CUDA_VPY) -m pip install -q \
	  --disable-pip-version-check --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(CUDA_VPY)) -c "import torch, longattn; i = longattn.build_info(); \
	  print('cuda build_info:', i); assert i['cuda'], 'built without CUDA'"

# ~13 MiB of headers (the device tool carries 64 MiB in all): carry [".cutlass"] with the source.
cutlass-carry: venv
	$(VPY) bench/cutlass_carry.py

info:
	@$(VPY) -c "import torch, longattn._C as C; print(C.build_info()); print(torch.__config__.parallel_info())"

clean:
	rm -rf build python/longattn/_C*.so python/*.egg-info *.egg-info
	find . \( -path './.venv*' -o -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV)
