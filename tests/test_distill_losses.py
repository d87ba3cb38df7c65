"""Distillation losses against direct float64 numpy computations: values, gradients, zero corners,
masking and bfloat16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import rel_entr

from effjax.distill import losses

B, T, V = 2, 3, 7


def _np_softmax(x, temp=1.0):
  x = np.asarray(x, np.float64) / temp
  m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
  e = np.exp(x - m)
  return e / e.sum(-1, keepdims=True)


def _np_mean(per_token, mask):
  m = np.ones(per_token.shape) if mask is None else np.asarray(mask, np.float64)
  return float(np.sum(np.where(m > 0, per_token, 0.0) * m) / max(m.sum(), 1.0))


def np_fkl(t, s, mask=None, temp=1.0):
  p, q = _np_softmax(t, temp), _np_softmax(s, temp)
  return temp ** 2 * _np_mean(rel_entr(p, q).sum(-1), mask)


def np_rkl(t, s, mask=None, temp=1.0):
  p, q = _np_softmax(t, temp), _np_softmax(s, temp)
  return temp ** 2 * _np_mean(rel_entr(q, p).sum(-1), mask)


def np_jsd(t, s, mask=None, beta=0.5, temp=1.0):
  p, q = _np_softmax(t, temp), _np_softmax(s, temp)
  m = beta * p + (1 - beta) * q
  per = beta * rel_entr(p, m).sum(-1) + (1 - beta) * rel_entr(q, m).sum(-1)
  return _np_mean(per, mask)


def np_tvd(t, s, mask=None, temp=1.0):
  p, q = _np_softmax(t, temp), _np_softmax(s, temp)
  return _np_mean(0.5 * np.abs(p - q).sum(-1), mask)


CASES = [
    ("fkl", lambda t, s, m, temp: losses.forward_kl(t, s, m, temp), np_fkl),
    ("rkl", lambda t, s, m, temp: losses.reverse_kl(t, s, m, temp), np_rkl),
    ("jsd", lambda t, s, m, temp: losses.generalized_jsd(t, s, m, 0.3, temp),
     lambda t, s, m, temp: np_jsd(t, s, m, 0.3, temp)),
    ("tvd", lambda t, s, m, temp: losses.total_variation(t, s, m, temp), np_tvd),
]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  t = rng.normal(size=(B, T, V)) * 2.0
  s = rng.normal(size=(B, T, V)) * 2.0
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  return t.astype(np.float32), s.astype(np.float32), mask


def _fd_grad(fn, s, eps=1e-5):
  """Central finite differences of a float64 numpy function of the student logits."""
  s = np.asarray(s, np.float64)
  g = np.zeros_like(s)
  for idx in np.ndindex(s.shape):
    hi, lo = s.copy(), s.copy()
    hi[idx] += eps
    lo[idx] -= eps
    g[idx] = (fn(hi) - fn(lo)) / (2 * eps)
  return g


@pytest.mark.parametrize("name,ours,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_value_and_gradient_match_numpy(name, ours, ref, temp):
  t, s, mask = _inputs()
  got = float(ours(jnp.asarray(t), jnp.asarray(s), jnp.asarray(mask), temp))
  np.testing.assert_allclose(got, ref(t, s, mask, temp), rtol=2e-5, atol=1e-6)
  grad = jax.grad(lambda x: ours(jnp.asarray(t), x, jnp.asarray(mask), temp))(jnp.asarray(s))
  want = _fd_grad(lambda x: ref(t, x, mask, temp), s)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=2e-6)
  # Padded tokens get exactly zero gradient.
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_forward_kl_gradient_closed_form():
  """d/ds T^2 KL(p_T || q_T) = T (q_T - p_T) / (number of real tokens)."""
  t, s, mask = _inputs(1)
  temp = 3.0
  grad = jax.grad(lambda x: losses.forward_kl(t, x, mask, temp))(jnp.asarray(s))
  want = temp * (_np_softmax(s, temp) - _np_softmax(t, temp)) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,ours,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("student_zero_too", [False, True])
def test_teacher_zero_probabilities(name, ours, ref, student_zero_too):
  """Teacher logits of -inf (p = 0) are handled at their limits, and no NaN reaches the gradients.

  Where only the teacher is zero, reverse KL is +inf (the student puts mass where the teacher has
  none); when the student is zero there too, every divergence is finite.
  """
  t, s, _ = _inputs(2)
  t[0, 0, :3] = -np.inf
  t[1, 2, 5] = -np.inf
  if student_zero_too:
    s[0, 0, :3] = -np.inf
    s[1, 2, 5] = -np.inf
  got = float(ours(jnp.asarray(t), jnp.asarray(s), None, 1.0))
  want = ref(t, s, None, 1.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert np.isfinite(want) == (student_zero_too or name != "rkl")
  grad = np.asarray(jax.grad(lambda x: ours(jnp.asarray(t), x, None, 1.0))(jnp.asarray(s)))
  assert np.all(np.isfinite(grad)), f"{name}: NaN/inf gradient with zero teacher probabilities"
  if np.isfinite(want):
    np.testing.assert_allclose(grad, _fd_grad(lambda x: ref(t, x, None, 1.0), s), rtol=1e-3,
                               atol=2e-6)


def test_disjoint_support_corners():
  """p > 0 where q = 0: forward KL is +inf; JSD(0.5) is log 2; TVD is 1; reverse KL is +inf."""
  t = jnp.array([[0.0, 0.0, -jnp.inf, -jnp.inf]])
  s = jnp.array([[-jnp.inf, -jnp.inf, 0.0, 1.0]])
  assert float(losses.forward_kl(t, s)) == np.inf
  assert float(losses.reverse_kl(t, s)) == np.inf
  np.testing.assert_allclose(float(losses.generalized_jsd(t, s, beta=0.5)), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(float(losses.total_variation(t, s)), 1.0, rtol=1e-6)
  # Same support with zeros in both: the shared zero entries contribute 0, not NaN.
  t2 = jnp.array([[0.5, -jnp.inf, 1.0]])
  s2 = jnp.array([[1.0, -jnp.inf, 0.0]])
  np.testing.assert_allclose(float(losses.forward_kl(t2, s2)), np_fkl(t2, s2), rtol=1e-5)
  g = jax.grad(lambda x: losses.forward_kl(t2, x))(s2)
  assert np.all(np.isfinite(np.asarray(g)[:, [0, 2]]))


def test_identical_distributions_give_zero():
  t, _, mask = _inputs(3)
  for name in losses.DIVERGENCES:
    np.testing.assert_allclose(float(losses.divergence(name, t, t, mask)), 0.0, atol=1e-6,
                               err_msg=name)


def test_padding_values_do_not_matter():
  t, s, mask = _inputs(4)
  t2, s2 = t.copy(), s.copy()
  t2[mask == 0] = 1e4
  s2[mask == 0] = -1e4
  for name in losses.DIVERGENCES:
    a = float(losses.divergence(name, t, s, mask))
    b = float(losses.divergence(name, t2, s2, mask))
    np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(losses.divergence("fkl", t, s, np.zeros_like(mask))), 0.0)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
def test_bfloat16_inputs(name):
  """bfloat16 logits (even of magnitude ~1e3, where bf16 exp overflows) give float32 results close
  to the float32 computation on the same (rounded) values."""
  t, s, mask = _inputs(5)
  t, s = t * 400.0, s * 400.0
  tb, sb = jnp.asarray(t, jnp.bfloat16), jnp.asarray(s, jnp.bfloat16)
  got = losses.divergence(name, tb, sb, mask, temperature=300.0)
  assert got.dtype == jnp.float32
  want = losses.divergence(name, tb.astype(jnp.float32), sb.astype(jnp.float32), mask,
                           temperature=300.0)
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  grad = jax.grad(lambda x: losses.divergence(name, tb, x, mask, temperature=300.0))(sb)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_teacher_receives_no_gradient():
  t, s, mask = _inputs(6)
  for name in losses.DIVERGENCES:
    g = jax.grad(lambda x: losses.divergence(name, x, s, mask))(jnp.asarray(t))
    assert np.all(np.asarray(g) == 0.0), name


def test_hidden_losses_match_numpy():
  rng = np.random.default_rng(7)
  th = rng.normal(size=(B, T, 5)).astype(np.float32)
  sh = rng.normal(size=(B, T, 5)).astype(np.float32)
  sh[0, 1] = 0.0  # a zero vector: cosine 0, loss 1, finite gradient
  mask = np.array([[1, 1, 1], [0, 1, 1]])
  cos = np.sum(th * sh, -1) / np.maximum(np.linalg.norm(th, axis=-1) * np.linalg.norm(sh, axis=-1),
                                         1e-8)
  np.testing.assert_allclose(float(losses.hidden_cosine_loss(th, sh, mask)),
                             _np_mean(1 - cos, mask), rtol=1e-5)
  np.testing.assert_allclose(float(losses.hidden_mse_loss(th, sh, mask)),
                             _np_mean(np.mean((th - sh) ** 2, -1), mask), rtol=1e-5)
  g = jax.grad(lambda x: losses.hidden_cosine_loss(th, x, mask))(jnp.asarray(sh))
  assert np.all(np.isfinite(np.asarray(g)))
  # MSE gradient in closed form: 2 (s - t) / (D * real vectors).
  g = jax.grad(lambda x: losses.hidden_mse_loss(th, x, mask))(jnp.asarray(sh))
  np.testing.assert_allclose(np.asarray(g), 2 * (sh - th) * mask[..., None] / (5 * mask.sum()),
                             rtol=1e-5, atol=1e-7)


def test_bad_input_messages():
  t, s, mask = _inputs(8)
  with pytest.raises(ValueError, match="share the vocabulary"):
    losses.forward_kl(t, s[..., :5])
  with pytest.raises(ValueError, match="strictly between 0 and 1"):
    losses.generalized_jsd(t, s, beta=1.0)
  with pytest.raises(ValueError, match="temperature must be positive"):
    losses.forward_kl(t, s, temperature=0.0)
  with pytest.raises(ValueError, match="mask shape"):
    losses.forward_kl(t, s, mask[:, :2])
  with pytest.raises(ValueError, match="unknown divergence"):
    losses.divergence("kl", t, s)
