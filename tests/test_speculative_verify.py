"""Speculative verification math: hand-made cases, then exactness of the sampled distribution.

The distribution tests run the decoding loop itself (`run_loop`) with Markov tables in place of LMs,
so they check the same sampling, verification and commit code that `speculative_generate` runs.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from effjax.generate.sampling import SamplingParams, logits_to_probs
from effjax.speculative import decode, verify

V = 10
# Jitted once per shape: eager dispatch would compile every primitive separately.
verify_greedy = jax.jit(verify.verify_greedy, static_argnames="fill")
verify_sampled = jax.jit(verify.verify_sampled, static_argnames="fill")


def onehot(ids, v=V):
  return jax.nn.one_hot(jnp.asarray(ids), v, dtype=jnp.float32)


def probs_with(peaks, mass=1.0, v=V):
  """[..., V] distributions putting `mass` on each peak and the rest spread over the others."""
  p = onehot(peaks, v) * mass
  rest = (1.0 - mass) / (v - 1)
  return p + (1.0 - onehot(peaks, v)) * rest


# ------------------------------------------------------------------------------------------------
# Hand-made cases.


def test_greedy_perfect_match_emits_bonus():
  draft = jnp.array([[3, 1, 4]])
  target = onehot([[3, 1, 4, 7]])  # argmaxes agree on every drafted position, then 7.
  res = verify_greedy(draft, target)
  assert int(res.num_accepted[0]) == 3
  np.testing.assert_array_equal(res.tokens[0], [3, 1, 4, 7])
  assert bool(res.bonus[0])


def test_sampled_perfect_match_emits_bonus_from_last_target_position():
  draft = jnp.array([[3, 1, 4]])
  q = probs_with([[3, 1, 4]], mass=0.9)
  p = jnp.concatenate([q, onehot([[7]])], axis=1)  # p == q on drafted positions: always accept.
  for seed in range(5):
    res = verify_sampled(jax.random.key(seed), draft, q, p)
    assert int(res.num_accepted[0]) == 3
    np.testing.assert_array_equal(res.tokens[0], [3, 1, 4, 7])
    assert bool(res.bonus[0])


def test_first_position_mismatch_greedy_and_sampled():
  draft = jnp.array([[5, 1, 4]])
  target = onehot([[2, 1, 4, 7]])  # Position 0 disagrees; the later agreement must not count.
  res = verify_greedy(draft, target, fill=-1)
  assert int(res.num_accepted[0]) == 0
  np.testing.assert_array_equal(res.tokens[0], [2, -1, -1, -1])
  assert not bool(res.bonus[0])
  # Sampled: p(5) = 0 at position 0, so it is rejected and the residual is p itself.
  q = onehot([[5, 1, 4]])
  res = verify_sampled(jax.random.key(0), draft, q, target, fill=-1)
  assert int(res.num_accepted[0]) == 0
  np.testing.assert_array_equal(res.tokens[0], [2, -1, -1, -1])


def test_transformers_hand_case_accepts_two_then_resamples():
  # Mirrors transformers' test_speculative_sampling: drafts [1, 4, 5], target accepts 1 and 4, and
  # the residual at position 2 leaves only token 8, so the output is [1, 4, 8] with n == 2.
  draft = jnp.array([[1, 4, 5]])
  q = onehot([[1, 4, 5]])
  p = onehot([[1, 4, 8, 0]])
  res = verify_sampled(jax.random.key(3), draft, q, p, fill=-1)
  assert int(res.num_accepted[0]) == 2
  np.testing.assert_array_equal(res.tokens[0, :3], [1, 4, 8])


def test_ragged_rows_each_stop_at_their_own_mismatch_and_draft_len():
  draft = jnp.array([[1, 2, 3, 4],
                     [1, 2, 3, 4],
                     [1, 2, 3, 4],
                     [1, 2, 3, 4]])
  target = onehot([[1, 2, 3, 4, 9],   # all four accepted, bonus 9
                   [1, 7, 3, 4, 9],   # mismatch at 1 -> correction 7
                   [6, 2, 3, 4, 9],   # mismatch at 0 -> correction 6
                   [1, 2, 3, 4, 9]])  # draft_len 2: accepts 2, bonus is target at position 2 = 3
  draft_len = jnp.array([4, 4, 4, 2])
  for res in (verify_greedy(draft, target, draft_len, fill=-1),
              verify_sampled(jax.random.key(1), draft, onehot(draft), target, draft_len,
                                    fill=-1)):
    np.testing.assert_array_equal(res.num_accepted, [4, 1, 0, 2])
    np.testing.assert_array_equal(res.tokens, [[1, 2, 3, 4, 9],
                                               [1, 7, -1, -1, -1],
                                               [6, -1, -1, -1, -1],
                                               [1, 2, 3, -1, -1]])
    np.testing.assert_array_equal(res.bonus, [True, False, False, True])
    np.testing.assert_array_equal(res.accepted[1], [True, False, False, False])


def test_gamma_one_and_empty_draft():
  draft = jnp.array([[4], [4]])
  target = onehot([[4, 6], [5, 6]])
  res = verify_greedy(draft, target)
  np.testing.assert_array_equal(res.num_accepted, [1, 0])
  np.testing.assert_array_equal(res.tokens, [[4, 6], [5, 0]])
  # draft_len 0: nothing offered, the target's first distribution gives the token (a plain step).
  res = verify_greedy(draft, target, jnp.array([0, 0]))
  np.testing.assert_array_equal(res.num_accepted, [0, 0])
  np.testing.assert_array_equal(res.tokens[:, 0], [4, 5])


def test_zero_draft_probability_rejects_without_nan():
  # The draft "sampled" token 2 although its declared q gives it probability 0: reject, no division.
  draft = jnp.array([[2, 2]])
  q = onehot([[3, 3]])
  p = jnp.full((1, 3, V), 1.0 / V)
  for seed in range(10):
    res = verify_sampled(jax.random.key(seed), draft, q, p)
    assert int(res.num_accepted[0]) == 0
    assert int(res.tokens[0, 0]) != 3  # The residual max(0, p - q) excludes q's token.
  # p == q with the drafted token outside both: the residual is empty; fall back to p, never NaN.
  r = verify.residual_distribution(q[0, 0], q[0, 0])
  assert np.isfinite(np.asarray(r)).all()
  np.testing.assert_allclose(r, q[0, 0])


def test_residual_is_normalised_not_softmaxed():
  p = jnp.array([0.5, 0.3, 0.2, 0.0])
  q = jnp.array([0.1, 0.6, 0.1, 0.2])
  expected = np.array([0.4, 0.0, 0.1, 0.0]) / 0.5
  r = np.asarray(verify.residual_distribution(p, q))
  np.testing.assert_allclose(r, expected, atol=1e-6)
  assert np.abs(r - np.asarray(jax.nn.softmax(p - q))).max() > 0.1


def test_seeded_determinism():
  key = jax.random.key(0)
  rng = np.random.default_rng(0)  # numpy inputs: eager jax.random would compile for seconds.
  q = rng.dirichlet(np.ones(V), (8, 4)).astype(np.float32)
  p = rng.dirichlet(np.ones(V), (8, 5)).astype(np.float32)
  draft = (q.cumsum(-1) < rng.random((8, 4, 1))).sum(-1).clip(0, V - 1)
  a = verify_sampled(key, draft, q, p)
  b = verify_sampled(key, draft, q, p)
  c = verify_sampled(jax.random.key(9), draft, q, p)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="G \\+ 1"):
    verify_greedy(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3, V)))
  with pytest.raises(ValueError, match="share a vocabulary"):
    verify_sampled(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3, V + 1)),
                          jnp.zeros((1, 4, V)))


def test_acceptance_rate_is_one_minus_total_variation():
  p = jnp.array([0.5, 0.5, 0.0])
  q = jnp.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(verify.acceptance_rate(q, p), 0.5)  # TV = 0.5
  np.testing.assert_allclose(verify.acceptance_rate(p, p), 1.0)


# ------------------------------------------------------------------------------------------------
# Distribution: Markov tables through the real loop.

MV, SEQ, N_SAMPLES = 6, 3, 100_000


def markov_fwd(table_logits):
  """A `ForwardFn` for an order-1 Markov chain: next-token logits depend on the current token only."""
  def fwd(cache, tokens, lengths):
    del lengths
    return table_logits[tokens], cache  # [B, T, V]
  return fwd


def exact_joint(table_logits, start, sampling):
  """P(x_1..x_SEQ | start) under the sampled target distribution, as a flat [V**SEQ] array."""
  trans = np.asarray(logits_to_probs(table_logits, sampling), np.float64)  # [V, V]
  joint = np.zeros((MV,) * SEQ)
  for seq in itertools.product(range(MV), repeat=SEQ):
    prob, prev = 1.0, start
    for x in seq:
      prob *= trans[prev, x]
      prev = x
    joint[seq] = prob
  return joint.reshape(-1)


def sample_sequences(target_logits, draft_logits, sampling, gamma, declare_q=None, seed=0):
  prompts = jnp.zeros((N_SAMPLES, 1), jnp.int32)  # Start token 0 for every row.

  @jax.jit
  def run(key):
    return decode.run_loop(markov_fwd(target_logits), markov_fwd(draft_logits), None, None,
                           prompts, jnp.ones((N_SAMPLES,), jnp.int32), key, gamma=gamma,
                           max_new_tokens=SEQ, sampling=sampling, declare_q=declare_q)
  out = run(jax.random.key(seed))
  assert (np.asarray(out.lengths) == SEQ).all()
  return np.asarray(out.tokens), out


def chi_square_pvalue(tokens, joint):
  codes = np.ravel_multi_index(tokens.T, (MV,) * SEQ)
  counts = np.bincount(codes, minlength=MV ** SEQ).astype(np.float64)
  assert counts[joint == 0].sum() == 0, "sampled a sequence the target gives probability 0"
  expected = joint * len(tokens)
  big = expected >= 5  # Pool sparse cells so the chi-square approximation holds.
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.fixture(scope="module")
def tables():
  rng = np.random.default_rng(42)
  target = jnp.asarray(1.5 * rng.standard_normal((MV, MV)), jnp.float32)  # [V, V] next-token logits
  draft = jnp.asarray(1.5 * rng.standard_normal((MV, MV)), jnp.float32)  # unrelated: many rejections
  return target, draft


@pytest.mark.parametrize("sampling,gamma", [
    (SamplingParams(temperature=1.0), 2),
    (SamplingParams(temperature=0.6), 3),
    (SamplingParams(temperature=1.5, top_p=0.8), 2),
    (SamplingParams(temperature=1.0, top_k=3, top_p=0.9), 4),
])
def test_markov_joint_matches_target(tables, sampling, gamma):
  target, draft = tables
  tokens, out = sample_sequences(target, draft, sampling, gamma)
  pvalue = chi_square_pvalue(tokens, exact_joint(target, 0, sampling))
  assert pvalue > 1e-3, f"speculative samples do not follow the target (p={pvalue:.2e})"
  # The test only means something if the draft was both accepted and rejected often.
  acc = int(out.metrics.accepted.sum()) / int(out.metrics.drafted.sum())
  assert 0.1 < acc < 0.95, acc


def test_markov_negative_control_wrong_q_fails(tables):
  """Declaring a q other than the one the draft sampled from (the bug of transformers #32867) must be
  caught by the same test: here q is declared at temperature 1 while the draft sampled at 0.6."""
  target, draft = tables
  sampling = SamplingParams(temperature=0.6)
  wrong = lambda q: jax.nn.softmax(jnp.log(jnp.maximum(q, 1e-30)) * 0.6, axis=-1)
  tokens, _ = sample_sequences(target, draft, sampling, 3, declare_q=wrong)
  pvalue = chi_square_pvalue(tokens, exact_joint(target, 0, sampling))
  assert pvalue < 1e-6, f"a wrong q went unnoticed (p={pvalue:.2e})"


def test_markov_draft_equal_target_accepts_everything(tables):
  target, _ = tables
  sampling = SamplingParams(temperature=1.0)
  tokens, out = sample_sequences(target, target, sampling, 2, seed=1)
  assert int(out.metrics.accepted.sum()) == int(out.metrics.drafted.sum())
  assert chi_square_pvalue(tokens, exact_joint(target, 0, sampling)) > 1e-3
