// Shared by the CPU kernels (csrc/attention_cpu/, csrc/gemm_cpu/): the cores this process may use, and
// running one call's work items on the calling thread and helpers scheduled on XLA's CPU thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxserve_cpu {

// The cores this process may run on (its affinity mask on Linux), at least 1.
inline int64_t cpu_count() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs `work->run()` on the calling thread and on up to `num_threads - 1` helpers (0: every core) of XLA's
// pool, and returns once `work->done` counts all `items`.  `run()` claims items from an atomic counter until
// none is left, counting each finished one in `done`; a helper that starts late (the pool busy) finds
// nothing left and never touches the call's buffers, and holds `work` by its shared_ptr, so it may outlive
// the call.
template <class Work>
void run_on_pool(xla::ffi::ThreadPool& pool, const std::shared_ptr<Work>& work, int64_t items, int64_t num_threads) {
  const int64_t threads = num_threads > 0 ? num_threads : cpu_count();
  int64_t helpers = std::min<int64_t>(threads - 1, items - 1);
  if (helpers > 0) helpers = std::min<int64_t>(helpers, std::max<int64_t>(pool.num_threads(), 0));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace jaxserve_cpu
