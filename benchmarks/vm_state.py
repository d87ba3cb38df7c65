r"""Which state is this VM in? A time series of the probes that tell the Zen 4 VM's states apart.

  python benchmarks/vm_state.py --seconds=120

The 2-vCPU AMD EPYC (Zen 4) VM these benchmarks ran on spends stretches of seconds (up to ~16 s
seen) in a second state (RESULTS.md, "Two states of the VM"): a cache line's round trip from one
vCPU to the other takes ~350 ns instead of ~55 ns (the host has placed them far apart), two-thread
compute runs ~35% slower, streaming from DRAM ~40% faster, and one-thread compute is unchanged. A
memory-bound and a compute-bound program then move in opposite directions: batch-4 speculative
decoding of lm/large went from ~1.6x to ~1.15x over autoregressive decoding. Each line printed here
is one sample of:

* `roundtrip_ns`: a cache line passed back and forth between threads pinned to CPUs 0 and 1 (a
  small C++ program built here with g++; the median of three runs of 200k round trips);
* `compute2_ms`: `metrics.make_compute_probe`, chained 512 x 512 matmuls on XLA's thread pool - the
  probe `benchmarks/speculative.py` times around every pair of runs;
* `compute1_ms`: the same matmuls in numpy with one BLAS thread (needs threadpoolctl);
* `stream_ms`: summing 256 MB of float32 with XLA (DRAM bandwidth; the L3 is 32 MB).

The last stdout line is one JSON object: every sample and the share with a round trip over 200 ns
(`far_share`; 7% of 90 s at 07:45 on 2026-12-01, 26% of the pairs in the speculative run before
it). Run it alone: any other load on the two vCPUs moves every column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effjax.speculative import metrics  # noqa: E402

_ROUNDTRIP_CC = r"""
#include <pthread.h>
#include <sched.h>
#include <atomic>
#include <chrono>
#include <cstdio>
static std::atomic<int> flag alignas(64){0};
static const int kTrips = 200000;
static void pin(int cpu) {
  cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}
static void* echo(void*) {
  pin(1);
  for (int i = 0; i < kTrips; ++i) {
    while (flag.load(std::memory_order_acquire) != 1) {}
    flag.store(0, std::memory_order_release);
  }
  return nullptr;
}
int main() {
  pin(0);
  pthread_t t; pthread_create(&t, nullptr, echo, nullptr);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kTrips; ++i) {
    flag.store(1, std::memory_order_release);
    while (flag.load(std::memory_order_acquire) != 0) {}
  }
  auto elapsed = std::chrono::steady_clock::now() - start;
  double ns = std::chrono::duration<double, std::nano>(elapsed).count();
  pthread_join(t, nullptr);
  std::printf("%.1f\n", ns / kTrips);
}
"""


def build_roundtrip(workdir: str) -> str:
  """Compiles the round-trip program; returns the executable's path."""
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
  src, exe = os.path.join(workdir, "roundtrip.cc"), os.path.join(workdir, "roundtrip")
  with open(src, "w") as f:
    f.write(_ROUNDTRIP_CC)
  subprocess.run([compiler, "-O2", "-pthread", src, "-o", exe], check=True)
  return exe


def timed_ms(fn, runs: int = 3) -> float:
  """The fastest of `runs` calls, in milliseconds."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return min(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seconds", type=float, default=60.0, help="how long to sample")
  p.add_argument("--interval", type=float, default=0.0,
                 help="seconds of idle between samples; with idle gaps the compute probes also "
                      "catch the vCPUs waking up (13.7-20 ms where back to back they read 14)")
  args = p.parse_args(argv)
  if os.cpu_count() < 2:
    raise SystemExit("the round trip needs two CPUs; this machine has one")

  compute2 = metrics.make_compute_probe()
  big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MB: past any L3 here.
  stream = jax.jit(jnp.sum)
  stream(big).block_until_ready()
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    threadpool_limits = None
  b = np.full((512, 512), 1e-3, np.float32)

  def compute1():
    with threadpool_limits(1):
      x = b
      for _ in range(10):
        x = x @ b

  samples = []
  with tempfile.TemporaryDirectory() as tmp:
    exe = build_roundtrip(tmp)
    end = time.time() + args.seconds
    while time.time() < end:
      trips = [float(subprocess.run([exe], capture_output=True, text=True, check=True).stdout)
               for _ in range(3)]
      sample = {"time": time.strftime("%H:%M:%S"), "roundtrip_ns": statistics.median(trips),
                "compute2_ms": round(compute2() * 1e3, 1),
                "compute1_ms": round(timed_ms(compute1), 1) if threadpool_limits else None,
                "stream_ms": round(timed_ms(lambda: stream(big).block_until_ready()), 1)}
      samples.append(sample)
      print(" ".join(f"{k}={v}" for k, v in sample.items()), file=sys.stderr, flush=True)
      time.sleep(args.interval)
  far = [s for s in samples if s["roundtrip_ns"] > 200]
  print(json.dumps({"benchmark": "vm_state", "samples": samples,
                    "far_share": round(len(far) / max(len(samples), 1), 3)}))


if __name__ == "__main__":
  main()
