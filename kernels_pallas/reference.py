"""Pure-`jnp` attention with the kernels' exact mask semantics: the oracle beside the kernels.

It materialises the [B, K, G, T, S] logits, so it is for tests and short sequences only. It takes the
same arguments as `flash_attention_gpu.flash_attention` and returns the same (out, lse); its gradients
come from plain autodiff, which makes it the yardstick for the kernels' hand-written backward.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels_pallas import common


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        q_positions: Optional[jax.Array] = None,
                        kv_positions: Optional[jax.Array] = None,
                        kv_lengths: Optional[jax.Array] = None,
                        q_segment_ids: Optional[jax.Array] = None,
                        kv_segment_ids: Optional[jax.Array] = None,
                        causal: bool = False, local_window: Optional[int] = None,
                        softcap: Optional[float] = None, scale: Optional[float] = None,
                        precision=jax.lax.Precision.HIGHEST):
  """Dense attention.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys (N % K == 0: kv head of query head n is n // (N // K)).
    v: [B, S, K, H] values.
    q_positions, kv_positions: [B, T] / [B, S] int32 positions (None: 0..T-1 / 0..S-1).
    kv_lengths: [B] valid keys per row (None: all).
    q_segment_ids, kv_segment_ids: [B, T] / [B, S] int32 (None: one segment).
    causal: key position <= query position.
    local_window: query_pos - key_pos < local_window.
    softcap: logits -> softcap * tanh(logits / softcap).
    scale: logit scale (default 1/sqrt(H)).
    precision: matmul precision (HIGHEST keeps float32 exact on every backend).

  Returns:
    out [B, T, N, H] in q's dtype (zeros for fully masked rows) and lse [B, N, T] float32
    (MASK_VALUE for fully masked rows).
  """
  common.validate_inputs(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids,
                         kv_segment_ids, local_window, softcap)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = h ** -0.5 if scale is None else scale
  meta = common.build_meta(b, t, s, t, s, q_positions=q_positions, kv_positions=kv_positions,
                           kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids)
  cfg = common.MaskConfig(causal=causal, local_window=local_window, softcap=softcap, scale=scale,
                          use_segments=True)
  mask = common.tile_mask(meta.q_pos[:, :, None], meta.kv_pos[:, None, :],
                          meta.q_seg[:, :, None], meta.kv_seg[:, None, :], cfg)  # [B, T, S]
  qg = q.reshape(b, t, kh, g, h)  # [B, T, K, G, H]
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=precision,
                      preferred_element_type=jnp.float32)  # [B, K, G, T, S]
  logits, _ = common.scaled_logits(logits, cfg)
  mask = mask[:, None, None]  # [B, 1, 1, T, S]
  logits = jnp.where(mask, logits, common.MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(m)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  out = jnp.einsum("bkgts,bskh->btkgh", p / safe_l, v.astype(jnp.float32), precision=precision)
  lse = jnp.where(empty, common.MASK_VALUE, jax.lax.stop_gradient(m) + jnp.log(safe_l))
  return out.reshape(b, t, n, h).astype(q.dtype), lse[..., 0].reshape(b, n, t)
