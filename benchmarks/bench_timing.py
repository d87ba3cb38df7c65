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
