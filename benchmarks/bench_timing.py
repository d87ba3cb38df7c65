"""Timing shared by the benchmarks: medians of calls timed in alternation.

On a shared machine the load drifts within a run (this one's speed moved by up to 2x within an
hour). Timing the candidates in alternation (a, b, a, b, ...) puts each under the same drift, so
their ratio is steadier than that of back-to-back blocks of repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: bool = True) -> dict[str, float]:
  """Median seconds per call of each `fns[name]()`, which must block until its work is done."""
  if warmup:
    for fn in fns.values():
      fn()  # compile / warm up
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def per_call_seconds(fns: dict[str, Callable], args, calls: int = 20, rounds: int = 7) -> dict:
  """Median over `rounds` of (time for `calls` back-to-back calls) / calls, interleaving `fns`.

  For accelerators: back-to-back dispatch lets the device queue fill, so microsecond kernels are
  timed on the device rather than on Python's launch path (one blocking call per sample would
  time the launch). The first call of each function (compilation) is not timed.
  """
  import jax  # Here, so the CPU-only users of this module need not import it.

  def batch(fn):
    def run():
      out = None
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    return run
  med = interleaved_medians({name: batch(fn) for name, fn in fns.items()}, rounds)
  return {name: sec / calls for name, sec in med.items()}
