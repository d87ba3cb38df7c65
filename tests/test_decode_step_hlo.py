"""The compiled decode step moves no cache buffer and no weight matrix (a structural check, not a timing).

On XLA:CPU two layouts made every cached step copy whole arrays: the attention output projection
written as `einsum("btnh,nhd->btd")` transposed `wo` on every call, and a [B, S, K, H] cache was
transposed for attention in every layer (benchmarks/RESULTS.md, "Two fixes to the decode step").
These tests compile cached decode loops and look in the loop body of the optimised HLO for a `copy`
or `transpose` (or a fusion XLA named after one) whose output has the size of a cache buffer or of
a weight matrix. A negative control shows that the detector finds such a copy when one is there.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import registry
from effjax.models.lm import init_cache, random_params
from effjax.speculative.metrics import DecodeSteps, _decode_steps

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(")


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if head:
      name, comps[head.group(1)] = head.group(1), []
    elif line.startswith("}"):
      name = None
    elif name:
      comps[name].append(line)
  return comps


def loop_body_moves(hlo: str, sizes: set[int]) -> list[str]:
  """Copies/transposes inside while-loop bodies whose output has one of `sizes` elements."""
  comps = _computations(hlo)
  found = []
  for body in set(re.findall(r"body=%([\w.\-]+)", hlo)):
    for line in comps.get(body, []):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, dims, op = m.groups()
      size = int(np.prod([int(d) for d in dims.split(",") if d]))
      moves = op in ("copy", "transpose") or (
          op == "fusion" and re.match(r"(copy|transpose)", name))
      if moves and size in sizes:
        found.append(f"{name} [{dims}]")
  return found


def test_detector_finds_a_per_step_transpose():
  """Negative control: a loop that transposes its carry each step is caught."""
  @jax.jit
  def transposing(x):
    step = lambda i, c: jnp.swapaxes(jnp.swapaxes(c, 0, 1) * 1.5, 0, 1)[::-1]
    return jax.lax.fori_loop(0, 3, step, x)
  x = jnp.zeros((4, 64, 16))
  assert loop_body_moves(transposing.lower(x).compile().as_text(), {x.size})


@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, 1), (2, 3)])
def test_cached_decode_loop_moves_no_cache_or_weights(batch, tokens):
  cfg = registry.get("lm/tiny")
  params = random_params(cfg, 0)
  cache = init_cache(cfg, batch, 64).with_lengths(jnp.full((batch,), 8, jnp.int32))
  hlo = _decode_steps.lower(params, cache, jnp.zeros((batch, tokens), jnp.int32), config=cfg,
                            steps=3).compile().as_text()
  assert "body=" in hlo, "the decode steps should compile to a while loop"
  sizes = {cache.k[0].size} | {leaf.size for leaf in jax.tree.leaves(params) if leaf.ndim >= 2}
  assert not loop_body_moves(hlo, sizes), (
      "the compiled decode step copies a cache buffer or a weight matrix on every step: "
      f"{loop_body_moves(hlo, sizes)}")


def test_step_harness_reuses_its_donated_cache():
  """`metrics.DecodeSteps` (behind `step_time`, profile_step, fused_step) keeps the cache in place
  across calls, as a decoding loop does: no call copies it, and calls repeat exactly."""
  cfg = registry.get("lm/tiny")
  params = random_params(cfg, 0)
  cache = init_cache(cfg, 2, 64).with_lengths(jnp.full((2,), 8, jnp.int32))
  shape = f"f32[{cache.k[0].shape[0]},64,{cfg.head_dim}]"
  run = DecodeSteps(params, cache, jnp.zeros((2, 1), jnp.int32), config=cfg, steps=3)
  hlo = run.lower().compile().as_text()
  copies = [line for line in hlo.splitlines() if " copy(" in line and f"= {shape}" in line]
  assert not copies, f"the harness copies cache buffers on every call: {copies[:2]}"
  first, second = np.asarray(run()), np.asarray(run())
  np.testing.assert_array_equal(first, second)
  np.testing.assert_array_equal(run.cache.lengths, [8, 8])


def _computations_with(hlo: str, op: str) -> list[str]:
  return [name for name, lines in _computations(hlo).items()
          if any(f" {op}(" in line for line in lines)]


def _rope_holders(tokens: int, steps: int, num_layers: int = 3) -> dict[str, list[str]]:
  cfg = registry.get("lm/tiny").replace(num_layers=num_layers)
  params = random_params(cfg, 0)
  cache = init_cache(cfg, 2, 64).with_lengths(jnp.full((2,), 8, jnp.int32))
  hlo = _decode_steps.lower(params, cache, jnp.zeros((2, tokens), jnp.int32), config=cfg,
                            steps=steps).compile().as_text()
  return {op: _computations_with(hlo, op) for op in ("cosine", "sine")}


@pytest.mark.parametrize("tokens", [1, 5])
def test_rope_cos_and_sin_are_evaluated_once_per_step(tokens):
  """XLA:CPU fused the rotary cos/sin into every layer's q and k rotation, evaluating them per
  output element (~3.5% of a `large` batch-8 step); `lm.rope_cos_sin_once` evaluates them once,
  in a conditional's two identical branches, whatever the number of layers."""
  for op, holders in _rope_holders(tokens, steps=2).items():
    assert 1 <= len(holders) <= 2, f"{op} evaluated in {len(holders)} computations: {holders}"


def test_rope_detector_counts_per_layer_evaluations(monkeypatch):
  """Negative control: with the tables made per use (as before), every layer holds its own."""
  from effjax.models import lm
  monkeypatch.setattr(lm, "rope_cos_sin_once", lm.rope_cos_sin)
  # Another config (a static argument) than the test above, so jit traces anew with the patch.
  for op, holders in _rope_holders(1, steps=2, num_layers=4).items():
    assert len(holders) >= 4, f"{op} in {len(holders)} computations: {holders}"
