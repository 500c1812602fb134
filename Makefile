# longattn developer entry points.
#   make venv    create/refresh $(VENV) (idempotent; a stamp file skips pip when nothing changed)
#   make build   editable install (pip install --no-build-isolation -e .), incremental CMake in build/
#   make test    venv + build + pytest
#   make bench   venv + build + bench/compare.py
#   make clean   remove build outputs (keeps the venv); make distclean also removes the venv
# Overridable: PYTHON, VENV, TORCH (e.g. TORCH=torch==2.14.1), PYTEST_ARGS, BENCH_ARGS,
# MAX_JOBS, V=1 (verbose build), and the LONGATTN_* knobs read by setup.py.

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
DEPS        ?= $(TORCH) pybind11 cmake ninja nvidia-cutlass pytest pytest-benchmark pytest-timeout expecttest numpy tqdm matplotlib
PYTEST_ARGS ?=
BENCH_ARGS  ?=

VPY   := $(VENV)/bin/python
PIP   := $(VPY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.longattn-deps

MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

.PHONY: venv build check test bench info clean distclean

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

info:
	@$(VPY) -c "import torch, longattn._C as C; print(C.build_info()); print(torch.__config__.parallel_info())"

clean:
	rm -rf build python/longattn/_C*.so python/*.egg-info *.egg-info
	find . \( -path './.venv*' -o -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
