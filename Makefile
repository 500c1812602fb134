# longattn developer entry points.
#   make venv    create/refresh $(VENV) from requirements/main.txt (idempotent: a stamp of the lock
#                file skips pip when nothing changed; a changed lock recreates the venv)
#   make lock    regenerate the pinned requirements/*.txt from requirements/*.in (then commit them)
#   make build   editable install (pip install --no-build-isolation -e .), incremental CMake in build/
#   make test    venv + build + pytest
#   make bench   venv + build + bench/compare.py
#   make cuda-build  compile every CUDA source (no GPU needed): a second venv $(CUDA_VENV) with the
#                CUDA build of torch, a wheel-style install into it, then an import check
#   make cuda-resources  registers / stack frame / smem per kernel of that build, and the spill
#                loads/stores inside the main loop of the kernels that spill (cuobjdump)
#   make gpu-rehearsal  the GPU machine's build and CPU tests without its GPU: a venv like its
#                image (Python 3.12, torch 2.11.0+cu130, no nvidia-cutlass), bench/gpu_check.sh
#                --dry-run building for sm_90, then the suite against that module; see below
#   make cutlass-carry  copy the CUTLASS/CuTe headers the CUDA build reaches into .cutlass/ (ignored),
#                for a GPU machine without nvidia-cutlass or network: bash bench/gpu_check.sh there
#   make kvpress-test  tests/test_kvcache_kvpress.py against NVIDIA kvpress: with the venv's
#                transformers, and in its own pinned venv $(KVPRESS_VENV); see below
#   make emu-test  the CUDA kernels on the CPU (tools/simt_emu) under a subset of the suite; needs
#                the built extension (make build), like `check`; see below
#   make clean   remove build outputs (keeps the venv); make distclean also removes the venv
# Overridable: PYTHON, VENV, LOCK, LOCK_NAMES (make lock NAMES), PYTEST_ARGS, BENCH_ARGS,
# MAX_JOBS, V=1 (verbose build), and the LONGATTN_* knobs read by setup.py.

# Every venv installs a committed, fully pinned set (requirements/NAME.txt, made from NAME.in by
# `make lock`) with --no-deps, so a clean machine installs what CI installed when it was locked.
PYTHON      ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV        ?= .venv
LOCK        ?= requirements/main.txt
PYTEST_ARGS ?=
BENCH_ARGS  ?=

VPY   := $(VENV)/bin/python
PIP   := $(VPY) -m pip --disable-pip-version-check

MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

# CUDA compile check: torch 2.14.1 is the CUDA 13.0 build; one architecture keeps CI short
# (the full default set is LONGATTN_CUDA_ARCHS=80;90).
CUDA_VENV   ?= .venv-cuda
CUDA_LOCK   ?= requirements/cuda.txt
CUDA_ARCHS  ?= 80
CUDA_VPY    := $(CUDA_VENV)/bin/python

# GPU rehearsal: the lent GPU machine runs its own image's Python 3.12 and torch 2.11.0+cu130
# (../.library/device/KINDS.md) and gives a session 15 minutes, so its build must not be the first
# one against that torch or for sm_90. Python 3.12 where one runs (pyenv's too), else $(PYTHON).
GPU_VENV  ?= .venv-gpu-rehearsal
GPU_LOCK  ?= requirements/gpu-rehearsal.txt
# Recursive (?=): the interpreters are probed only when the rehearsal's venv is made, not on
# every make call.
GPU_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
                $(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null)) $(PYTHON))
GPU_VPY   := $(GPU_VENV)/bin/python

# kvpress comparison, run twice:
#   lite   kvpress alone (--no-deps, a side directory on PYTHONPATH) with the development venv's
#          transformers: the test's harness calls the presses' compress from its own hook
#          (kvpress's hook reads kwargs newer transformers renamed);
#   pinned its own venv $(KVPRESS_VENV) from requirements/kvpress.txt (kvpress with the
#          transformers it supports and everything that imports), the module built in python/
#          on PYTHONPATH: kvpress's own hooks run, and nothing in $(VENV) can reach it.
KVPRESS_DIR    ?= .kvpress
KVPRESS_VENV   ?= .venv-kvpress
KVPRESS_LOCK   ?= requirements/kvpress.txt
KVPRESS         = $(shell grep -i '^kvpress==' $(KVPRESS_LOCK))
KVPRESS_TEST   := -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) \
                  tests/test_kvcache_kvpress.py

# $(call venv_install,DIR,PYTHON,LOCKFILE): make venv DIR with PYTHON holding exactly the pins of
# LOCKFILE (--no-deps: nothing outside it), unless its stamp (a copy of the lock) says so already.
# A changed lock recreates the venv, so no package of an older lock stays behind.
define venv_install
	@if [ -x "$(1)/bin/python" ] && cmp -s "$(3)" "$(1)/.longattn-lock"; then \
	  echo "venv $(1): up to date with $(3)"; \
	else \
	  set -e; rm -rf "$(1)"; $(2) -m venv "$(1)"; \
	  $(1)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r "$(3)"; \
	  cp "$(3)" "$(1)/.longattn-lock"; \
	fi
endef

# emu-test: the SIMT attention, rope, merge and KV-cache CUDA kernels, with their launchers and
# CUDA registrations, run on the CPU under tools/simt_emu (pytest -p pytest_simt_emu). The rope,
# merge and KV-cache suites run whole; of test_attention / test_backward (about 11 minutes under
# the emulator on two cores, 8 of them the fp64 gradchecks) EMU_K leaves out the gradchecks,
# the long sequences, the GQA and cross-length sweeps and the fp16/fp64 option sweeps (fp16 and
# fp64 still run through test_grads and the head-dim, varlen, masked-row tests), and the fuzz's
# long cases (hd 256 at L 700 takes minutes emulated; its 60 short random cases run). About 3 minutes
# on two cores with the emulator's first build (kept in EMU_BUILD); EMU_K= runs everything.
EMU_BUILD ?= build/simt_emu
EMU_TESTS ?= tests/test_attention.py tests/test_backward.py tests/test_rope.py \
             tests/test_rope_frequencies.py tests/test_rope_grad.py tests/test_merge.py \
             tests/test_kvcache.py \
             tests/test_kvcache_policies.py tests/test_fuzz.py tests/test_nonfinite.py \
             tools/simt_emu/test_emu_cuda_paths.py
EMU_K     ?= not test_gradcheck_attention and not test_lengths and not test_gqa and \
             not test_options_cross_lengths and not (test_options and (fp16 or fp64)) and \
             not test_random_long_case

.PHONY: venv lock build check test bench info clean distclean cuda-venv cuda-build cuda-resources cutlass-carry \
        gpu-rehearsal-venv gpu-rehearsal \
        kvpress-test emu-test emu-asan flash-emu-asan

venv:
	$(call venv_install,$(VENV),$(PYTHON),$(LOCK))

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
	$(call venv_install,$(CUDA_VENV),$(PYTHON),$(CUDA_LOCK))

# Installs into $(CUDA_VENV)'s site-packages (not in place, so the CPU build's .so stays), then
# imports it from outside the source tree: no GPU is needed to load the module.
cuda-build: cuda-venv
	LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS="$(CUDA_ARCHS)" $(CUDA_VPY) -m pip install -q \
	  --disable-pip-version-check --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(CUDA_VPY)) -c "import torch, longattn; i = longattn.build_info(); \
	  print('cuda build_info:', i); assert i['cuda'], 'built without CUDA'"

# Registers / stack frame / static smem of every kernel in the module cuda-build installed
# (cuobjdump, no GPU needed). A report, not a gate: spills are weighed against measured speed.
RESOURCES_ARGS ?= --loops
cuda-resources:
	cd /tmp && $(abspath $(CUDA_VPY)) $(abspath tools/cuda_resources.py) $(RESOURCES_ARGS)

# ~13 MiB of headers (the device tool carries 64 MiB in all): carry [".cutlass"] with the source.
cutlass-carry: venv
	$(VPY) bench/cutlass_carry.py

gpu-rehearsal-venv:
	$(call venv_install,$(GPU_VENV),$(GPU_PYTHON),$(GPU_LOCK))

# The GPU run's own steps (build for sm_90 in place with the carried headers, the CUDA tests
# collected, the smoke benchmark), then every test against the module it built: an API the older
# torch lacks, or an sm_90-only build break, shows here rather than in the GPU session.
gpu-rehearsal: gpu-rehearsal-venv cutlass-carry
	LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS=90 GPU_CHECK_BUDGET_S=1800 PYTHON=$(abspath $(GPU_VPY)) \
	  OUT=$(abspath build/gpu-rehearsal-out) \
	  bash bench/gpu_check.sh --dry-run
	PYTHONPATH=$(abspath python) $(GPU_VPY) -m pytest -q -p no:cacheprovider -n $(MAX_JOBS) $(PYTEST_ARGS) tests

emu-test:
	@mkdir -p $(EMU_BUILD)
	SIMT_EMU_BUILD=$(abspath $(EMU_BUILD)) PYTHONPATH=$(abspath python):$(abspath tools/simt_emu) \
	  $(VPY) -m pytest -q -p no:cacheprovider -p pytest_simt_emu $(if $(EMU_K),-k "$(EMU_K)",) \
	  $(PYTEST_ARGS) $(EMU_TESTS)

# emu-asan: emu-test with the emulation built under AddressSanitizer (SIMT_EMU_ASAN=1, its own
# build in EMU_ASAN_BUILD), so a kernel's out-of-bounds read or write of a tensor, of dynamic
# shared memory or of a static __shared__ array aborts with ASan's report. The interpreter is not
# instrumented: libasan is preloaded, with libstdc++ (python does not link it, and ASan's
# __cxa_throw interceptor, i.e. a TORCH_CHECK, needs it loaded when ASan starts); leak checking
# is off (Python's interned objects). --capture=sys: ASan's report goes to the terminal, not to
# pytest's capture file that dies with the process.
EMU_ASAN_BUILD ?= build/simt_emu_asan
EMU_ASAN_ENV   = SIMT_EMU_ASAN=1 \
                 LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
                 ASAN_OPTIONS=detect_leaks=0:$(ASAN_OPTIONS)
emu-asan:
	@mkdir -p $(EMU_ASAN_BUILD)
	$(EMU_ASAN_ENV) SIMT_EMU_BUILD=$(abspath $(EMU_ASAN_BUILD)) \
	  PYTHONPATH=$(abspath python):$(abspath tools/simt_emu) \
	  $(VPY) -m pytest -q -p no:cacheprovider --capture=sys -p pytest_simt_emu \
	  $(if $(EMU_K),-k "$(EMU_K)",) $(PYTEST_ARGS) $(EMU_TESTS)

# flash-emu-asan: tests/test_flash_emu.py and test_flash_emu_nonfinite.py (the flash
# forward/backward kernels under tests/flash_emu) with their libraries built under
# AddressSanitizer (LONGATTN_FLASH_EMU_ASAN=1).
flash-emu-asan:
	$(EMU_ASAN_ENV) LONGATTN_FLASH_EMU_ASAN=1 PYTHONPATH=$(abspath python) \
	  $(VPY) -m pytest -q -p no:cacheprovider --capture=sys $(PYTEST_ARGS) tests/test_flash_emu.py \
	  tests/test_flash_emu_nonfinite.py

kvpress-test: build
	$(call venv_install,$(KVPRESS_VENV),$(PYTHON),$(KVPRESS_LOCK))
	@if [ "$$(cat $(KVPRESS_DIR)/lite/.stamp 2>/dev/null)" = "$(KVPRESS)" ]; then echo "$(KVPRESS_DIR)/lite: up to date"; \
	else set -e; rm -rf $(KVPRESS_DIR)/lite; $(PIP) install -q --no-deps --target $(KVPRESS_DIR)/lite $(KVPRESS); \
	  echo "$(KVPRESS)" > $(KVPRESS_DIR)/lite/.stamp; fi
	LONGATTN_REQUIRE_KVPRESS=1 PYTHONPATH=$(abspath $(KVPRESS_DIR)/lite) $(VPY) $(KVPRESS_TEST)
	LONGATTN_REQUIRE_KVPRESS=1 PYTHONPATH=$(abspath python) $(KVPRESS_VENV)/bin/python $(KVPRESS_TEST)

lock:
	$(PYTHON) tools/lock_requirements.py $(LOCK_NAMES)

info:
	@$(VPY) -c "import torch, longattn._C as C; print(C.build_info()); print(torch.__config__.parallel_info())"

clean:
	rm -rf build python/longattn/_C*.so python/longattn/_C*.so.stamp python/*.egg-info *.egg-info
	find . \( -path './.venv*' -o -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV) $(GPU_VENV) $(KVPRESS_VENV) $(KVPRESS_DIR)
