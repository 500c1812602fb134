"""Build longattn._C with CMake + Ninja.

    pip install --no-build-isolation -e .     # editable: _C*.so lands in python/longattn/
    pip install --no-build-isolation .        # wheel-style install

Knobs (environment):
    LONGATTN_CUDA          auto (default) | 0 | 1   auto: on when torch has CUDA and nvcc is found
    LONGATTN_CUDA_ARCHS    "80;90" (default); also "8.0;9.0a", "80,90a", "90+PTX"
    LONGATTN_CPU_ISA       auto (default) | avx512 | avx2 | none
    LONGATTN_CUTLASS_DIR   CUTLASS include dir (or a dir whose include/ holds cute/);
                           default: the nvidia-cutlass Python package
    LONGATTN_BUILD_TYPE    Release (default) | RelWithDebInfo | Debug
    LONGATTN_BUILD_DIR     CMake build dir (default build/<type>-<cpu|cuda>-<hash>, persistent)
    LONGATTN_CMAKE_ARGS    extra arguments for the CMake configure step
    LONGATTN_VERBOSE=1     show every compiler command
    MAX_JOBS               parallel compile jobs (default: number of CPUs)
    CMAKE_CUDA_COMPILER / CUDA_HOME   override the nvcc lookup
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env(name: str, default: str = "") -> str:
    v = os.environ.get(name)
    return default if v is None or v.strip() == "" else v.strip()


def _log(msg: str) -> None:
    print(f"[longattn] {msg}", file=sys.stderr, flush=True)


def _norm_archs(spec: str) -> list[str]:
    """'8.0;9.0a' / '80,90a' / 'sm_80 90+PTX' -> ['80', '90a', '90+PTX']."""
    out: list[str] = []
    for a in re.split(r"[;,\s]+", spec.strip()):
        if not a:
            continue
        ptx = ""
        if a.upper().endswith("+PTX"):
            a, ptx = a[:-4], "+PTX"
        a = re.sub(r"^(sm_|compute_)", "", a).replace(".", "")
        if not re.fullmatch(r"\d+[af]?", a):
            raise SystemExit(f"LONGATTN_CUDA_ARCHS: bad architecture {a!r}")
        if a + ptx not in out:
            out.append(a + ptx)
    return out


def _torch_arch_list(archs: list[str]) -> str:
    """['80', '90a'] -> '8.0;9.0a' (TORCH_CUDA_ARCH_LIST spelling)."""
    res = []
    for a in archs:
        m = re.fullmatch(r"(\d+)(\d)([af]?)(\+PTX)?", a)
        assert m, a
        res.append(f"{m[1]}.{m[2]}{m[3]}{m[4] or ''}")
    return ";".join(res)


def _find_nvcc() -> str | None:
    cands = [_env("CMAKE_CUDA_COMPILER"), _env("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if _env(var):
            cands.append(os.path.join(_env(var), "bin", "nvcc"))
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _real_cuda_root(nvcc: str) -> str:
    """The nvcc on PATH may be a wrapper script: ask nvcc itself where it lives (TOP=)."""
    try:
        with tempfile.TemporaryDirectory() as td:
            r = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.path.join(td, "x.o")],
                capture_output=True, text=True, timeout=60,
            )
        m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.M)
        if m:
            root = os.path.realpath(m.group(1).strip())
            if os.path.isfile(os.path.join(root, "bin", "nvcc")):
                return root
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(os.path.join(os.path.realpath(nvcc), "..", ".."))


def _cutlass_dir() -> str | None:
    d = _env("LONGATTN_CUTLASS_DIR")
    if d:
        return os.path.abspath(d)
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
        if os.path.isfile(os.path.join(inc, "cute", "tensor.hpp")):
            return inc
    return None


def _cmake_exe() -> str:
    """Prefer the `cmake` Python package (>= 3.30) over an older system CMake."""
    try:
        import cmake  # type: ignore

        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if not exe:
        raise SystemExit("longattn: CMake not found (pip install 'cmake>=3.30')")
    return exe


def _ninja_exe() -> str | None:
    try:
        import ninja  # type: ignore

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    return shutil.which("ninja")


def _check_cxx20(env: dict) -> None:
    """One clear message, not a CMake trace, when the C++ compiler cannot build C++20."""
    cxx = env.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise SystemExit("longattn: no C++ compiler found (install g++ >= 10 or clang++ >= 12, "
                         "or set CXX)")
    with tempfile.TemporaryDirectory() as td:
        src = os.path.join(td, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <concepts>\n#include <span>\n"
                    "template <std::integral T> int f(std::span<T> s) { return int(s.size()); }\n"
                    "int main() { int a[2]; return f(std::span<int>(a)); }\n")
        r = subprocess.run([cxx, "-std=c++20", "-c", src, "-o", os.path.join(td, "probe.o")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"longattn: the C++ compiler {cxx} cannot compile C++20 (needs g++ >= 10 "
                         f"or clang++ >= 12; set CXX to choose another):\n{r.stderr.strip()[-800:]}")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure + build the CMake project, then put _C*.so where setuptools expects it."""

    def run(self) -> None:
        # setuptools clears self.inplace around build_extension(); remember it.
        self._longattn_inplace = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch
        import torch.utils

        build_type = _env("LONGATTN_BUILD_TYPE", "Release")
        cuda_mode = _env("LONGATTN_CUDA", "auto").lower()
        archs = _norm_archs(_env("LONGATTN_CUDA_ARCHS", "80;90"))
        torch_cuda = torch.version.cuda or ""

        env = os.environ.copy()
        _check_cxx20(env)
        cmake_args = [
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLONGATTN_TORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}",
            f"-DLONGATTN_TORCH_VERSION={torch.__version__}",
            f"-DLONGATTN_TORCH_CUDA_VERSION={torch_cuda}",
            f"-DLONGATTN_VERSION={self.distribution.get_version()}",
            f"-DLONGATTN_CPU_ISA={_env('LONGATTN_CPU_ISA', 'auto')}",
            f"-DLONGATTN_CUDA_ARCHS={';'.join(archs)}",
        ]
        ninja = _ninja_exe()
        if ninja:
            cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")

        # CUDA decision (CMake re-checks the details).
        if cuda_mode in ("1", "on", "true", "yes"):
            want_cuda = True
        elif cuda_mode in ("0", "off", "false", "no"):
            want_cuda = False
        elif cuda_mode == "auto":
            want_cuda = bool(torch_cuda)
        else:
            raise SystemExit(f"LONGATTN_CUDA must be auto, 0 or 1 (got {cuda_mode!r})")
        nvcc = _find_nvcc() if (want_cuda or torch_cuda) else None
        if want_cuda and nvcc is None:
            if cuda_mode == "auto":
                _log("torch has CUDA but nvcc was not found: building the CPU backend only")
                want_cuda = False
            else:
                raise SystemExit("LONGATTN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if want_cuda and not torch_cuda:
            raise SystemExit(f"LONGATTN_CUDA=1 but torch {torch.__version__} has no CUDA")
        cmake_args.append(f"-DLONGATTN_CUDA={'ON' if want_cuda else 'OFF'}")
        if nvcc:
            root = _real_cuda_root(nvcc)
            cmake_args += [
                f"-DCMAKE_CUDA_COMPILER={root}/bin/nvcc",
                f"-DCUDAToolkit_ROOT={root}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
            ]
            # torch's CMake queries a GPU for the arch list unless this is set.
            env.setdefault("TORCH_CUDA_ARCH_LIST", _torch_arch_list(archs) or "8.0")
            _log(f"CUDA toolkit {root}, archs {archs}, CUDA build: {want_cuda}")
        cutlass = _cutlass_dir()
        if cutlass:
            cmake_args.append(f"-DLONGATTN_CUTLASS_INCLUDE_DIR={cutlass}")
        elif want_cuda and cuda_mode == "auto":
            _log("no CUTLASS headers (pip install nvidia-cutlass, or LONGATTN_CUTLASS_DIR): "
                 "building the CPU backend only")
            want_cuda = False
            cmake_args = [a for a in cmake_args if not a.startswith("-DLONGATTN_CUDA=")]
            cmake_args.append("-DLONGATTN_CUDA=OFF")
        elif want_cuda:
            raise SystemExit("LONGATTN_CUDA=1 needs the CUTLASS/CuTe headers: pip install "
                             "nvidia-cutlass, or set LONGATTN_CUTLASS_DIR")

        # Output: CMake links into <build>/out; we copy into setuptools' place. For
        # editable / --inplace builds CMake also copies into python/longattn after each
        # build, so `cmake --build <build dir>` alone refreshes the in-place module.
        inplace_dir = str(ROOT / "python" / "longattn") if self._longattn_inplace else ""
        cmake_args.append(f"-DLONGATTN_INPLACE_DIR={inplace_dir}")
        cmake_args += shlex.split(_env("LONGATTN_CMAKE_ARGS"))

        build_dir = Path(_env("LONGATTN_BUILD_DIR") or self._default_build_dir(build_type, want_cuda, torch))
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_exe()

        _log(f"configure: {build_dir}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *cmake_args], check=True, env=env)

        jobs = _env("MAX_JOBS") or str(os.cpu_count() or 1)
        build_cmd = [cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs]
        if _env("LONGATTN_VERBOSE") not in ("", "0"):
            build_cmd.append("--verbose")
        _log(f"build: -j {jobs}")
        subprocess.run(build_cmd, check=True, env=env)

        built = sorted((build_dir / "out").glob("_C*.so")) or sorted((build_dir / "out").glob("_C*.pyd"))
        if not built:
            raise SystemExit(f"longattn: no _C module in {build_dir / 'out'}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[-1], dest)
        # The torch this module was built against, readable without loading the module: a
        # module built for another torch fails to load with an undefined symbol, and
        # longattn/__init__.py names both versions instead (_C.torch_version is not tracked).
        for d in {dest.parent, Path(inplace_dir)} - {Path("")}:
            (d / "_C.torch_version").write_text(torch.__version__ + "\n")
        _log(f"module: {dest}")

    @staticmethod
    def _default_build_dir(build_type: str, cuda: bool, torch) -> Path:
        # One persistent dir per (interpreter, torch, config): switching venvs or torch
        # builds never reuses a stale CMake cache; rebuilds in the same one are incremental.
        key = f"{sys.prefix}|{torch.__version__}|{torch.utils.cmake_prefix_path}"
        h = hashlib.sha1(key.encode()).hexdigest()[:8]
        return ROOT / "build" / f"{build_type.lower()}-{'cuda' if cuda else 'cpu'}-{h}"


setup(
    ext_modules=[CMakeExtension("longattn._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
