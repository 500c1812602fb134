#!/usr/bin/env bash
# The verification tooling, one entry (docs/development.md): `make verify STEPS="..."` or
# `bash tools/verify.sh STEP...`. Steps:
#   emu            the SIMT, RoPE, RoPE attention, merge and KV-cache CUDA kernels on the CPU
#                  (tools/simt_emu) under a subset of the suite (EMU_TESTS, EMU_K)
#   emu-asan       the same with the emulation built under AddressSanitizer
#   flash-emu-asan tests/test_flash_emu*.py with the flash emulator built under AddressSanitizer
#   kvpress        tests/test_kvcache_kvpress.py against NVIDIA kvpress, with the development
#                  venv's transformers and in kvpress's own pinned venv
#   cuda-build     every .cu compiled (sm_80 by default, CUDA_ARCHS) against the CUDA torch, into
#                  .venv-cuda, then imported (no GPU needed to load it)
#   cuda-resources registers, stack frames and smem of every kernel of that build (cuobjdump), and
#                  the ratchet on the flash kernels' main-loop spills (tools/flash_loop_spills.json)
#   cutlass-carry  the CUTLASS/CuTe headers the CUDA build reaches, into .cutlass/ (for a GPU
#                  machine without nvidia-cutlass or network)
#   sdist          `python -m build --sdist`, then that archive built and installed into a fresh
#                  venv (no source tree around it) and a smoke test run there
#   gpu-rehearsal  the GPU machine's build without its GPU (Python 3.12, torch 2.11.0+cu130,
#                  sm_90): tools/gpu_check.sh --dry-run, then the whole suite against that module
# Needs the development venv and build (make build). Overridable: PYTHON, VENV, MAX_JOBS,
# PYTEST_ARGS, CUDA_ARCHS, EMU_TESTS, EMU_K, RESOURCES_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-$(command -v python3.11 || echo python3)}
VENV=${VENV:-.venv}
VPY=$ROOT/$VENV/bin/python
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
read -r -a PYTEST_EXTRA <<< "${PYTEST_ARGS:-}"
PYTEST=(-m pytest -q -p no:cacheprovider)

# The steps' subset of the suite under the SIMT emulator. Of test_attention / test_backward
# (about 11 minutes emulated on two cores, 8 of them the fp64 gradchecks) EMU_K leaves out the
# gradchecks, the long sequences, the GQA and cross-length sweeps, the fp16/fp64 option sweeps
# (fp16 and fp64 still run through test_grads and the head-dim, varlen, masked-row tests), and the
# fuzz's long cases (hd 256 at L 700 takes minutes emulated; its 60 short random cases run).
# Of test_extend_fused it leaves out the fp64 gradchecks (3 minutes emulated; the dense
# references check every dtype's gradients there) and test_tile_shapes' forced CPU tiles (the
# emulated kernels pick their own tiles, so those repeat the auto case).
EMU_TESTS=${EMU_TESTS:-"tests/test_attention.py tests/test_backward.py tests/test_rope.py
  tests/test_rope_frequencies.py tests/test_rope_grad.py tests/test_merge.py tests/test_kvcache.py
  tests/test_kvcache_paged.py tests/test_kvcache_policies.py tests/test_fuzz.py tests/test_nonfinite.py
  tests/test_extend_fused.py tools/simt_emu/test_emu_cuda_paths.py"}
EMU_K=${EMU_K-"not test_gradcheck_attention and not test_lengths and not test_gqa and
  not test_options_cross_lengths and not (test_options and (fp16 or fp64)) and
  not test_random_long_case and not (test_extend_fused and test_gradcheck) and
  not (test_extend_fused and test_tile_shapes and not auto)"}

# ASan runs: the interpreter is not instrumented, so libasan is preloaded, with libstdc++ (python
# does not link it, and ASan's __cxa_throw interceptor, i.e. a TORCH_CHECK, needs it loaded when
# ASan starts); leak checking is off (Python's interned objects); --capture=sys, so ASan's report
# reaches the terminal rather than a capture file that dies with the process.
asan_env() {
  local cxx=${CXX:-c++}
  echo "LD_PRELOAD=$($cxx -print-file-name=libasan.so) $($cxx -print-file-name=libstdc++.so)"
}

emu_run() {  # emu_run BUILD_DIR [extra env...]
  local build=$1; shift
  mkdir -p "$build"
  local k=()
  [ -n "$EMU_K" ] && k=(-k "$(echo "$EMU_K" | tr '\n' ' ')")
  # shellcheck disable=SC2086
  env "$@" SIMT_EMU_BUILD="$ROOT/$build" PYTHONPATH="$ROOT/python:$ROOT/tools/simt_emu" \
    "$VPY" "${PYTEST[@]}" -p pytest_simt_emu "${k[@]}" "${PYTEST_EXTRA[@]}" $EMU_TESTS
}

step_emu() { emu_run build/simt_emu; }

step_emu-asan() {
  emu_run build/simt_emu_asan SIMT_EMU_ASAN=1 "$(asan_env)" \
    ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}" PYTEST_ADDOPTS="--capture=sys"
}

step_flash-emu-asan() {
  env "$(asan_env)" ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}" LONGATTN_FLASH_EMU_ASAN=1 \
    PYTHONPATH="$ROOT/python" "$VPY" "${PYTEST[@]}" --capture=sys "${PYTEST_EXTRA[@]}" \
    tests/test_flash_emu.py tests/test_flash_emu_nonfinite.py
}

step_kvpress() {
  local lock=requirements/kvpress.txt kvpress
  kvpress=$(grep -i '^kvpress==' "$lock")
  bash tools/venv.sh .venv-kvpress "$PYTHON" "$lock"
  if [ "$(cat .kvpress/lite/.stamp 2>/dev/null)" != "$kvpress" ]; then
    rm -rf .kvpress/lite
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps --target .kvpress/lite "$kvpress"
    echo "$kvpress" > .kvpress/lite/.stamp
  fi
  # kvpress alone beside the venv's transformers: the test's harness calls the presses' compress
  # from its own hook (kvpress's reads keyword arguments newer transformers renamed).
  LONGATTN_REQUIRE_KVPRESS=1 PYTHONPATH="$ROOT/.kvpress/lite" "$VPY" "${PYTEST[@]}" \
    "${PYTEST_EXTRA[@]}" tests/test_kvcache_kvpress.py
  # kvpress's own venv, with the transformers it supports: its own hooks run.
  LONGATTN_REQUIRE_KVPRESS=1 PYTHONPATH="$ROOT/python" .venv-kvpress/bin/python "${PYTEST[@]}" \
    "${PYTEST_EXTRA[@]}" tests/test_kvcache_kvpress.py
}

step_cuda-build() {
  bash tools/venv.sh .venv-cuda "$PYTHON" requirements/cuda.txt
  # Installed into .venv-cuda's site-packages (not in place: the CPU build's module stays), then
  # imported from outside the source tree.
  LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS="${CUDA_ARCHS:-80}" MAX_JOBS=$MAX_JOBS .venv-cuda/bin/python \
    -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
  (cd /tmp && "$ROOT/.venv-cuda/bin/python" -c "import torch, longattn; i = longattn.build_info()
print('cuda build_info:', i); assert i['cuda'], 'built without CUDA'")
}

step_cuda-resources() {
  # The report, and the ratchet on the flash kernels' main-loop spills (tools/flash_loop_spills.json):
  # a change may remove spills from those loops, never add them unnoticed.
  # shellcheck disable=SC2086
  (cd /tmp && "$ROOT/.venv-cuda/bin/python" "$ROOT/tools/cuda_resources.py" \
    ${RESOURCES_ARGS:---loops --gate "$ROOT/tools/flash_loop_spills.json"})
}

step_sdist() {
  local dir=build/sdist
  rm -rf "$dir/dist" "$dir/venv"
  "$VPY" -m build --sdist --no-isolation --outdir "$dir/dist" .
  bash tools/venv.sh "$dir/venv" "$PYTHON" requirements/main.txt
  local venv_py=$ROOT/$dir/venv/bin/python
  MAX_JOBS=$MAX_JOBS "$venv_py" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --no-deps "$dir"/dist/longattn-*.tar.gz
  (cd /tmp && "$venv_py" - <<'PY'
import importlib.metadata, torch, longattn
q = torch.randn(1, 64, 2, 16)
out = longattn.attention(q, q, q, causal=True, window=(15, 0), sinks=2)
import longattn.reference as R
torch.testing.assert_close(out, R.attention_ref(q, q, q, causal=True, window=(15, 0), sinks=2)[0].float(),
                           rtol=1e-5, atol=1e-5)
assert longattn.__file__.find("site-packages") >= 0, longattn.__file__
assert importlib.metadata.version("longattn") == longattn.__version__
print("sdist install ok:", longattn.__version__, longattn.build_info())
PY
  )
}

step_cutlass-carry() { "$VPY" tools/cutlass_carry.py; }

step_gpu-rehearsal() {
  local gpu_python=""
  for p in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      gpu_python=$p
      break
    fi
  done
  bash tools/venv.sh .venv-gpu-rehearsal "${gpu_python:-$PYTHON}" requirements/gpu-rehearsal.txt
  step_cutlass-carry
  # The GPU run's own steps (its build for sm_90 in place from the carried headers, the CUDA
  # tests collected, the smoke benchmark), then every test against the module it built: an API
  # the older torch lacks, or a build break only sm_90 shows, fails here first.
  LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS=90 GPU_CHECK_BUDGET_S=1800 \
    PYTHON="$ROOT/.venv-gpu-rehearsal/bin/python" OUT="$ROOT/build/gpu-rehearsal-out" \
    bash tools/gpu_check.sh --dry-run
  # The GPU machine has no transformers, and neither has this venv: its tests skip here as they
  # would there, whatever CI requires of the main venv.
  env -u LONGATTN_REQUIRE_TRANSFORMERS PYTHONPATH="$ROOT/python" .venv-gpu-rehearsal/bin/python \
    "${PYTEST[@]}" -n "$MAX_JOBS" "${PYTEST_EXTRA[@]}" tests
}

[ $# -gt 0 ] || set -- emu kvpress sdist cuda-build cuda-resources gpu-rehearsal
for s in "$@"; do
  if ! declare -F "step_$s" >/dev/null; then
    echo "verify: unknown step '$s' (see the header of tools/verify.sh)" >&2
    exit 2
  fi
done
for s in "$@"; do
  t0=$SECONDS
  echo "::: verify $s"
  "step_$s"
  echo "::: verify $s ok in $((SECONDS - t0)) s"
done
