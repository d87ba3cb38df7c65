"""Sampling: the exact distribution behind each token, the allowed sets, and statistical agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from effjax.generate import sampling
from effjax.generate.sampling import SamplingParams


def _reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
  """numpy reference, one row: temperature, then top-k, then top-p (ties to the lowest id)."""
  logits = np.asarray(logits, np.float64)
  if p.temperature == 0:
    out = np.zeros_like(logits)
    out[int(np.argmax(logits))] = 1.0
    return out
  scaled = logits / p.temperature
  order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
  keep = set(order[:p.top_k] if p.top_k else order)
  if p.top_p < 1.0:
    kept = [i for i in order if i in keep]
    z = np.exp(scaled[kept] - scaled[kept].max())
    z /= z.sum()
    mass, chosen = 0.0, []
    for i, q in zip(kept, z):
      if mass >= p.top_p and chosen:
        break
      chosen.append(i)
      mass += q
    keep = set(chosen)
  out = np.zeros_like(scaled)
  idx = sorted(keep)
  e = np.exp(scaled[idx] - scaled[idx].max())
  out[idx] = e / e.sum()
  return out


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_k=2.5), "top_k")])
def test_invalid_params_raise_clear_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kw)


def test_params_are_hashable_static_jit_args():
  assert SamplingParams(1, 5, 0.9) == SamplingParams(1.0, 5, 0.9)
  assert hash(SamplingParams(1, 5, 0.9)) == hash(SamplingParams(1.0, 5, 0.9))
  traces = []

  def g(logits, params):
    traces.append(params)
    return sampling.logits_to_probs(logits, params)

  jg = jax.jit(g, static_argnums=1)
  x = jnp.zeros((2, 8))
  jg(x, SamplingParams(1, 5, 0.9))
  jg(x, SamplingParams(1.0, 5, 0.9))
  assert len(traces) == 1
  jg(x, SamplingParams(1.0, 4, 0.9))
  assert len(traces) == 2


def test_greedy_is_one_hot_argmax_ties_to_lowest_id():
  logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -3.0]])
  probs = sampling.logits_to_probs(logits, sampling.GREEDY)
  np.testing.assert_array_equal(np.asarray(probs), np.eye(4)[[1, 0, 2]])
  tokens = sampling.sample(jax.random.key(0), logits, sampling.GREEDY)
  np.testing.assert_array_equal(np.asarray(tokens), [1, 0, 2])
  assert tokens.dtype == jnp.int32


@pytest.mark.parametrize("params", [
    SamplingParams(1.0), SamplingParams(0.7, top_k=3), SamplingParams(1.3, top_p=0.6),
    SamplingParams(0.9, top_k=5, top_p=0.8), SamplingParams(2.0, top_k=1),
    SamplingParams(1.0, top_k=100), SamplingParams(0.5, top_p=0.01)])
def test_distribution_matches_numpy_reference(params):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 12)).astype(np.float32) * 2
  logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie at the top
  got = np.asarray(sampling.logits_to_probs(jnp.asarray(logits), params))
  want = np.stack([_reference_probs(row, params) for row in logits])
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
  logp = np.asarray(sampling.logits_to_logprobs(jnp.asarray(logits), params))
  np.testing.assert_array_equal(np.isneginf(logp), want == 0)


@pytest.mark.parametrize("params", [SamplingParams(1.0, top_k=3), SamplingParams(1.0, top_p=0.5),
                                    SamplingParams(2.0, top_k=4, top_p=0.7)])
def test_top_k_top_p_never_emit_outside_allowed_set(params):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32))
  allowed = np.asarray(sampling.logits_to_probs(logits, params)) > 0  # [4, 32]
  if params.top_k:
    assert (allowed.sum(-1) <= params.top_k).all()
  keys = jax.random.split(jax.random.key(7), 2000)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample(k, logits, params))(keys))  # [2000, 4]
  for row in range(4):
    seen = np.unique(draws[:, row])
    assert allowed[row, seen].all(), f"row {row} drew {seen} outside {np.nonzero(allowed[row])}"
    # Every allowed token with mass > 2% should actually appear in 2000 draws.
    probs = np.asarray(sampling.logits_to_probs(logits, params))[row]
    assert set(np.nonzero(probs > 0.02)[0]) <= set(seen.tolist())


def _chi_square_pvalue(draws: np.ndarray, probs: np.ndarray) -> float:
  counts = np.bincount(draws, minlength=len(probs))
  support = probs > 0
  assert counts[~support].sum() == 0
  expected = probs[support] / probs[support].sum() * counts.sum()
  return stats.chisquare(counts[support], expected).pvalue


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
  logits = jnp.array([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.7])
  n = 20000
  keys = jax.random.split(jax.random.key(123), n)
  params = SamplingParams(temperature)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample(k, logits[None], params)[0])(keys))
  softmax = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  assert _chi_square_pvalue(draws, softmax) > 1e-3
  # Negative control: the same draws must be rejected against a different temperature.
  wrong = np.asarray(jax.nn.softmax(logits / (temperature * 1.3)), np.float64)
  assert _chi_square_pvalue(draws, wrong) < 1e-6


def test_sample_from_probs_matches_distribution_and_skips_zeros():
  probs = jnp.array([0.0, 0.1, 0.0, 0.6, 0.3, 0.0]) * 2.0  # unnormalised on purpose
  keys = jax.random.split(jax.random.key(5), 10000)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample_from_probs(k, probs))(keys))
  assert _chi_square_pvalue(draws, np.asarray(probs / probs.sum(), np.float64)) > 1e-3


def test_same_key_same_tokens_and_batch_rows_independent():
  logits = jnp.zeros((64, 16))
  params = SamplingParams(1.0)
  a = sampling.sample(jax.random.key(3), logits, params)
  b = sampling.sample(jax.random.key(3), logits, params)
  c = sampling.sample(jax.random.key(4), logits, params)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()
  assert len(np.unique(np.asarray(a))) > 4  # rows are not all given the same draw
