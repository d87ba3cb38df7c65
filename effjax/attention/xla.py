"""Plain XLA attention and the memory-efficient chunked path (Rabe & Staats 2021).

Both take [B, T, N, H] queries and [B, S, K, H] keys/values with N = K * G (grouped-query attention),
a `MaskSpec`, and return [B, T, N, H] outputs plus the [B, N, T] log-sum-exp of the scaled logits.
`flat_kv_attention` is the XLA path for the KV cache's heads-major [B*K, S, H] layout.
Fully masked rows return zeros (not NaN) and an LSE of MASK_VALUE.
"""

from __future__ import annotations

import dataclasses
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


def _masked_softmax(logits: jax.Array, mask: Optional[jax.Array]):
  """Softmax over the last axis of [B, K, G, T, S] logits under a [B, T, S] mask (or None).

  Returns probabilities (zeros in fully masked rows, never NaN) and the [B, K, G, T] LSE
  (MASK_VALUE in fully masked rows).
  """
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - m)
  if mask is not None:
    p = jnp.where(mask[:, None, None], p, 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  safe_l = jnp.where(l == 0.0, 1.0, l)
  lse = jnp.where(l[..., 0] == 0.0, MASK_VALUE, m[..., 0] + jnp.log(safe_l[..., 0]))
  return p / safe_l, lse


def xla_attention(q, k, v, spec: MaskSpec, *, scale: float, softcap: Optional[float] = None,
                  precision=None):
  """Materialises the full [B, K, G, T, S] logits. Fast for short sequences, O(T*S) memory."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  qg = _grouped(q, kh)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  logits = _soft_cap(logits, softcap)
  probs, lse = _masked_softmax(logits, spec.dense(b, t, s) if spec.has_mask() else None)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, n, t)


def flat_kv_attention(q, k, v, spec: MaskSpec, *, scale: float, softcap: Optional[float] = None,
                      precision=None):
  """`xla_attention` for keys/values stored heads-major and flattened: [B*K, S, H].

  This is the layout of the LM's KV cache (`effjax.models.lm.KVCache`). Each (row, kv head) block
  is one contiguous [S, H] matrix, so both attention matmuls are plain batched matmuls over B*K
  with the G*T queries of a kv head as rows. With [B, S, K, H] operands XLA:CPU copied (transposed)
  every layer's cache on every decode step, a sixth of a decode step's time (RESULTS.md).
  """
  b, t, n, h = q.shape
  bk, s = k.shape[0], k.shape[1]
  kh = bk // b
  g = n // kh
  q_rows = _grouped(q, kh).transpose(0, 2, 3, 1, 4).reshape(bk, g * t, h)  # [B*K, G*T, H]
  logits = jax.lax.dot_general(q_rows, k, (((2,), (2,)), ((0,), (0,))), precision=precision,
                               preferred_element_type=jnp.float32) * scale  # [B*K, G*T, S]
  logits = _soft_cap(logits.reshape(b, kh, g, t, s), softcap)
  probs, lse = _masked_softmax(logits, spec.dense(b, t, s) if spec.has_mask() else None)
  out = jax.lax.dot_general(probs.astype(v.dtype).reshape(bk, g * t, s), v,
                            (((2,), (1,)), ((0,), (0,))), precision=precision,
                            preferred_element_type=jnp.float32)  # [B*K, G*T, H]
  out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
  return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, n, t)


def unflatten_kv(x: jax.Array, batch: int) -> jax.Array:
  """[B*K, S, H] heads-major keys or values -> [B, S, K, H]."""
  bk, s, h = x.shape
  return x.reshape(batch, bk // batch, s, h).transpose(0, 2, 1, 3)


def chunked_attention(q, k, v, spec: MaskSpec, *, scale: float, softcap: Optional[float] = None,
                      kv_chunk: int = 512, precision=None, q_chunk: int = 1024):
  """Memory-efficient attention in plain XLA: online softmax over [q_chunk, kv_chunk] tiles.

  The FlashAttention algorithm without kernels (Rabe & Staats 2021, REFERENCES 3): a scan over
  query chunks, an inner scan over key chunks carrying the online-softmax state, and a `custom_vjp`
  whose backward recomputes each tile's probabilities from the saved log-sum-exp (one fused pass
  over key chunks accumulating dk/dv per chunk and dq in place). Nothing of size T * S is stored,
  forward or backward: temporaries are O(q_chunk * kv_chunk) per head plus O(T) for q, k, v, the
  output, dq and the LSE. Tiles the mask hides entirely (causal upper triangle, other segments,
  keys past a row's length) are skipped with `lax.cond`.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  cq, ck = min(q_chunk, t), min(kv_chunk, s)
  tp, sp = -(-t // cq) * cq, -(-s // ck) * ck
  if spec.kv_lengths is None:  # Keys past the real S are padding: mask them through kv_lengths.
    spec = dataclasses.replace(spec, kv_lengths=jnp.full((b,), s, jnp.int32))
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  cfg = _ChunkConfig(scale=float(scale), softcap=softcap, q_chunk=cq, kv_chunk=ck,
                     precision=precision, q_len=t, kv_len=s)
  out, lse = _chunked(pad(q, tp), pad(k, sp), pad(v, sp), spec, cfg)
  return out[:, :t].astype(q.dtype), lse[:, :, :t]


@dataclasses.dataclass(frozen=True)
class _ChunkConfig:
  scale: float
  softcap: Optional[float]
  q_chunk: int
  kv_chunk: int
  precision: object
  q_len: int
  kv_len: int


def _tile(cfg: _ChunkConfig, spec: MaskSpec, q_c, k_c, qi, kj):
  """Capped logits [B, K, G, cq, ck], the soft-cap tanh (or None) and the mask [B, 1, 1, cq, ck]."""
  b = q_c.shape[0]
  logits = jnp.einsum("btkgh,bskh->bkgts", q_c, k_c, precision=cfg.precision,
                      preferred_element_type=jnp.float32) * cfg.scale
  tanh = None
  if cfg.softcap is not None:
    tanh = jnp.tanh(logits / cfg.softcap)
    logits = cfg.softcap * tanh
  mask = spec.dense(b, cfg.q_len, cfg.kv_len, kv_offset=kj * cfg.kv_chunk, kv_chunk=cfg.kv_chunk,
                    q_offset=qi * cfg.q_chunk, q_chunk=cfg.q_chunk)  # [B, cq, ck]
  return logits, tanh, mask[:, None, None]


def _split(x, chunk, axis=1):
  """[B, L, ...] -> [L // chunk, B, chunk, ...] for scanning over chunks."""
  shape = x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _chunked_forward(q, k, v, spec: MaskSpec, cfg: _ChunkConfig):
  b, tp, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  k_chunks, v_chunks = _split(k, cfg.kv_chunk), _split(v, cfg.kv_chunk)  # [nk, B, ck, K, H]
  nk = k_chunks.shape[0]

  def q_block(args):
    qi, q_c = args  # q_c: [B, cq, K, G, H]

    def kv_step(carry, xs):
      k_c, v_c, kj = xs
      logits, _, mask = _tile(cfg, spec, q_c, k_c, qi, kj)

      def update(carry):
        m_prev, l_prev, acc = carry  # [B, K, G, cq], [B, K, G, cq], [B, K, G, cq, H]
        masked = jnp.where(mask, logits, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(masked, axis=-1))
        p = jnp.where(mask, jnp.exp(masked - m_new[..., None]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        acc = acc * corr[..., None] + jnp.einsum(
            "bkgts,bskh->bkgth", p.astype(v_c.dtype), v_c, precision=cfg.precision,
            preferred_element_type=jnp.float32)
        return m_new, l_prev * corr + jnp.sum(p, axis=-1), acc

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    cq = q_c.shape[1]
    init = (jnp.full((b, kh, g, cq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kh, g, cq), jnp.float32), jnp.zeros((b, kh, g, cq, h), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (k_chunks, v_chunks, jnp.arange(nk)))
    safe_l = jnp.where(l == 0.0, 1.0, l)
    out = (acc / safe_l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, cq, K, G, H]
    return out.astype(q.dtype), jnp.where(l == 0.0, MASK_VALUE, m + jnp.log(safe_l))

  q_chunks = _split(_grouped(q, kh), cfg.q_chunk)  # [nq, B, cq, K, G, H]
  outs, lses = jax.lax.map(q_block, (jnp.arange(q_chunks.shape[0]), q_chunks))
  out = jnp.moveaxis(outs, 0, 1).reshape(b, tp, n, h)
  lse = jnp.moveaxis(lses, 0, 3).reshape(b, n, tp)  # [nq, B, K, G, cq] -> [B, N, Tp]
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(q, k, v, spec, cfg):
  return _chunked_forward(q, k, v, spec, cfg)


def _chunked_fwd(q, k, v, spec, cfg):
  out, lse = _chunked_forward(q, k, v, spec, cfg)
  return (out, lse), (q, k, v, spec, out, lse)


def _chunked_bwd(cfg: _ChunkConfig, residuals, cotangents):
  q, k, v, spec, out, lse = residuals
  do, dlse = cotangents
  b, tp, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  cq = cfg.q_chunk
  # delta = rowsum(dO * O); the LSE's own cotangent enters as a shift of delta.
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  as_rows = lambda x: jnp.moveaxis(x.reshape(b, kh, g, tp // cq, cq), 3, 0)  # [nq, B, K, G, cq]
  q_chunks = _split(_grouped(q, kh), cq)  # [nq, B, cq, K, G, H]
  do_chunks = _split(_grouped(do, kh), cq)
  lse_chunks, delta_chunks = as_rows(lse), as_rows(delta)
  nq = q_chunks.shape[0]

  def kv_block(dq, xs):
    k_c, v_c, kj = xs  # [B, ck, K, H]

    def q_step(carry, ys):
      q_c, do_c, lse_c, delta_c, qi = ys
      logits, tanh, mask = _tile(cfg, spec, q_c, k_c, qi, kj)

      def update(carry):
        dk, dv, dq = carry
        p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, MASK_VALUE) - lse_c[..., None]), 0.0)
        dv = dv + jnp.einsum("bkgts,btkgh->bskh", p.astype(do_c.dtype), do_c,
                             precision=cfg.precision, preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgh,bskh->bkgts", do_c, v_c, precision=cfg.precision,
                        preferred_element_type=jnp.float32)
        ds = p * (dp - delta_c[..., None])
        if tanh is not None:
          ds = ds * (1.0 - tanh * tanh)
        ds = ds * cfg.scale  # [B, K, G, cq, ck]
        dk = dk + jnp.einsum("bkgts,btkgh->bskh", ds.astype(q_c.dtype), q_c,
                             precision=cfg.precision, preferred_element_type=jnp.float32)
        dq_c = jnp.einsum("bkgts,bskh->btkgh", ds.astype(k_c.dtype), k_c,
                          precision=cfg.precision, preferred_element_type=jnp.float32)
        return dk, dv, dq.at[qi].add(dq_c)

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    zeros = jnp.zeros(k_c.shape, jnp.float32)
    (dk, dv, dq), _ = jax.lax.scan(q_step, (zeros, zeros, dq),
                                   (q_chunks, do_chunks, lse_chunks, delta_chunks,
                                    jnp.arange(nq)))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros(q_chunks.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (_split(k, cfg.kv_chunk), _split(v, cfg.kv_chunk),
                                              jnp.arange(k.shape[1] // cfg.kv_chunk)))
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, n, h).astype(q.dtype)
  unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
  return dq, unsplit(dk), unsplit(dv), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
