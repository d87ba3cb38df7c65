"""Shared LM scaffolding for the CPU kernel tests."""

import jax.numpy as jnp

from effjax.models import lm


def prefill_rollback_step_logits(cfg, params, tokens):
  """Logits of a 4-token cached step after a 20-token prefill, with row 1 rolled back 5 tokens.

  tokens: [2, 24]. Exercises the kernels' cached paths: per-row lengths, a rollback, T > 1.
  """
  model = lm.LM(cfg)
  cache = lm.init_cache(cfg, 2, 48).with_lengths(jnp.zeros((2,), jnp.int32))
  prefill = model.apply(params, tokens[:, :20], cache=cache)
  cache = prefill.cache.with_lengths(jnp.asarray([20, 15]))  # Row 1 rolls back 5 tokens.
  return model.apply(params, tokens[:, 20:24], cache=cache).logits
