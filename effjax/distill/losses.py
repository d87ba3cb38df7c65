"""Distillation losses: divergences between teacher and student token distributions, and
hidden-state matching.

Every divergence takes logits `[..., V]` (any float dtype) and is computed in float32: softmax of
bfloat16 logits loses the small probabilities that decide KL, and bfloat16 `exp` overflows sooner.
Masked entries (`mask == 0`, padding) contribute nothing and do not count in the mean.

Zero-probability corners follow the limits (scipy's `rel_entr` convention): a term with p = 0
contributes 0 to KL(p || q), whatever q is; p > 0 with q = 0 gives +inf. Teacher logits of -inf
(a vocabulary entry the teacher cannot emit) are therefore safe, and so are their gradients: every
`where` that drops a term also guards the value the term is computed from, so no NaN reaches the
backward pass (the "double where" trick).

Which divergence (DistillSpec, Zhou et al. 2023; GKD, Agarwal et al. 2024):

* forward KL, KL(teacher || student): mode-covering; the classic Hinton loss, scaled by T^2 so the
  gradient magnitude does not shrink as the temperature T grows.
* reverse KL, KL(student || teacher): mode-seeking; suits on-policy data the student itself drew.
* generalised JSD(beta): interpolates (beta -> 0 behaves like forward KL / beta, beta -> 1 like
  reverse KL / (1 - beta), up to scale).
* total variation distance, 0.5 * sum |p - q|: speculative acceptance is exactly 1 - TVD, so
  minimising it maximises the draft's acceptance rate alpha.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _log_probs(logits: jax.Array, temperature: float) -> jax.Array:
  """float32 log-softmax of `logits / temperature` over the last axis."""
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}; use 1.0 for no softening")
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise p * (log p - log q), 0 where p == 0 (also for gradients), +inf where only q == 0."""
  p_pos = log_p > -jnp.inf
  safe_log_p = jnp.where(p_pos, log_p, 0.0)
  safe_log_q = jnp.where(p_pos, log_q, 0.0)
  q_zero = p_pos & (log_q == -jnp.inf)
  terms = jnp.exp(safe_log_p) * (safe_log_p - jnp.where(q_zero, 0.0, safe_log_q))
  terms = jnp.where(p_pos, terms, 0.0)
  return jnp.where(q_zero, jnp.inf, terms)


def masked_mean(values: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean of `values` [...] over entries where `mask` [...] is nonzero (0 when none is)."""
  values = values.astype(jnp.float32)
  if mask is None:
    return jnp.mean(values)
  if mask.shape != values.shape:
    raise ValueError(f"mask shape {mask.shape} does not match the per-token loss shape "
                     f"{values.shape}; pass one mask entry per token (logits without the vocab axis)")
  m = mask.astype(jnp.float32)
  # where, not multiply: an inf or NaN loss on a padded token must not leak into the mean.
  total = jnp.sum(jnp.where(m > 0, values, 0.0) * m)
  return total / jnp.maximum(jnp.sum(m), 1.0)


def _check_shapes(teacher_logits, student_logits):
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(
        f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} differ; "
        "teacher and student must share the vocabulary (map the teacher's logits with "
        "effjax.distill.student_init.map_teacher_logits if their tokenizers differ)")


def forward_kl(teacher_logits: jax.Array, student_logits: jax.Array,
               mask: Optional[jax.Array] = None, temperature: float = 1.0,
               scale_by_temperature: bool = True) -> jax.Array:
  """Masked mean over tokens of T^2 * KL(softmax(t / T) || softmax(s / T)).

  Args:
    teacher_logits: [..., V]; never differentiated (wrapped in `stop_gradient`).
    student_logits: [..., V].
    mask: [...] nonzero for tokens that count (None: all).
    temperature: softening T (Hinton et al. 2015).
    scale_by_temperature: multiply by T^2 so gradients keep their size across temperatures.

  Returns:
    Scalar float32 loss.
  """
  _check_shapes(teacher_logits, student_logits)
  log_p = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  log_q = _log_probs(student_logits, temperature)
  per_token = jnp.sum(_kl_terms(log_p, log_q), axis=-1)  # [...]
  scale = temperature ** 2 if scale_by_temperature else 1.0
  return scale * masked_mean(per_token, mask)


def reverse_kl(teacher_logits: jax.Array, student_logits: jax.Array,
               mask: Optional[jax.Array] = None, temperature: float = 1.0,
               scale_by_temperature: bool = True) -> jax.Array:
  """Masked mean over tokens of T^2 * KL(softmax(s / T) || softmax(t / T)). Args as `forward_kl`."""
  _check_shapes(teacher_logits, student_logits)
  log_p = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  log_q = _log_probs(student_logits, temperature)
  per_token = jnp.sum(_kl_terms(log_q, log_p), axis=-1)  # [...]
  scale = temperature ** 2 if scale_by_temperature else 1.0
  return scale * masked_mean(per_token, mask)


def generalized_jsd(teacher_logits: jax.Array, student_logits: jax.Array,
                    mask: Optional[jax.Array] = None, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
  """Masked mean of JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

  p is the teacher, q the student (GKD's convention). beta = 0.5 is the symmetric Jensen-Shannon
  divergence, bounded by log 2 whatever the supports, so it never returns inf.

  Args:
    teacher_logits: [..., V].
    student_logits: [..., V].
    mask: [...] (None: all tokens).
    beta: mixture weight in (0, 1).
    temperature: softening applied to both distributions.
  """
  _check_shapes(teacher_logits, student_logits)
  if not 0.0 < beta < 1.0:
    raise ValueError(f"beta={beta} must lie strictly between 0 and 1 (at the ends JSD is 0); use "
                     "forward_kl or reverse_kl for those limits")
  log_p = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  log_q = _log_probs(student_logits, temperature)
  # log m in log space (stable when either distribution underflows). Where both are zero, logaddexp
  # has a NaN gradient at (-inf, -inf): feed it zeros there and put -inf back afterwards.
  both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
  a = jnp.where(both_zero, 0.0, jnp.log(beta) + log_p)
  b = jnp.where(both_zero, 0.0, jnp.log1p(-beta) + log_q)
  log_m = jnp.where(both_zero, -jnp.inf, jnp.logaddexp(a, b))  # [..., V]
  per_token = (beta * jnp.sum(_kl_terms(log_p, log_m), axis=-1)
               + (1.0 - beta) * jnp.sum(_kl_terms(log_q, log_m), axis=-1))  # [...]
  return masked_mean(per_token, mask)


def total_variation(teacher_logits: jax.Array, student_logits: jax.Array,
                    mask: Optional[jax.Array] = None, temperature: float = 1.0) -> jax.Array:
  """Masked mean of 0.5 * sum_v |p_v - q_v| (= 1 - speculative acceptance alpha at T = 1)."""
  _check_shapes(teacher_logits, student_logits)
  p = jnp.exp(_log_probs(jax.lax.stop_gradient(teacher_logits), temperature))
  q = jnp.exp(_log_probs(student_logits, temperature))
  per_token = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)  # [...]
  return masked_mean(per_token, mask)


def divergence(name: str, teacher_logits: jax.Array, student_logits: jax.Array,
               mask: Optional[jax.Array] = None, temperature: float = 1.0,
               beta: float = 0.5) -> jax.Array:
  """Dispatches on `name` in `DIVERGENCES` (the string a config names)."""
  if name == "fkl":
    return forward_kl(teacher_logits, student_logits, mask, temperature)
  if name == "rkl":
    return reverse_kl(teacher_logits, student_logits, mask, temperature)
  if name == "jsd":
    return generalized_jsd(teacher_logits, student_logits, mask, beta, temperature)
  if name == "tvd":
    return total_variation(teacher_logits, student_logits, mask, temperature)
  raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def hidden_cosine_loss(teacher_hidden: jax.Array, student_hidden: jax.Array,
                       mask: Optional[jax.Array] = None, eps: float = 1e-8) -> jax.Array:
  """Masked mean of 1 - cos(teacher, student) over vectors [..., D] (DistilBERT's L_cos).

  A zero vector has cosine 0 with anything (loss 1) and a finite gradient, thanks to `eps`.
  """
  if teacher_hidden.shape != student_hidden.shape:
    raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden "
                     f"{student_hidden.shape} differ; project the student to the teacher width first")
  t = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
  s = student_hidden.astype(jnp.float32)
  dot = jnp.sum(t * s, axis=-1)  # [...]
  norms = jnp.sqrt(jnp.sum(t * t, axis=-1) * jnp.sum(s * s, axis=-1) + eps * eps)  # [...]
  return masked_mean(1.0 - dot / norms, mask)


def hidden_mse_loss(teacher_hidden: jax.Array, student_hidden: jax.Array,
                    mask: Optional[jax.Array] = None) -> jax.Array:
  """Masked mean over vectors of mean_d (teacher - student)^2, vectors [..., D]."""
  if teacher_hidden.shape != student_hidden.shape:
    raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden "
                     f"{student_hidden.shape} differ; project the student to the teacher width first")
  diff = (jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
          - student_hidden.astype(jnp.float32))
  return masked_mean(jnp.mean(diff * diff, axis=-1), mask)
