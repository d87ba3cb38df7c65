"""Speculative verification: which drafted tokens the target accepts, and the token it adds.

Pure functions of probabilities, shared by the decoding loop (`decode.py`) and by the tests that check
the math on hand-made cases and Markov tables. Nothing here knows about models or caches.

One round (Leviathan et al. 2023; Chen et al. 2023): the draft proposed x_1..x_L (L = `draft_len`, per
row, at most G) from distributions q_1..q_L; one target pass gave p_1..p_{G+1}. Exact sampling accepts
x_i while u_i < p_i(x_i) / q_i(x_i); at the first rejection n < L it draws from norm(max(0, p_n - q_n)),
and when all L are accepted it draws the bonus token from p_{L+1}. Greedy accepts while x_i equals the
target's argmax and emits the target's argmax at the first mismatch. Either way a row emits n + 1 tokens.

Bugs other projects shipped, each guarded here: the residual is *normalised*, never softmaxed
(transformers PR #28508); a token with q(x) = 0 is rejected instead of dividing by zero; p and q must
both come from `effjax.generate.logits_to_probs` with the same `SamplingParams` (the caller's job, which
`decode.py` does).

Letters: B batch, G drafted positions (static), V vocabulary. Index i is 0-based below: position i holds
the i-th drafted token and p[:, i] is the target's distribution for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from effjax.generate.sampling import sample_from_probs


@struct.dataclass
class VerifyResult:
  """The outcome of one verification round.

  Attributes:
    num_accepted: [B] int32, n: how many drafted tokens were accepted (0..draft_len).
    tokens: [B, G + 1] int32, the emitted tokens: tokens[:, :n] are the accepted draft tokens,
      tokens[:, n] the target's correction (or bonus), later slots hold `fill`.
    accepted: [B, G] bool, position i was accepted (i < n).
    bonus: [B] bool, every drafted token was accepted and tokens[:, n] was drawn from p_{n+1}.
  """

  num_accepted: jax.Array
  tokens: jax.Array
  accepted: jax.Array
  bonus: jax.Array

  @property
  def num_emitted(self) -> jax.Array:
    """[B] int32: n + 1 tokens per row."""
    return self.num_accepted + 1


def _check_shapes(draft_tokens, target_probs, draft_len, draft_probs=None):
  b, g = draft_tokens.shape
  if target_probs.ndim != 3 or target_probs.shape[:2] != (b, g + 1):
    raise ValueError(f"target_probs has shape {target_probs.shape}; expected [B, G + 1, V] = "
                     f"[{b}, {g + 1}, V] for draft_tokens of shape {draft_tokens.shape} (the target "
                     "must score every drafted position plus one bonus position)")
  if draft_probs is not None and draft_probs.shape != (b, g, target_probs.shape[-1]):
    raise ValueError(f"draft_probs has shape {draft_probs.shape}; expected [B, G, V] = "
                     f"{(b, g, target_probs.shape[-1])} (draft and target must share a vocabulary)")
  if draft_len is not None and jnp.shape(draft_len) not in ((), (b,)):
    raise ValueError(f"draft_len has shape {jnp.shape(draft_len)}; expected [B] = ({b},) or a scalar")


def _default_len(draft_tokens, draft_len):
  b, g = draft_tokens.shape
  if draft_len is None:
    return jnp.full((b,), g, jnp.int32)
  return jnp.broadcast_to(jnp.asarray(draft_len, jnp.int32), (b,))


def first_failure(ok: jax.Array) -> jax.Array:
  """[B] int32 index of the first False in ok [B, G] (G when all are True), via a cumulative product."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _assemble(draft_tokens, n, last, fill):
  """Emitted tokens [B, G + 1]: accepted draft tokens, then `last` at slot n, then `fill`."""
  b, g = draft_tokens.shape
  idx = jnp.arange(g + 1, dtype=jnp.int32)[None, :]  # [1, G + 1]
  padded = jnp.concatenate([draft_tokens.astype(jnp.int32),
                            jnp.zeros((b, 1), jnp.int32)], axis=1)  # [B, G + 1]
  out = jnp.where(idx < n[:, None], padded, jnp.int32(fill))
  return jnp.where(idx == n[:, None], last[:, None].astype(jnp.int32), out)


def residual_distribution(p: jax.Array, q: jax.Array) -> jax.Array:
  """norm(max(0, p - q)) over the last axis: what to sample after rejecting a draft token.

  Normalised by its sum, not softmaxed (softmax of a probability difference is a different
  distribution; transformers shipped that bug). Where p == q exactly the residual is empty; rejection
  then has probability zero in exact arithmetic, so p itself is returned as the safe answer.

  Args:
    p: [..., V] target probabilities.
    q: [..., V] draft probabilities.

  Returns:
    [..., V] float32 probabilities.
  """
  r = jnp.maximum(p.astype(jnp.float32) - q.astype(jnp.float32), 0.0)  # [..., V]
  total = jnp.sum(r, axis=-1, keepdims=True)  # [..., 1]
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p.astype(jnp.float32))


def verify_greedy(draft_tokens: jax.Array, target_probs: jax.Array,
                  draft_len: jax.Array | None = None, *, fill: int = 0) -> VerifyResult:
  """Greedy verification: accept while the draft equals the target's argmax.

  Args:
    draft_tokens: [B, G] int drafted tokens.
    target_probs: [B, G + 1, V] target probabilities or logits (only the argmax is used; ties go to the
      lowest id, as in `effjax.generate.sampling`).
    draft_len: [B] int, how many of the G positions each row really drafted (default G). Positions at
      or past it are never accepted.
    fill: token id written after the emitted ones.

  Returns:
    A `VerifyResult`.
  """
  _check_shapes(draft_tokens, target_probs, draft_len)
  length = _default_len(draft_tokens, draft_len)
  g = draft_tokens.shape[1]
  choice = jnp.argmax(target_probs, axis=-1).astype(jnp.int32)  # [B, G + 1]
  valid = jnp.arange(g)[None, :] < length[:, None]  # [B, G]
  ok = (draft_tokens.astype(jnp.int32) == choice[:, :g]) & valid  # [B, G]
  n = first_failure(ok)  # [B]
  last = jnp.take_along_axis(choice, n[:, None], axis=1)[:, 0]  # [B]
  accepted = jnp.arange(g)[None, :] < n[:, None]
  return VerifyResult(num_accepted=n, tokens=_assemble(draft_tokens, n, last, fill),
                      accepted=accepted, bonus=n == length)


def verify_sampled(rng: jax.Array, draft_tokens: jax.Array, draft_probs: jax.Array,
                   target_probs: jax.Array, draft_len: jax.Array | None = None, *,
                   fill: int = 0) -> VerifyResult:
  """Exact speculative sampling: the emitted tokens are distributed as if sampled from p alone.

  This holds only if `draft_probs` is exactly the distribution each draft token was sampled from.

  Args:
    rng: PRNG key for this round (split here into acceptance and resampling keys).
    draft_tokens: [B, G] int drafted tokens, x_i ~ q_i.
    draft_probs: [B, G, V] the draft's distributions q_i.
    target_probs: [B, G + 1, V] the target's distributions p_i (same sampling params as q).
    draft_len: [B] int, drafted positions per row (default G); later positions are ignored.
    fill: token id written after the emitted ones.

  Returns:
    A `VerifyResult`.
  """
  _check_shapes(draft_tokens, target_probs, draft_len, draft_probs)
  length = _default_len(draft_tokens, draft_len)
  b, g = draft_tokens.shape
  x = draft_tokens.astype(jnp.int32)[..., None]  # [B, G, 1]
  p_x = jnp.take_along_axis(target_probs[:, :g], x, axis=-1)[..., 0]  # [B, G]
  q_x = jnp.take_along_axis(draft_probs, x, axis=-1)[..., 0]  # [B, G]
  key_u, key_r = jax.random.split(rng)
  u = jax.random.uniform(key_u, (b, g), jnp.float32)  # [B, G] in [0, 1)
  # u < p/q without the division; q(x) == 0 means the draft could not have produced x: reject.
  ok = (q_x > 0) & (u * q_x < p_x) & (jnp.arange(g)[None, :] < length[:, None])  # [B, G]
  n = first_failure(ok)  # [B]
  p_n = jnp.take_along_axis(target_probs, n[:, None, None], axis=1)[:, 0]  # [B, V]
  q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)  # [B, G+1, V]
  q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]  # [B, V]
  bonus = n >= length
  # After a full acceptance the next token comes from p itself (q = 0 makes the residual p).
  q_n = jnp.where(bonus[:, None], 0.0, q_n)
  last = sample_from_probs(key_r, residual_distribution(p_n, q_n))  # [B]
  accepted = jnp.arange(g)[None, :] < n[:, None]
  return VerifyResult(num_accepted=n, tokens=_assemble(draft_tokens, n, last, fill),
                      accepted=accepted, bonus=bonus)


def verify(rng: jax.Array, draft_tokens: jax.Array, draft_probs: jax.Array,
           target_probs: jax.Array, draft_len: jax.Array | None = None, *, greedy: bool,
           fill: int = 0) -> VerifyResult:
  """Greedy or exact-sampling verification (see `verify_greedy` and `verify_sampled`)."""
  if greedy:
    return verify_greedy(draft_tokens, target_probs, draft_len, fill=fill)
  return verify_sampled(rng, draft_tokens, draft_probs, target_probs, draft_len, fill=fill)


def acceptance_rate(draft_probs: jax.Array, target_probs: jax.Array) -> jax.Array:
  """alpha per position, sum_x min(p, q) = 1 - TV(p, q): [..., V] -> [...].

  The expected probability that a token drafted from q is accepted under p (for one-hot greedy
  distributions: 1 when the argmaxes agree, else 0).
  """
  return jnp.sum(jnp.minimum(draft_probs.astype(jnp.float32), target_probs.astype(jnp.float32)),
                 axis=-1)
