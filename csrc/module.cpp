// The Python module face of longattn._C: build information and test hooks.
//
// The ops themselves are registered with the dispatcher by TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL blocks in the other translation units of this module
// (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/...); importing longattn._C runs their
// static registrars. Nothing from torch is needed here but its version macros.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "cpu/checks.h"
#include "cpu/gemm.h"
#include "common/mask.h"
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
  // The Hopper forward (sm_90a) was compiled: LONGATTN_CUDA_BACKEND=sm90 can run on a 9.0 GPU.
#if defined(LONGATTN_WITH_SM90) && LONGATTN_WITH_SM90
  d["cuda_sm90"] = true;
#else
  d["cuda_sm90"] = false;
#endif
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

// The hull of the (query, key) pairs the mask lets see among query rows [0, nq) and keys
// [0, nk): (q0, q1, k0, k1), half-open, and whether the window band (not only the sinks)
// contributes; None when nothing is visible. Ring attention's schedule trims each kernel call
// to it, from the same definition the kernels classify their tiles with.
py::object visible_hull(int64_t q_start, int64_t k_start, int64_t left, int64_t right,
                        int64_t sinks, bool causal, int64_t nq, int64_t nk) {
  longattn::MaskParams m;
  m.q_start = q_start;
  m.k_start = k_start;
  m.left = left;
  m.right = right;
  m.sinks = sinks;
  m.causal = causal;
  const longattn::Range rows = m.query_range(0, nk, nq);
  if (rows.empty()) return py::none();
  longattn::Range sink, band;
  m.key_ranges(rows.lo, rows.hi, nk, &sink, &band);
  if (sink.empty() && band.empty()) return py::none();
  const int64_t k0 = sink.empty() ? band.lo : (band.empty() ? sink.lo : std::min(sink.lo, band.lo));
  const int64_t k1 = sink.empty() ? band.hi : (band.empty() ? sink.hi : std::max(sink.hi, band.hi));
  return py::make_tuple(rows.lo, rows.hi, k0, k1, !band.empty());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longattn native extension (ops are under torch.ops.longattn)";
  m.attr("__version__") = LONGATTN_VERSION;
  m.def("build_info", &build_info,
        "Dict describing how this extension was built: version, cuda, cuda_archs, cuda_sm90, "
        "cuda_version, cpu_isa, cpu_gemm, torch_version, torch_version_full, openmp.");
  m.def(
      "_set_cpu_tuning",
      [](int64_t tile_q, int64_t tile_k, int64_t splitk) {
        longattn::cpu::set_cpu_tuning({tile_q, tile_k, splitk});
      },
      py::arg("tile_q") = 0, py::arg("tile_k") = 0, py::arg("splitk") = -1,
      "Override the CPU forward's tile shape (0, 0: its choice) and split-K chunk size in key "
      "tiles (-1: its rule, 0: never split), for tests and tuning (csrc/cpu/tuning.h).");
  m.def("_visible_hull", &visible_hull,
        "(q0, q1, k0, k1, band) hull of the visible pairs of a mask over nq x nk, or None "
        "(common/mask.h; used by ring attention's schedule).");
  m.def("_check_softcap_row", &longattn::cpu::softcap_row_vs_scalar,
        "(CPU softcap_row(x), softcap_logit per element) for the tests.");
}
