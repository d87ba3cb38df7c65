"""The decoder LM's invariances: cached == uncached, rollback by length, implementations agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import LM, init_cache, init_params, registry
from effjax.models.lm import LMConfig, rope_inv_freq


@pytest.fixture(scope="module")
def tiny():
  cfg = registry.get("lm/tiny", matmul_precision="highest")
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 259)


def test_cached_equals_uncached_every_step(tiny):
  cfg, params = tiny
  model = LM(cfg)
  toks = _tokens(3, 16)
  full = model.apply(params, toks).logits  # [B, T, V]
  out = model.apply(params, toks[:, :5], cache=init_cache(cfg, 3, 32))
  np.testing.assert_allclose(out.logits, full[:, :5], atol=2e-5)
  cache = out.cache
  for i in range(5, 16):
    out = model.apply(params, toks[:, i:i + 1], cache=cache)
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, i], atol=2e-5, err_msg=f"step {i}")
  np.testing.assert_array_equal(cache.lengths, [16, 16, 16])


def test_rollback_by_length_ignores_stale_slots(tiny):
  cfg, params = tiny
  model = LM(cfg)
  toks = _tokens(2, 10)
  out = model.apply(params, toks[:, :6], cache=init_cache(cfg, 2, 24))
  # Write 3 junk tokens, then roll back: the next step must not see them.
  junk = model.apply(params, _tokens(2, 3, seed=7), cache=out.cache).cache
  rolled = junk.with_lengths(out.cache.lengths)
  a = model.apply(params, toks[:, 6:10], cache=rolled).logits
  b = model.apply(params, toks[:, 6:10], cache=out.cache).logits
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_ragged_rows_by_length(tiny):
  """Row 1 holds a shorter prefix than row 0; each row matches its own uncached forward."""
  cfg, params = tiny
  model = LM(cfg)
  toks = _tokens(2, 8)
  out = model.apply(params, toks, cache=init_cache(cfg, 2, 16))
  cache = out.cache.with_lengths(jnp.array([8, 5]))
  nxt = jnp.array([[11], [12]])
  step = model.apply(params, nxt, cache=cache).logits[:, 0]
  ref0 = model.apply(params, jnp.concatenate([toks[:1], nxt[:1]], 1)).logits[0, -1]
  ref1 = model.apply(params, jnp.concatenate([toks[1:, :5], nxt[1:]], 1)).logits[0, -1]
  np.testing.assert_allclose(step[0], ref0, atol=2e-5)
  np.testing.assert_allclose(step[1], ref1, atol=2e-5)


def test_chunked_and_remat_match_xla(tiny):
  cfg, params = tiny
  toks = _tokens(2, 37)
  ref = LM(cfg.replace(attention_impl="xla")).apply(params, toks).logits
  chunked = LM(cfg.replace(attention_impl="chunked", attention_kv_chunk=8)).apply(params, toks).logits
  remat = LM(cfg.replace(remat=True, attention_impl="xla")).apply(params, toks).logits
  np.testing.assert_allclose(chunked, ref, atol=2e-5)
  np.testing.assert_allclose(remat, ref, atol=1e-6)


def test_packed_segments_do_not_see_each_other(tiny):
  cfg, params = tiny
  model = LM(cfg)
  a, b = _tokens(1, 6, seed=3), _tokens(1, 5, seed=4)
  packed = jnp.concatenate([a, b], 1)
  seg = jnp.array([[1] * 6 + [2] * 5])
  pos = jnp.array([list(range(6)) + list(range(5))])
  out = model.apply(params, packed, positions=pos, segment_ids=seg).logits
  np.testing.assert_allclose(out[:, 6:], model.apply(params, b).logits, atol=2e-5)
  np.testing.assert_allclose(out[:, :6], model.apply(params, a).logits, atol=2e-5)


def test_bfloat16_cache_writes_exact_values_in_place():
  """A bfloat16 cache is written through its bits (XLA:CPU has no bfloat16 scatter): the new
  keys land at each row's slots exactly, with every other slot as it was, also under jit."""
  from effjax.models.lm import _write_cache
  rng = np.random.default_rng(0)
  buf = jnp.asarray(rng.standard_normal((6, 10, 4)), jnp.bfloat16)  # [B*K = 3*2, S, H]
  new = jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.bfloat16)  # [B, T, K, H]
  starts = jnp.asarray([0, 3, 9])  # Row 2's second token falls off the end: dropped.
  want = np.asarray(buf, np.float32).copy()
  for b in range(3):
    for k in range(2):
      for t in range(2):
        if starts[b] + t < 10:
          want[b * 2 + k, int(starts[b]) + t] = np.asarray(new[b, t, k], np.float32)
  for write in (_write_cache, jax.jit(_write_cache)):
    got = write(buf, new, starts)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_llama3_rope_scaling_bands():
  base = rope_inv_freq(64, 500000.0)
  scaled = rope_inv_freq(64, 500000.0, (8.0, 1.0, 4.0, 8192))
  wavelen = 2 * np.pi / base
  np.testing.assert_allclose(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high freq kept
  np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8.0, rtol=1e-6)
  mid = (wavelen >= 2048) & (wavelen <= 8192)
  assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


def test_bad_configs_say_what_is_wrong():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    LMConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="dtype"):
    LMConfig(dtype="float8")
  with pytest.raises(KeyError, match="known variants"):
    registry.get("lm/nope")
