"""Backs CPU arrays that stream every decode step (the weights) with 2 MB pages: `back_with_huge_pages`.

Why: a decode step of a model larger than the caches reads every weight from DRAM. On 4 KB pages
the hardware prefetchers stop at each page boundary and every page costs a TLB entry (19 MB of
lm/small is ~4,900 pages per step, `large`'s 126 MB ~31,000, against an STLB of ~2,000 entries).
Collapsed into 2 MB pages, the same weights streamed 11-18% faster through the few-row kernel on
one core (1-9 rows, [256, 1536] matrices; in-process, 2026-11-30) and a whole `large` decode step
took 15% less time at batch 1 and 8% less at batch 8 (benchmarks/RESULTS.md, "Huge pages").

How: Linux's `madvise(MADV_COLLAPSE)` (kernel 6.1+) rewrites populated memory into transparent huge
pages in place, content preserved, whatever the system's THP mode (`madvise` on this machine:
nothing is huge unless asked). Large arrays live in anonymous mappings that the kernel merges with
their neighbours, so the 2 MB-aligned extents covering an array mostly lie inside one mapping
(the extents of `large`'s weights: 141 of 141); an extent that would reach outside its mapping is
skipped. Neighbouring data in a collapsed extent keeps its values (only its backing changes).

An optimisation, never a requirement: on other systems, older kernels or non-CPU arrays it does
nothing and says why in its result; `EFFJAX_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import sys
from typing import Any, Optional

import jax

PAGE = 2 << 20  # x86-64's and arm64's (4 KB base pages) transparent huge page size.
_MADV_COLLAPSE = 25  # linux/mman.h
# Smaller arrays are left alone (their extents are mostly other data). lm/small's weight matrices
# are 0.25-1.5 MB: collapsed with their neighbours.
MIN_BYTES = 256 << 10


def unavailable_reason() -> Optional[str]:
  """None when huge pages can be requested here, else why not."""
  if os.environ.get("EFFJAX_HUGE_PAGES", "1") == "0":
    return "disabled by EFFJAX_HUGE_PAGES=0"
  if not sys.platform.startswith("linux"):
    return f"not Linux ({sys.platform})"
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        return "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage: never)"
  except OSError:
    return "no transparent huge page support (/sys/kernel/mm/transparent_hugepage missing)"
  return None


def _mappings() -> list[tuple[int, int]]:
  """[(start, end)] of this process's memory mappings, sorted (/proc/self/maps)."""
  out = []
  with open("/proc/self/maps") as f:
    for line in f:
      start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
      out.append((start, end))
  return out


def back_with_huge_pages(tree: Any) -> dict:
  """Collapses the memory under `tree`'s CPU arrays of >= 2 MB into 2 MB pages, in place.

  Call it once after loading (`effjax.models.lm.pack_weights` does, for weights that stream),
  outside jit. Values and array objects are unchanged; only the pages behind them differ.

  Returns:
    {"huge_pages": 2 MB extents collapsed, "bytes": bytes of the arrays asked for, "skipped":
    extents left alone (outside one mapping, or the kernel refused), "reason": why nothing was
    done, or None}.
  """
  result = {"huge_pages": 0, "bytes": 0, "skipped": 0, "reason": unavailable_reason()}
  if result["reason"] is not None:
    return result
  buffers = [shard.data for x in jax.tree_util.tree_leaves(tree)
             if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
             for shard in x.addressable_shards
             if shard.device.platform == "cpu" and shard.data.nbytes >= MIN_BYTES]
  if not buffers:
    return result
  libc = ctypes.CDLL(None, use_errno=True)
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  maps = _mappings()
  starts = [start for start, _ in maps]
  seen = set()
  for x in buffers:  # Single-device arrays, one per shard.
    begin = x.block_until_ready().unsafe_buffer_pointer()
    end = begin + x.nbytes
    result["bytes"] += x.nbytes
    i = bisect.bisect_right(starts, begin) - 1
    map_start, map_end = maps[i] if i >= 0 else (0, 0)
    for extent in range(begin // PAGE * PAGE, end, PAGE):
      if extent in seen:
        continue
      seen.add(extent)
      if extent < map_start or extent + PAGE > map_end:  # Would reach outside the mapping.
        result["skipped"] += 1
        continue
      if libc.madvise(extent, PAGE, _MADV_COLLAPSE) == 0:
        result["huge_pages"] += 1
        continue
      err = ctypes.get_errno()
      if err == errno.EINVAL and result["huge_pages"] == 0:
        result["reason"] = "the kernel has no MADV_COLLAPSE (Linux 6.1+)"
        return result
      result["skipped"] += 1  # EAGAIN / ENOMEM: no free huge page just now.
  return result
