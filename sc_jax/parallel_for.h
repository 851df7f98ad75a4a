// ParallelFor::Run(pool, n, fn): fn(0..n-1) on the calling thread and XLA's intra-op thread
// pool (the FFI's ThreadPool), tasks taken from one atomic counter. The caller then waits
// only for tasks already taken, so it never waits on one the pool has not started (the pool
// may be busy with the very thunk that called). Shared by sc_jax's C++ kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

struct ParallelFor {
  std::function<void(int64_t)> fn;
  int64_t n = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  bool Drain() {  // runs tasks until none is left; true if this call finished the last one
    int64_t ran = 0;
    for (int64_t i; (i = next.fetch_add(1)) < n; ++ran) fn(i);
    return ran > 0 && done.fetch_add(ran) + ran == n;
  }

  static void Run(xla::ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
    auto work = std::make_shared<ParallelFor>();
    work->fn = std::move(fn);
    work->n = n;
    for (int64_t t = 0; t < std::min<int64_t>(pool.num_threads(), n - 1); ++t)
      pool.Schedule([work] {
        if (work->Drain()) {
          std::lock_guard<std::mutex> lock(work->mutex);
          work->finished.notify_all();
        }
      });
    if (!work->Drain()) {
      std::unique_lock<std::mutex> lock(work->mutex);
      work->finished.wait(lock, [&] { return work->done.load() == work->n; });
    }
  }
};
