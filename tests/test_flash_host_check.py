"""Host-side checks of the CUDA flash forward's layouts and key-tile schedule
(tools/cuda_host/flash_fwd_host_check.cu): compiled with nvcc and run on the CPU, so they run
without a GPU. Skipped when nvcc or the CUTLASS headers are missing."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tools", "cuda_host", "flash_fwd_host_check.cu")


def _cutlass_include():
    env = os.environ.get("LONGATTN_CUTLASS_DIR")
    candidates = [env, os.path.join(env, "include") if env else None]
    try:
        import cutlass_library

        candidates.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "cute", "tensor.hpp")):
            return c
    return None


def test_flash_forward_layouts_and_schedule(tmp_path):
    nvcc = shutil.which("nvcc")
    cutlass = _cutlass_include()
    if nvcc is None or cutlass is None:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass)")
    exe = tmp_path / "flash_fwd_host_check"
    build = subprocess.run(
        [nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-O1", "-I", os.path.join(ROOT, "csrc"),
         "-isystem", cutlass, SOURCE, "-o", str(exe)],
        capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
