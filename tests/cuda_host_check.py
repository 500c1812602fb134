"""Builds and runs a host check of tools/cuda_host (a .cu whose main checks kernel layouts and
schedules on the CPU) with nvcc: no GPU needed. Skips when nvcc or the CUTLASS headers are
missing."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_host_check(name, tmp_path):
    """Compile tools/cuda_host/<name>.cu for the host, run it, and assert it passed."""
    nvcc = shutil.which("nvcc")
    cutlass = _cutlass_include()
    if nvcc is None or cutlass is None:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass)")
    source = os.path.join(ROOT, "tools", "cuda_host", name + ".cu")
    exe = tmp_path / name
    build = subprocess.run(
        [nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-O1", "-I", os.path.join(ROOT, "csrc"),
         "-isystem", cutlass, source, "-o", str(exe)],
        capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
