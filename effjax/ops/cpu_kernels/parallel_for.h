// Work sharing for effjax's XLA FFI kernels on CPU: fn(i) for i in [0, units), on the calling
// thread and on helpers scheduled on XLA's intra-op thread pool.
//
// Units are claimed from a shared counter. The caller never waits for a helper that has not
// started (it may do all the work alone), so a busy pool cannot deadlock it; the shared state,
// fn included, outlives helpers that start late through the shared_ptr.
#ifndef EFFJAX_PARALLEL_FOR_H_
#define EFFJAX_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace effjax {

// use_helpers = false runs everything on the caller: for work of a few microseconds, waking a
// helper costs more than it saves.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t units, bool use_helpers, Fn fn) {
  struct State {
    Fn fn;
    int64_t units;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    State(Fn f, int64_t n) : fn(std::move(f)), units(n) {}
  };
  auto state = std::make_shared<State>(std::move(fn), units);
  auto drain = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.units; i = s.next.fetch_add(1)) {
      s.fn(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = use_helpers ? std::min<int64_t>(pool.num_threads(), units) - 1 : 0;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace effjax

#endif  // EFFJAX_PARALLEL_FOR_H_
