"""effjax.ops.huge_pages: weights collapsed into 2 MB pages keep their values, and the pages are huge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import random_params, registry
from effjax.models.lm import pack_weights
from effjax.ops import huge_pages


def _huge_kb_around(address: int) -> int:
  """AnonHugePages (kB) of the mapping holding `address` (/proc/self/smaps)."""
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and ":" not in head:  # A mapping's first line: "start-end perms ...".
        start, end = (int(x, 16) for x in head.split("-"))
        inside = start <= address < end
      elif inside and head == "AnonHugePages:":
        return int(line.split()[1])
  return 0


def test_collapse_keeps_values_and_makes_huge_pages():
  reason = huge_pages.unavailable_reason()
  if reason is not None:
    pytest.skip(reason)
  x = jax.random.normal(jax.random.key(0), (3 << 20,))  # 12 MB: whole 2 MB extents inside.
  expected = np.asarray(x).copy()
  result = huge_pages.back_with_huge_pages({"w": x, "note": "not an array"})
  if result["reason"] is not None:
    pytest.skip(result["reason"])  # e.g. a kernel without MADV_COLLAPSE.
  assert result["bytes"] == x.nbytes and result["huge_pages"] >= 4, result
  np.testing.assert_array_equal(np.asarray(x), expected)
  assert _huge_kb_around(x.unsafe_buffer_pointer() + x.nbytes // 2) >= 2048
  np.testing.assert_array_equal(np.asarray(x * 2), expected * 2)  # Still usable by XLA.


def test_disabled_tiny_and_traced_arrays_are_left_alone(monkeypatch):
  monkeypatch.setenv("EFFJAX_HUGE_PAGES", "0")
  assert huge_pages.back_with_huge_pages(jnp.ones((1 << 20,)))["reason"] == (
      "disabled by EFFJAX_HUGE_PAGES=0")
  monkeypatch.delenv("EFFJAX_HUGE_PAGES")
  assert huge_pages.back_with_huge_pages(jnp.ones((16,)))["bytes"] == 0  # Below MIN_BYTES.

  @jax.jit
  def traced(w):
    assert huge_pages.back_with_huge_pages(w)["bytes"] == 0
    return w + 1
  traced(jnp.ones((1 << 20,)))


def test_pack_weights_backs_streaming_weights_with_huge_pages(monkeypatch):
  if huge_pages.unavailable_reason() is not None:
    pytest.skip(huge_pages.unavailable_reason())
  cfg = registry.get("lm/small")  # 19 MB of weights: they stream, so pack_weights packs them.
  calls = []
  real = huge_pages.back_with_huge_pages
  monkeypatch.setattr(huge_pages, "back_with_huge_pages",
                      lambda tree: calls.append(real(tree)) or calls[-1])
  pack_weights(random_params(cfg, 0), cfg)
  assert len(calls) == 1 and calls[0]["bytes"] > 0, calls
