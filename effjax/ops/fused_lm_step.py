"""A small LM's whole cached decode step as one C++ call on CPU (XLA FFI), built on first use.

XLA:CPU runs an LM decode step as ~60 separately dispatched ops of ~1 us each whatever their size.
For a speculative draft that is much of the step: lm/draft (0.4M parameters) took 51-78 us per
step on this machine (its speed drifts), where reading its 1.6 MB of weights from L2 takes ~34 us
on one core, and its gamma steps were a quarter of a batch-1 round. `cpu_kernels/fused_lm_step.cc`
does embedding, every block, the final norm and the logits in one call, split over two cores, and
writes the new keys and values into the KV cache in place (the cache buffers are aliased to the
results): 37 us (`benchmarks/fused_step.py`; RESULTS.md, "A fused draft step").

Numerics: the weight matmuls are the few-row kernel's tiles (bit for bit what the unfused cached
step computes); norms, RoPE, the softmax and SiLU agree with XLA's to float32 rounding (logits
within 1e-5, `tests/test_fused_lm_step.py`). That is why speculative decoding uses it for the draft
only (`effjax.speculative.decode`): the output's exactness rests on the target's numbers and on q
being what the draft sampled from, both unchanged.

Serves float32 LMs on CPU whose weights stay in the cores' caches (`applies`): for a model whose
weights stream from memory the stream dominates the step, and the few-row kernel's streaming order
and packed panels (which this kernel does not have) matter more than the ops' dispatch.
`EFFJAX_CPU_FUSED_STEP=0` turns it off; without a compiler it is off with a reason.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.models.lm import KVCache, LMConfig, rope_inv_freq
from effjax.ops import cpu_ffi, few_row_matmul

# One call serves up to this many new tokens per row: a draft step feeds 1 or 2 (a lagging row's
# catch-up); longer calls (prefill) go through the unfused model, whose matmuls suit many rows.
MAX_TOKENS_PER_ROW = 8
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels",
                       "fused_lm_step.cc")
_TARGET = "effjax_fused_lm_step"
# The few-row matmul's own flags: its tiles must compute here what they compute there.
_FLAGS = few_row_matmul._FLAGS


@functools.cache
def _load() -> Optional[str]:
  if cpu_ffi.disabled("EFFJAX_CPU_FUSED_STEP"):
    return "disabled by EFFJAX_CPU_FUSED_STEP=0"
  return cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxFusedLmStep", _TARGET, "CPU fused LM step kernel")


def unsupported_reason(config: LMConfig) -> Optional[str]:
  """Why the fused step cannot (or should not) serve `config`'s cached calls, or None."""
  if jax.default_backend() != "cpu":
    return "not a CPU backend"
  if (jnp.dtype(config.compute_dtype) != jnp.float32
      or jnp.dtype(config.weight_dtype) != jnp.float32):
    return f"dtype {config.dtype} / param_dtype {config.param_dtype} (the kernel is float32 only)"
  if config.head_dim % 2:
    return f"head_dim {config.head_dim} is odd (RoPE rotates halves)"
  if config.weights_stream():
    return ("its weights stream from memory every step, so dispatch overhead is a small part of "
            "the step (few_row_matmul.STREAMING_WEIGHT_BYTES)")
  return _load()


def applies(config: LMConfig, tokens_per_row: int) -> bool:
  """Whether a cached call of `tokens_per_row` new tokens per row goes to the fused step."""
  return tokens_per_row <= MAX_TOKENS_PER_ROW and unsupported_reason(config) is None


def _weights(params, config: LMConfig) -> list:
  """The kernel's weight operands, in its order (fused_lm_step.cc), as 2-D row-major views."""
  p = params["params"] if isinstance(params, Mapping) and "params" in params else params
  p = nn.unbox(p)
  d = config.d_model
  embed = p["embed"]
  head = embed if config.tie_embeddings else p["lm_head"]  # Ignored by the kernel when tied.
  out = [embed, p["final_norm"]["scale"], head]
  for i in range(config.num_layers):
    layer = p[f"layer_{i}"]
    attn, mlp = layer["attn"], layer["mlp"]
    out += [layer["attn_norm"]["scale"], attn["wq"].reshape(d, -1), attn["wk"].reshape(d, -1),
            attn["wv"].reshape(d, -1), attn["wo"].reshape(-1, d), layer["mlp_norm"]["scale"],
            mlp["gate"], mlp["up"], mlp["down"]]
  return out


def step(params, config: LMConfig, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """T new tokens per row at `cache.lengths` -> (logits [B, T, V] float32, the cache + T).

  The counterpart of `LM(config).apply(params, tokens, cache=cache)` for a cached call (default
  positions, causal). Call only when `applies(config, T)`.
  """
  reason = unsupported_reason(config)
  if reason is not None:
    raise ValueError(f"the fused LM step cannot serve this model: {reason}")
  b, t = tokens.shape
  embed, final_norm, head, *layers = _weights(params, config)
  inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
  operands = [tokens.astype(jnp.int32), cache.lengths.astype(jnp.int32), inv_freq, embed,
              final_norm, head, *layers, *cache.k, *cache.v]
  n_caches = 2 * config.num_layers
  first_cache = len(operands) - n_caches
  results = [jax.ShapeDtypeStruct((b, t, config.vocab_size), jnp.float32)] + [
      jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (*cache.k, *cache.v)]
  logits, *caches = jax.ffi.ffi_call(
      _TARGET, results, vmap_method="sequential",
      input_output_aliases={first_cache + i: 1 + i for i in range(n_caches)})(
          *operands, num_layers=config.num_layers, num_heads=config.num_heads,
          num_kv_heads=config.num_kv_heads, eps=np.float32(config.norm_eps),
          tied=bool(config.tie_embeddings))
  n = config.num_layers
  return logits, KVCache(k=tuple(caches[:n]), v=tuple(caches[n:]), lengths=cache.lengths + t)
