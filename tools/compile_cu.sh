#!/usr/bin/env bash
# tools/compile_cu.sh FILE.cu GENCODE_ARCH [OUT.o] [extra nvcc flags...]: compile one CUDA
# source of csrc/ to an object with the build's flags (CMakeLists.txt, cmake/cuda.cmake) and
# ptxas' resource report, without configuring the whole extension. GENCODE_ARCH as the build
# spells it: 80, 90a, ... Needs the CUDA venv (tools/venv.sh .venv-cuda python3
# requirements/cuda.txt) for torch's and CUTLASS's headers; VENV overrides its path.
#   tools/compile_cu.sh csrc/cuda/attention/sm90/instances/sm90_fwd_hd128_bf16.cu 90a
#   cuobjdump -sass OUT.o | grep -c HGMMA
set -euo pipefail
src=$1 arch=$2
out=${3:-/tmp/$(basename "${src%.cu}")_sm${arch}.o}
shift $(( $# < 3 ? $# : 3 ))
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv-cuda}
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
nvcc_real=${top:+$top/bin/nvcc}
nvcc_real=${nvcc_real:-nvcc}
exec "$nvcc_real" -c "$src" -o "$out" \
  -std=c++20 -O3 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math \
  "-gencode=arch=compute_${arch},code=sm_${arch}" -Xptxas -v \
  -I "$root/csrc" -isystem "$site/cutlass_library/source/include" \
  -isystem "$site/torch/include" -isystem "$site/torch/include/torch/csrc/api/include" \
  -DLONGATTN_WITH_CUDA=1 -DLONGATTN_WITH_SM90=1 -DNDEBUG "$@"
