#!/usr/bin/env bash
# One-shot GPU check of the RoPE kernel: build the CUDA extension in place, run the RoPE tests
# (every test parametrized over devices runs on cuda too), then the GB/s table with the
# fraction of copy bandwidth. Needs a CUDA build of torch, nvcc, pybind11, cmake, ninja.
#   bash bench/rope_gpu_check.sh            # archs from LONGATTN_CUDA_ARCHS (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS=${LONGATTN_CUDA_ARCHS:-90}
export LONGATTN_BUILD_DIR=${LONGATTN_BUILD_DIR:-build/rope-gpu-check}
"$PY" setup.py build_ext --inplace > "${OUT:-.}/rope_gpu_build.log" 2>&1 || {
  tail -40 "${OUT:-.}/rope_gpu_build.log"; exit 1; }
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import longattn, torch; print(longattn.build_info()); print(torch.cuda.get_device_name())"
"$PY" -m pytest -q -p no:cacheprovider tests/test_rope.py -k cuda
"$PY" bench/bench_rope.py --device cuda
