// The Python module face of longattn._C: build information and test hooks.
//
// The ops themselves are registered with the dispatcher by TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL blocks in the other translation units of this module
// (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/...); importing longattn._C runs their
// static registrars. Nothing from torch is needed here but its version macros.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/checks.h"
#include "cpu/gemm.h"
#include "cpu/tuning.h"

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>  // torch >= 2.9: no other torch headers pulled in
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

// Fallbacks so the file also compiles outside the CMake build (e.g. an IDE index).
#ifndef LONGATTN_VERSION
#define LONGATTN_VERSION "0.0.0+unknown"
#endif
#ifndef LONGATTN_WITH_CUDA
#define LONGATTN_WITH_CUDA 0
#endif
#ifndef LONGATTN_CUDA_ARCHS
#define LONGATTN_CUDA_ARCHS ""
#endif
#ifndef LONGATTN_CPU_ISA_NAME
#define LONGATTN_CPU_ISA_NAME "none"
#endif
#ifndef LONGATTN_OPENMP
#define LONGATTN_OPENMP 0
#endif
#ifndef LONGATTN_TORCH_VERSION_STR
#define LONGATTN_TORCH_VERSION_STR ""
#endif

namespace py = pybind11;

namespace {

py::list split_archs(const std::string& s) {
  py::list out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.append(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.append(cur);
  return out;
}

std::string torch_version_compiled() {
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && defined(TORCH_VERSION_PATCH)
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return LONGATTN_TORCH_VERSION_STR;
#endif
}

py::dict build_info() {
  py::dict d;
  d["version"] = LONGATTN_VERSION;
  d["cuda"] = static_cast<bool>(LONGATTN_WITH_CUDA);
  d["cuda_archs"] = split_archs(LONGATTN_CUDA_ARCHS);
#if LONGATTN_WITH_CUDA && defined(LONGATTN_CUDA_VERSION)
  d["cuda_version"] = LONGATTN_CUDA_VERSION;  // nvcc that compiled the kernels
#else
  d["cuda_version"] = py::none();
#endif
  d["cpu_isa"] = LONGATTN_CPU_ISA_NAME;
  d["cpu_gemm"] = longattn::cpu::gemm_backend();  // tile GEMMs: avx512 | mkl | loops
  d["torch_version"] = torch_version_compiled();     // headers compiled against
  d["torch_version_full"] = LONGATTN_TORCH_VERSION_STR;  // torch.__version__ at build time
  d["openmp"] = static_cast<bool>(LONGATTN_OPENMP);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longattn native extension (ops are under torch.ops.longattn)";
  m.attr("__version__") = LONGATTN_VERSION;
  m.def("build_info", &build_info,
        "Dict describing how this extension was built: version, cuda, cuda_archs, "
        "cuda_version, cpu_isa, cpu_gemm, torch_version, torch_version_full, openmp.");
  m.def(
      "_set_cpu_tuning",
      [](int64_t tile_q, int64_t tile_k, int64_t splitk) {
        longattn::cpu::set_cpu_tuning({tile_q, tile_k, splitk});
      },
      py::arg("tile_q") = 0, py::arg("tile_k") = 0, py::arg("splitk") = -1,
      "Override the CPU forward's tile shape (0, 0: its choice) and split-K chunk size in key "
      "tiles (-1: its rule, 0: never split), for tests and tuning (csrc/cpu/tuning.h).");
  m.def("_check_softcap_row", &longattn::cpu::softcap_row_vs_scalar,
        "(CPU softcap_row(x), softcap_logit per element) for the tests.");
}
