// Dynamic scheduling of independent work items over torch's intra-op threads. Items are
// handed out in the given order (callers put the costliest first), so a causal mask's uneven
// query blocks do not leave a thread idle. Each item writes disjoint output, so the result
// does not depend on which thread ran it.
#pragma once
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace longattn::cpu {

// make_state() builds per-thread scratch once per thread; body(item, state) runs each item.
template <typename MakeState, typename Body>
void parallel_items(int64_t n, MakeState&& make_state, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto state = make_state();
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, state);
    }
  });
}

}  // namespace longattn::cpu
