#!/usr/bin/env bash
# One command for a fresh GPU machine with CUDA, nvcc and PyTorch but no network: build longattn
# for this GPU, run the CUDA tests, benchmark against SDPA / FlexAttention (/ flash_attn), print
# a short table last. Fits ~9 minutes on an H200 (GPU_CHECK_BUDGET_S, default 560 s, covers all:
# build as it takes, then tests up to 150 s, the benchmark gets what is left less ~90 s for the
# RoPE and ring-per-hop micro-benchmarks and the summary). Phases are stopped with SIGINT at their caps, so pytest
# and the benchmark still write what they finished.
#
#   bash tools/gpu_check.sh               # on the GPU machine, with the source (and .cutlass, and
#                                         # the module + stamp below, when built beforehand)
#   bash tools/gpu_check.sh --dry-run     # here, no GPU: CPU build, the plumbing, the smoke bench
#   LONGATTN_CUDA=1 bash tools/gpu_check.sh --dry-run   # the same with the GPU run's CUDA build
#                                         # (archs: LONGATTN_CUDA_ARCHS, default 90); `make verify STEPS=gpu-rehearsal`
#
# A module built here for the same torch and Python can be carried too (`make verify STEPS=gpu-rehearsal` builds
# python/longattn/_C.cpython-312-x86_64-linux-gnu.so and its .stamp): it skips the build when its
# stamp matches the sources and settings; a stale, foreign or unloadable one is rebuilt.
# CUTLASS/CuTe headers, first found: $LONGATTN_CUTLASS_DIR; the carried folder .cutlass (made by
# `make verify STEPS=cutlass-carry` where nvidia-cutlass is installed); the nvidia-cutlass package.
# Knobs: PYTHON (python3), LONGATTN_CUDA_ARCHS (default: this GPU's, e.g. 90), MAX_JOBS (nproc),
# GPU_CHECK_BUDGET_S (560), GPU_CHECK_SKIP (words: build tests bench extras), TEST_WORKERS (8,
# with pytest-xdist), PYTEST_ARGS, BENCH_ARGS (extra bench/gpu_bench.py arguments).
# Output in $OUT (else bench/out/gpu-check): gpu_check.log (everything printed), build.log,
# junit.xml, gpu_bench.md (table + every measurement with its skip reason), gpu_bench.csv, .json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/bench/out/gpu-check}
mkdir -p "$OUTDIR"
BUDGET=${GPU_CHECK_BUDGET_S:-560}
SKIP=" ${GPU_CHECK_SKIP:-} "

left() { echo $((BUDGET - SECONDS)); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
max() { [ "$1" -gt "$2" ] && echo "$1" || echo "$2"; }
clamp() { min "$(max "$1" "$2")" "$3"; }
# capped CAP CMD...: CMD gets SIGINT at CAP seconds (pytest and gpu_bench.py then report what
# they finished), SIGKILL 20 s later.
capped() { local cap=$1; shift; timeout -s INT -k 20 "$cap" "$@"; }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }
banner() { printf '\n=== %s  (t=%ss, %ss left)\n' "$1" "$SECONDS" "$(left)"; }

main() {
  local status=0 build_s=skipped tests_summary=skipped tests_failed="" bench_note=skipped
  banner "environment"
  echo "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git status --porcelain 2>/dev/null | wc -l)" \
    "changed files; $(nproc) CPUs; out $OUTDIR"
  "$PY" -c "import sys, torch; c = torch.cuda.is_available()
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| GPU', torch.cuda.get_device_name() if c else None)" || return 1
  if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | head -3
    nvcc --version 2>&1 | tail -2
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || return 1
  fi
  for m in triton flash_attn xdist pytest_timeout; do
    "$PY" -c "import $m" 2>/dev/null && echo "  $m: yes" || echo "  $m: no"
  done

  # ---- CUTLASS headers and architecture -----------------------------------------------------
  if [ -n "${LONGATTN_CUTLASS_DIR:-}" ]; then
    echo "CUTLASS: \$LONGATTN_CUTLASS_DIR=$LONGATTN_CUTLASS_DIR"
  elif [ -f .cutlass/include/cute/tensor.hpp ]; then
    export LONGATTN_CUTLASS_DIR=$ROOT/.cutlass
    echo "CUTLASS: carried $LONGATTN_CUTLASS_DIR ($(find .cutlass -type f | wc -l) headers)"
  elif "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
    echo "CUTLASS: the nvidia-cutlass package"
  elif [ $DRY = 0 ] || [ "${LONGATTN_CUDA:-0}" = 1 ]; then
    echo "ERROR: no CUTLASS headers: run 'make verify STEPS=cutlass-carry' where nvidia-cutlass is installed and carry .cutlass"
    return 1
  fi
  if [ $DRY = 0 ]; then
    export LONGATTN_CUDA=1
    export LONGATTN_CUDA_ARCHS=${LONGATTN_CUDA_ARCHS:-$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")}
  elif [ "${LONGATTN_CUDA:-0}" = 1 ]; then  # rehearsal: the GPU run's build, its GPU's arch assumed
    export LONGATTN_CUDA_ARCHS=${LONGATTN_CUDA_ARCHS:-90}
  else
    export LONGATTN_CUDA=0
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  local suffix=""
  [ $DRY = 1 ] && suffix=$([ "$LONGATTN_CUDA" = 1 ] && echo -rehearsal || echo -dry)
  export LONGATTN_BUILD_DIR=${LONGATTN_BUILD_DIR:-$ROOT/build/gpu-check$suffix}
  export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1

  # ---- build ---------------------------------------------------------------------------------
  # A module carried along with the source (built here by `make verify STEPS=gpu-rehearsal`, same torch and
  # Python) is used as is when its stamp matches these sources, this build's settings and torch,
  # and it loads; anything else builds. The stamp is written only after a successful build.
  local so stamp
  so=python/longattn/_C$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  stamp=$(build_stamp)
  if ! skipped build && [ -f "$so" ] && [ "$(cat "$so.stamp" 2>/dev/null)" = "$stamp" ] &&
     "$PY" -c "import longattn" 2>/dev/null; then
    banner "build: none, the carried $so matches ($stamp)"
    build_s=prebuilt
  elif ! skipped build; then
    local cap
    cap=$(max 60 $(($(left) - 200)))
    banner "build: LONGATTN_CUDA=$LONGATTN_CUDA archs ${LONGATTN_CUDA_ARCHS:-none}, MAX_JOBS=$MAX_JOBS,\
 $(find csrc -name '*.cu' | wc -l) .cu + $(find csrc -name '*.cpp' | wc -l) .cpp files, cap ${cap}s"
    [ -f "$so.stamp" ] && echo "(not using the carried module: stamp '$(cat "$so.stamp")')"
    rm -f "$so.stamp"
    local t0=$SECONDS
    capped "$cap" "$PY" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
    local rc=$?
    build_s=$((SECONDS - t0))s
    grep -E "warning|error" "$OUTDIR/build.log" | grep -v -E "^\s*$" | sort | uniq -c | sort -rn | head -8
    if [ $rc != 0 ]; then
      tail -60 "$OUTDIR/build.log"
      echo "BUILD FAILED (rc $rc$([ $rc = 124 ] || [ $rc = 130 ] && echo ': timed out'), ${build_s}): full log in $OUTDIR/build.log"
      return 1
    fi
    echo "$stamp" > "$so.stamp"
    echo "build: ${build_s}"
  fi
  "$PY" -c "import longattn; i = longattn.build_info(); print('build_info:', i); assert i.get('cuda') or $DRY, 'built without CUDA'" || return 1

  # ---- tests ---------------------------------------------------------------------------------
  if ! skipped tests; then
    local cap sel opts=()
    cap=$(clamp $(($(left) - 230)) 45 "${TEST_CAP_S:-150}")
    if [ $DRY = 0 ]; then sel=(-k cuda tests); else sel=(tests/test_cuda_attention.py); fi
    if "$PY" -c "import xdist" 2>/dev/null; then  # workers share the cores: no oversubscription
      opts=(-n "${TEST_WORKERS:-8}")
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(max 1 $(($(nproc) / ${TEST_WORKERS:-8})))}
    fi
    "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=120)
    banner "tests: ${sel[*]} ${opts[*]}, cap ${cap}s"
    capped "$cap" "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10 \
      -o junit_family=xunit2 --junitxml="$OUTDIR/junit.xml" "${opts[@]}" ${PYTEST_ARGS:-} "${sel[@]}" \
      2>&1 | tee "$OUTDIR/.pytest.out" | grep -v -E "^(tests/.*)?[.sxX]+ *(\[ *[0-9]+%\])?$"
    local rc=${PIPESTATUS[0]}
    tests_summary=$(grep -E "(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s" "$OUTDIR/.pytest.out" | tail -1 | tr -d '=')
    tests_failed=$(grep -E "^(FAILED|ERROR) " "$OUTDIR/.pytest.out" | cut -c1-160 | head -12)
    rm -f "$OUTDIR/.pytest.out"
    unset OMP_NUM_THREADS
    [ $rc = 2 ] || [ $rc = 124 ] || [ $rc = 130 ] && tests_summary="STOPPED at the ${cap}s cap (rc $rc): $tests_summary"
    [ $rc != 0 ] && status=1
  fi

  # ---- benchmark -----------------------------------------------------------------------------
  if ! skipped bench; then
    local budget args
    budget=$(max 30 $(($(left) - 90)))
    if [ $DRY = 0 ]; then args=(); else args=(--smoke --impls longattn,flash,simt,sm90,sdpa,sdpa_cudnn,flash_attn); fi
    banner "benchmark: bench/gpu_bench.py --budget-s $budget ${args[*]} ${BENCH_ARGS:-}"
    capped $((budget + 60)) "$PY" bench/gpu_bench.py -v --budget-s "$budget" --out "$OUTDIR" "${args[@]}" ${BENCH_ARGS:-}
    local rc=$?
    bench_note=ok
    [ $rc != 0 ] && { bench_note="exit $rc$([ $rc = 124 ] || [ $rc = 130 ] && echo ' (stopped at its cap)')"; status=1; }
  fi

  # ---- other GPU micro-benchmarks ----------------------------------------------------------
  if ! skipped extras; then
    banner "micro-benchmarks (RoPE, KV cache, head dims, ring)"
    local dev=cuda
    [ $DRY = 1 ] && dev=cpu
    extra "RoPE" bench/bench_rope.py --device "$dev" --quick
    extra "KV cache" bench/bench_kvcache.py --device "$dev" --quick
    extra "head dims 64/96/128/256 (causal, bf16, L 16K)" bench/bench_head_dims.py --device "$dev" \
      --dtype "$([ $DRY = 0 ] && echo bfloat16 || echo float32)" --L "$([ $DRY = 0 ] && echo 16384 || echo 1024)"
    extra "ring machinery per hop (one device, no communication)" bench/ring_hop_overhead.py --device "$dev" \
      $([ $DRY = 0 ] && echo --single-gpu)
  fi

  # ---- summary: the table last ---------------------------------------------------------------
  banner "summary"
  [ $DRY = 0 ] && nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>&1 | sed 's/^/GPU now: /'
  echo "build: ${build_s} | tests: ${tests_summary:-?} | bench: ${bench_note}"
  [ -n "$tests_failed" ] && echo "$tests_failed"
  [ "$bench_note" != skipped ] && [ -f "$OUTDIR/gpu_bench.json" ] && "$PY" bench/gpu_bench.py --report "$OUTDIR/gpu_bench.json"
  return $status
}

# What a build depends on: the sources (hash of csrc/, cmake/, CMakeLists.txt, setup.py), the
# CUDA switch and architectures, and torch's version (the Python ABI is in the module's name).
build_stamp() {
  local src
  src=$(find csrc cmake CMakeLists.txt setup.py -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
        sha256sum | cut -c1-16)
  echo "sources $src cuda $LONGATTN_CUDA archs ${LONGATTN_CUDA_ARCHS:-none}" \
       "torch $("$PY" -c 'import torch; print(torch.__version__)')"
}

# extra LABEL SCRIPT ARGS...: run a micro-benchmark if its script has a --device option, with
# what is left of the budget (at most 45 s).
extra() {
  local label=$1 script=$2
  shift 2
  if [ ! -f "$script" ] || ! "$PY" "$script" --help 2>/dev/null | grep -q -- "--device"; then
    echo "$label: TODO: $script has no --device option yet, not run"
    return 0
  fi
  local cap
  cap=$(min 45 $(($(left) - 15)))
  if [ "$cap" -lt 10 ]; then
    echo "$label: skipped (time budget)"
    return 0
  fi
  if [ $DRY = 1 ]; then
    echo "$label: dry run: would run '$PY $script $*' (cap ${cap}s)"
    return 0
  fi
  echo "--- $label: $script $* (cap ${cap}s)"
  capped "$cap" "$PY" "$script" "$@" 2>&1 | tail -25
  local rc=${PIPESTATUS[0]}
  [ "$rc" != 0 ] && echo "$label: exit $rc$([ "$rc" = 124 ] || [ "$rc" = 130 ] && echo ' (stopped at its cap)')"
  return 0
}

main "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
