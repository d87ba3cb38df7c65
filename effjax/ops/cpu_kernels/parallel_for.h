// Work sharing for effjax's XLA FFI kernels on CPU: fn(i) for i in [0, units), on the calling
// thread and on helpers scheduled on XLA's intra-op thread pool.
//
// The units are split into one contiguous range per thread, which that thread claims front to
// back; a thread done with its own range takes what is left of the others'. Units are weight
// panels that sit next to each other in memory, so each core reads one long stream and the
// hardware prefetchers keep up: on AMD Zen 4, two cores read `large`'s [512, 3072] gate/up panels
// at 1 row in 113 us instead of 132, at 8 rows in 197 instead of 266, when units alternated
// between the cores (RESULTS.md, "A new machine"). The caller never waits for a helper that has not
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
  const int64_t helpers =
      use_helpers ? std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), units) - 1) : 0;
  struct State {
    Fn fn;
    int64_t units, ranges;
    std::unique_ptr<std::atomic<int64_t>[]> next;  // Per range: its next unclaimed unit.
    std::atomic<int64_t> slots{1};                 // Ranges handed to threads (the caller: 0).
    std::atomic<int64_t> done{0};
    State(Fn f, int64_t n, int64_t r)
        : fn(std::move(f)), units(n), ranges(r), next(new std::atomic<int64_t>[r]) {
      for (int64_t i = 0; i < r; ++i) next[i].store(begin(i), std::memory_order_relaxed);
    }
    int64_t begin(int64_t range) const { return range * units / ranges; }
  };
  auto state = std::make_shared<State>(std::move(fn), units, helpers + 1);
  // Own range first, then the others' leftovers in turn.
  auto drain = [](State& s, int64_t slot) {
    for (int64_t i = 0; i < s.ranges; ++i) {
      const int64_t range = (slot + i) % s.ranges, end = s.begin(range + 1);
      for (int64_t u = s.next[range].fetch_add(1); u < end; u = s.next[range].fetch_add(1)) {
        s.fn(u);
        s.done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state, drain] { drain(*state, state->slots.fetch_add(1) % state->ranges); });
  }
  drain(*state, 0);
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace effjax

#endif  // EFFJAX_PARALLEL_FOR_H_
