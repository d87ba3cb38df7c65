"""Plain XLA attention and the memory-efficient chunked path (Rabe & Staats 2021).

Both take [B, T, N, H] queries and [B, S, K, H] keys/values with N = K * G (grouped-query attention),
a `MaskSpec`, and return [B, T, N, H] outputs plus the [B, N, T] log-sum-exp of the scaled logits.
Fully masked rows return zeros (not NaN) and an LSE of MASK_VALUE.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from effjax.attention.mask import MASK_VALUE, MaskSpec


def _soft_cap(logits: jax.Array, softcap: Optional[float]) -> jax.Array:
  if softcap is None:
    return logits
  return softcap * jnp.tanh(logits / softcap)


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, t, n, h = q.shape
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)  # [B, T, K, G, H]


def xla_attention(q, k, v, spec: MaskSpec, *, scale: float, softcap: Optional[float] = None,
                  precision=None):
  """Materialises the full [B, K, G, T, S] logits. Fast for short sequences, O(T*S) memory."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  qg = _grouped(q, kh)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  logits = _soft_cap(logits, softcap)
  if spec.has_mask():
    mask = spec.dense(b, t, s)  # [B, T, S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  else:
    mask = None
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - m)
  if mask is not None:
    p = jnp.where(mask[:, None, None], p, 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  safe_l = jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum("bkgts,bskh->btkgh", (p / safe_l).astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  lse = jnp.where(l[..., 0] == 0.0, MASK_VALUE, m[..., 0] + jnp.log(safe_l[..., 0]))
  return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, n, t)


def chunked_attention(q, k, v, spec: MaskSpec, *, scale: float, softcap: Optional[float] = None,
                      kv_chunk: int = 512, precision=None):
  """Online softmax over kv chunks with `jax.checkpoint` per chunk.

  Peak memory is O(T * kv_chunk) per head instead of O(T * S): the backward pass recomputes each
  chunk's probabilities instead of storing them.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  num_chunks = -(-s // kv_chunk)
  pad = num_chunks * kv_chunk - s
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  # Keys past the real S are excluded by the mask through kv_lengths.
  if spec.kv_lengths is None:
    import dataclasses
    spec = dataclasses.replace(spec, kv_lengths=jnp.full((b,), s, jnp.int32))
  qg = _grouped(q, kh)
  k_chunks = k.reshape(b, num_chunks, kv_chunk, kh, h).swapaxes(0, 1)  # [C, B, c, K, H]
  v_chunks = v.reshape(b, num_chunks, kv_chunk, kh, h).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def step(carry, xs):
    m_prev, l_prev, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
    k_c, v_c, idx = xs
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k_c, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    logits = _soft_cap(logits, softcap)
    mask = spec.dense(b, t, s, kv_offset=idx * kv_chunk, kv_chunk=kv_chunk)  # [B, T, c]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
    p = jnp.where(mask[:, None, None], jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m_prev - m_new)
    l_new = l_prev * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkgts,bskh->bkgth", p.astype(v_c.dtype), v_c, precision=precision,
        preferred_element_type=jnp.float32)
    return (m_new, l_new, acc), None

  init = (jnp.full((b, kh, g, t), MASK_VALUE, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, h), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, (k_chunks, v_chunks, jnp.arange(num_chunks)))
  safe_l = jnp.where(l == 0.0, 1.0, l)
  out = (acc / safe_l[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  lse = jnp.where(l == 0.0, MASK_VALUE, m + jnp.log(safe_l)).reshape(b, n, t)
  return out.astype(q.dtype), lse
