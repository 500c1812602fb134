// Multi-threading of the CPU kernels over torch's OpenMP runtime (torch.set_num_threads
// applies). We open the parallel regions ourselves rather than through at::parallel_for's
// inline header: after torch.set_num_threads(1) then (2), regions opened through that header
// from an extension took ~8 ms each (a worker waking late) until some libtorch-internal
// region ran; a plain `omp parallel` does not show it (measured 0.18 ms vs 8 ms, L=256).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace longattn::cpu {

inline int64_t threads_for(int64_t work_units) {
  if (work_units <= 1 || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work_units));
}

// Run body(thread_index, thread_count) on up to `threads` threads.
// An exception thrown by a worker is caught and rethrown after the region (one escaping an
// OpenMP region would abort the process instead of raising in Python).
template <typename Body>
void parallel_region(int64_t threads, Body&& body) {
#if defined(_OPENMP)
  if (threads > 1) {
    std::exception_ptr error;
    std::atomic_flag has_error = ATOMIC_FLAG_INIT;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      at::internal::ThreadIdGuard tid_guard(omp_get_thread_num());
      c10::ParallelGuard guard(true);
      try {
        body(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
      } catch (...) {
        if (!has_error.test_and_set()) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  body(int64_t(0), int64_t(1));
}

// f(begin, end) over [0, n) in contiguous chunks of at least `grain`, like at::parallel_for.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t threads = threads_for((n + grain - 1) / std::max<int64_t>(grain, 1));
  parallel_region(threads, [&](int64_t t, int64_t nt) {
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) f(begin, end);
  });
}

// Dynamic scheduling of independent work items. Items are handed out in the given order
// (callers put the costliest first), so a causal mask's uneven query blocks do not leave a
// thread idle. Each item writes disjoint output, so the result does not depend on which
// thread ran it. make_state() builds per-thread scratch once per thread.
template <typename MakeState, typename Body>
void parallel_items(int64_t n, MakeState&& make_state, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  parallel_region(threads_for(n), [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, state);
  });
}

}  // namespace longattn::cpu
