"""Token sampling: greedy, temperature, top-k and top-p, as one exact distribution.

Speculative decoding and Medusa need the *distribution a token was drawn from*, not only the token
(REFERENCES 1: a draft q that differs from what was actually sampled silently biases the output). So
every sampler here is `logits -> distribution -> draw`, and `logits_to_probs` exposes the middle step:
temperature first, then top-k, then top-p (the order transformers and vLLM use).

Ties: greedy and top-k/top-p break ties towards the lowest token id, so the allowed set (and a
greedy one-hot) is deterministic and the same on every backend.

Letters: B batch (or any leading dims), V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to turn logits into a token. Frozen and hashable: pass it as a static jit argument.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
      raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 "
                       "(0 for greedy decoding)")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns top-k off)")
    if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; use 1.0 to turn top-p off")
    # Normalise numeric types so equal params hash equally (1 vs 1.0) and jit caches are shared.
    object.__setattr__(self, "temperature", float(self.temperature))
    object.__setattr__(self, "top_p", float(self.top_p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams()


def _descending_order(x: jax.Array) -> jax.Array:
  """Indices sorting x [..., V] descending, ties by lowest index (stable sort of -x)."""
  return jnp.argsort(-x, axis=-1, stable=True)


def _keep_mask(scaled: jax.Array, params: SamplingParams) -> jax.Array:
  """[..., V] bool: which tokens survive top-k and then top-p, given temperature-scaled logits."""
  v = scaled.shape[-1]
  keep = jnp.ones(scaled.shape, bool)
  if params.top_k == 0 and params.top_p >= 1.0:
    return keep
  order = _descending_order(scaled)  # [..., V]
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)  # [..., V]
  rank_keep = jnp.ones(scaled.shape, bool)  # in sorted order
  if params.top_k:
    rank_keep &= jnp.arange(v) < min(params.top_k, v)
  if params.top_p < 1.0:
    masked = jnp.where(rank_keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)  # [..., V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The top token always survives, so the set is never empty.
    rank_keep &= (mass_before < params.top_p) | (jnp.arange(v) == 0)
  # Scatter the sorted-order decision back to vocabulary order.
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(rank_keep, inverse, axis=-1)


def logits_to_logprobs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Log of the exact distribution `sample` draws from.

  Args:
    logits: [..., V] float.
    params: the sampling parameters.

  Returns:
    [..., V] float32 log-probabilities; excluded tokens are -inf. Greedy gives 0 at the argmax
    (lowest id among ties) and -inf elsewhere.
  """
  logits = logits.astype(jnp.float32)
  if params.greedy:
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool)
    return jnp.where(onehot, 0.0, -jnp.inf)
  scaled = logits / params.temperature
  scaled = jnp.where(_keep_mask(scaled, params), scaled, -jnp.inf)
  return jax.nn.log_softmax(scaled, axis=-1)


def logits_to_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The exact distribution [..., V] float32 a token is sampled from (see `logits_to_logprobs`)."""
  return jnp.exp(logits_to_logprobs(logits, params))


def sample(rng: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Draws one token per row.

  Args:
    rng: PRNG key (unused when greedy).
    logits: [B, V] (any leading dims work).
    params: the sampling parameters.

  Returns:
    [B] int32 token ids.
  """
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_to_logprobs(logits, params), axis=-1).astype(jnp.int32)


def sample_from_probs(rng: jax.Array, probs: jax.Array) -> jax.Array:
  """Draws from an explicit distribution [..., V] (e.g. a speculative residual); [...] int32.

  `probs` need not be normalised; zero entries are never drawn.
  """
  logp = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
  return jax.random.categorical(rng, logp, axis=-1).astype(jnp.int32)
