# longattn, for contributors (docs/development.md):
#   make venv     the development venv from its pinned lock (requirements/main.txt)
#   make build    editable install (CMake + Ninja, incremental in build/)
#   make test     venv + build + the whole suite (make check: the suite alone)
#   make bench    venv + build + the CPU benchmark comparison (BENCH_ARGS=--quick: a subset)
#   make verify   the verification tooling (tools/verify.sh; STEPS="emu cuda-build ...");
#                 each step is also a target of its own: make cuda-build, make gpu-rehearsal, ...
#   make lock     regenerate requirements/*.txt from requirements/*.in (LOCK_NAMES: some)
#   make clean    build outputs; make distclean also the venvs
# Overridable: PYTHON, VENV, PYTEST_ARGS, BENCH_ARGS, STEPS, MAX_JOBS, V=1 (verbose build), and
# the LONGATTN_* knobs setup.py reads.

PYTHON      ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV        ?= .venv
PYTEST_ARGS ?=
BENCH_ARGS  ?=
STEPS       ?=

VPY := $(VENV)/bin/python

MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS PYTHON VENV PYTEST_ARGS

VERIFY_STEPS := emu emu-asan flash-emu-asan kvpress sdist cuda-build cuda-resources cutlass-carry \
                gpu-rehearsal

.PHONY: venv build check test bench verify lock clean distclean $(VERIFY_STEPS)

venv:
	@bash tools/venv.sh $(VENV) $(PYTHON) requirements/main.txt

build: venv
	$(VPY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps \
	  $(if $(filter 1,$(V)),-v,) -e .
	@$(VPY) -c "import longattn._C as C; print('longattn._C:', C.__file__); print('build_info:', C.build_info())"

# pytest only (no venv/build step). Collecting no test (exit 5) is a failure too.
check:
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

test: venv build check

bench: venv build
	$(VPY) bench/compare.py $(BENCH_ARGS)

verify: build
	bash tools/verify.sh $(STEPS)

$(VERIFY_STEPS): build
	bash tools/verify.sh $@

lock:
	$(PYTHON) tools/lock_requirements.py $(LOCK_NAMES)

clean:
	rm -rf build python/longattn/_C*.so python/longattn/_C*.so.stamp python/*.egg-info *.egg-info
	find . \( -path './.venv*' -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-cuda .venv-gpu-rehearsal .venv-kvpress .kvpress .cutlass
