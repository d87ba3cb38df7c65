"""Shared LM scaffolding for the CPU kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models import lm, registry


def prefill_rollback_step_logits(cfg, params, tokens):
  """Logits of a 4-token cached step after a 20-token prefill, with row 1 rolled back 5 tokens.

  tokens: [2, 24]. Exercises the kernels' cached paths: per-row lengths, a rollback, T > 1.
  """
  model = lm.LM(cfg)
  cache = lm.init_cache(cfg, 2, 48).with_lengths(jnp.zeros((2,), jnp.int32))
  prefill = model.apply(params, tokens[:, :20], cache=cache)
  cache = prefill.cache.with_lengths(jnp.asarray([20, 15]))  # Row 1 rolls back 5 tokens.
  return model.apply(params, tokens[:, 20:24], cache=cache).logits


def assert_kernel_decoding_matches_xla(config_field: str):
  """`prefill_rollback_step_logits` on lm/tiny with `config_field` ("attention_impl" or
  "matmul_impl") "auto" (the CPU kernel) equals "xla" within float32 rounding."""
  base = registry.get("lm/tiny", matmul_precision="highest")
  params = lm.init_params(base, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)
  decode = lambda impl: prefill_rollback_step_logits(base.replace(**{config_field: impl}), params,
                                                      tokens)
  np.testing.assert_allclose(decode("auto"), decode("xla"), atol=2e-5, rtol=0)
