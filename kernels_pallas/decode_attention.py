"""Decode attention: a few query tokens against a long KV cache, split-K ("flash decoding").

With T in 1..16 new tokens, one program per (batch, query head) would leave a GPU idle and redo the
cache read per head. Here one program per (batch, kv head, key split) reads its slice of the cache
once for all `G * T` query rows of that kv head (grouped-query heads and new tokens stacked into the
matmul's M dimension), runs an online softmax over its key blocks, and writes a partial
(max, sum, unnormalised output). XLA then merges the splits by their log-sum-exp. Splits and blocks
past a row's `kv_lengths`, past the last query position (causal) or before the window never run.

Mask: key slot j of row b is visible to a query at position p when j < kv_lengths[b],
j <= p if causal, p - j < local_window if set: the cache convention of `effjax.models.lm`, where
slot index == position. Packed segments and explicit key positions are the prefill kernels' job.

This path is for inference: its gradient is the reference's (`jax.vjp` of `attention_reference`).
Triton style (GPU); runs on CPU with `interpret=True`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import common
from kernels_pallas.block_sizes import DecodeBlockSizes
from kernels_pallas.common import MaskConfig
from kernels_pallas.reference import attention_reference

MAX_DECODE_QUERIES = 16


def _dot(a, b, contract=(1, 0)):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=jnp.float32, precision=precision)


def _kernel(lo_ref, hi_ref, len_ref, q_ref, k_ref, v_ref, pos_ref, acc_ref, m_ref, l_ref, *,
            cfg: MaskConfig, block_k: int, split_len: int):
  split = pl.program_id(2)
  q = q_ref[...]  # [M, H]
  rows, h = q.shape
  row_pos = None if pos_ref is None else pos_ref[...][:, None]  # [M, 1]
  length = len_ref[split]

  def body(j, carry):
    m, l, acc = carry
    ks = pl.ds(j * block_k, block_k)
    s, _ = common.scaled_logits(_dot(q, k_ref[ks, :], (1, 1)), cfg)  # [M, bk]
    slot = (split * split_len + j * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    mask = slot < length
    if cfg.causal:
      mask = jnp.logical_and(mask, slot <= row_pos)
    if cfg.local_window is not None:
      mask = jnp.logical_and(mask, (row_pos - slot) < cfg.local_window)
    return common.online_softmax_step(s, mask, m, l, acc, v_ref[ks, :], _dot)

  init = (jnp.full((rows, 1), common.MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, h), jnp.float32))
  m, l, acc = lax.fori_loop(lo_ref[split], hi_ref[split], body, init)
  acc_ref[...] = acc
  m_ref[...] = m[:, 0]
  l_ref[...] = l[:, 0]


def _num_splits(sizes: DecodeBlockSizes, batch: int, kv_heads: int, num_blocks: int) -> int:
  """Splits that divide the key blocks evenly, so the cache is never copied to pad it."""
  want = sizes.splits_for(batch, kv_heads, num_blocks * sizes.block_k)
  return max(d for d in range(1, want + 1) if num_blocks % d == 0)


def _kv_heads(k, batch: int, flat: bool) -> int:
  return k.shape[0] // batch if flat else k.shape[2]


def unflatten_kv(x, batch: int):
  """[B*K, S, H] heads-major cache -> [B, S, K, H]."""
  bk, s, h = x.shape
  return x.reshape(batch, bk // batch, s, h).transpose(0, 2, 1, 3)


def _forward(q, k, v, kv_lengths, q_positions, cfg: MaskConfig, sizes: DecodeBlockSizes,
             interpret, flat: bool):
  b, t, n, h = q.shape
  s, kh = k.shape[1], _kv_heads(k, b, flat)
  g = n // kh
  bk = min(sizes.block_k, max(16, common.next_pow2(s)))
  sp = common.round_up(s, bk)
  hp = common.next_pow2(h)
  if sp != s or hp != h:  # Only for caches that are not a block multiple: costs one copy.
    widths = ((0, 0), (0, sp - s), (0, hp - h)) if flat else ((0, 0), (0, sp - s), (0, 0),
                                                                (0, hp - h))
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
  nb = sp // bk
  ns = _num_splits(dataclasses.replace(sizes, block_k=bk), b, kh, nb)
  split_len = sp // ns
  rows = t * g
  mp = max(16, common.next_pow2(rows))  # Triton dots need >= 16 rows.
  qr = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)  # [B, K, T*G, H]
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, mp - rows), (0, hp - h)))  # [B, K, M, Hp]
  row_pos = jnp.pad(jnp.repeat(q_positions, g, axis=1), ((0, 0), (0, mp - rows)))  # [B, M]

  # Visible slots per row, then per split the half-open range of its blocks that can see any.
  end = kv_lengths
  if cfg.causal:
    end = jnp.minimum(end, jnp.max(q_positions, axis=1) + 1)
  start = jnp.zeros_like(end)
  if cfg.local_window is not None:
    start = jnp.maximum(0, jnp.min(q_positions, axis=1) - cfg.local_window + 1)
  base = (jnp.arange(ns, dtype=jnp.int32) * split_len)[None, :]  # [1, NS]
  per = split_len // bk
  lo = jnp.clip((start[:, None] - base) // bk, 0, per).astype(jnp.int32)  # [B, NS]
  hi = jnp.clip(-((base - end[:, None]) // bk), 0, per).astype(jnp.int32)
  hi = jnp.maximum(hi, lo)
  lengths = jnp.broadcast_to(kv_lengths[:, None], (b, ns)).astype(jnp.int32)

  split_spec = pl.BlockSpec((None, ns), lambda bi, ki, si: (bi, 0))
  if flat:  # Row bi * K + ki of the [B*K, S, H] cache: read in place, no transpose.
    kv_spec = pl.BlockSpec((None, split_len, hp), lambda bi, ki, si: (bi * kh + ki, si, 0))
  else:
    kv_spec = pl.BlockSpec((None, split_len, None, hp), lambda bi, ki, si: (bi, si, ki, 0))
  acc, m, l = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, block_k=bk, split_len=split_len),
      grid=(b, kh, ns),
      in_specs=[split_spec, split_spec, split_spec,
                pl.BlockSpec((None, None, mp, hp), lambda bi, ki, si: (bi, ki, 0, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, mp), lambda bi, ki, si: (bi, 0)) if cfg.use_positions
                else None],
      out_specs=[pl.BlockSpec((None, None, None, mp, hp), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((None, None, None, mp), lambda bi, ki, si: (bi, ki, si, 0)),
                 pl.BlockSpec((None, None, None, mp), lambda bi, ki, si: (bi, ki, si, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kh, ns, mp, hp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, ns, mp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, ns, mp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=2),
      interpret=interpret, name="effjax_flash_decode",
  )(lo, hi, lengths, qr, k, v, row_pos if cfg.use_positions else None)

  # Merge the splits: rescale each by exp(m_split - m) and renormalise.
  m_all = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, M]
  w = jnp.exp(m - m_all)  # [B, K, NS, M]
  l_all = jnp.sum(w * l, axis=2)  # [B, K, M]
  acc_all = jnp.einsum("bksm,bksmh->bkmh", w, acc)
  out, lse = common.finalize(m_all[:, :, 0, :, None], l_all[..., None], acc_all)
  out = out[:, :, :rows, :h].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
  lse = lse[:, :, :rows, 0].reshape(b, kh, t, g).transpose(0, 1, 3, 2).reshape(b, n, t)
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _decode(q, k, v, kv_lengths, q_positions, cfg, sizes, interpret, flat):
  return _forward(q, k, v, kv_lengths, q_positions, cfg, sizes, interpret, flat)


def _decode_fwd(q, k, v, kv_lengths, q_positions, cfg, sizes, interpret, flat):
  return (_forward(q, k, v, kv_lengths, q_positions, cfg, sizes, interpret, flat),
          (q, k, v, kv_lengths, q_positions))


def _decode_bwd(cfg, sizes, interpret, flat, residuals, cotangents):
  q, k, v, kv_lengths, q_positions = residuals
  as_bskh = (lambda x: unflatten_kv(x, q.shape[0])) if flat else (lambda x: x)
  ref = lambda q_, k_, v_: attention_reference(
      q_, as_bskh(k_), as_bskh(v_), q_positions=q_positions, kv_lengths=kv_lengths,
      causal=cfg.causal, local_window=cfg.local_window, softcap=cfg.softcap, scale=cfg.scale)
  _, vjp = jax.vjp(ref, q, k, v)
  return (*vjp(cotangents), None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "local_window", "softcap", "scale",
                                             "block_sizes", "interpret", "kv_layout"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     kv_lengths: Optional[jax.Array] = None,
                     q_positions: Optional[jax.Array] = None, causal: bool = False,
                     local_window: Optional[int] = None, softcap: Optional[float] = None,
                     scale: Optional[float] = None,
                     block_sizes: Optional[DecodeBlockSizes] = None, interpret=False,
                     kv_layout: str = "bskh"):
  """Attention of T <= 16 new queries per row over a KV cache.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] cache keys (slot index == position); [B*K, S, H] with kv_layout="flat".
    v: values, laid out as k.
    kv_lengths: [B] valid slots per row (None: all S).
    q_positions: [B, T] positions of the queries (None: 0..T-1, the `MaskSpec` default).
    causal, local_window, softcap, scale: as in `flash_attention_gpu.flash_attention`.
    block_sizes: `DecodeBlockSizes` (default: 128-key blocks, splits to fill the GPU).
    interpret: run in the Pallas interpreter (CPU).
    kv_layout: "bskh", or "flat" for `effjax.models.lm.KVCache`'s heads-major [B*K, S, H]
      buffers, which the kernel then reads in place (transposing them to [B, S, K, H] first would
      copy the whole cache every step, more memory traffic than the attention itself).

  Returns:
    out [B, T, N, H] and lse [B, N, T] float32, as the prefill kernels.
  """
  if kv_layout not in ("bskh", "flat"):
    raise ValueError(f"unknown kv_layout {kv_layout!r}; use 'bskh' or 'flat'")
  flat = kv_layout == "flat"
  if flat:
    if k.ndim != 3 or k.shape != v.shape or k.shape[0] % q.shape[0]:
      raise ValueError(f"kv_layout='flat' expects [batch * kv_heads, S, head_dim] keys and values; "
                       f"got k{k.shape}, v{v.shape} for q{q.shape}")
    as_bskh = jax.ShapeDtypeStruct((q.shape[0], k.shape[1], k.shape[0] // q.shape[0], k.shape[2]),
                                   k.dtype)
    common.validate_inputs(q, as_bskh, as_bskh, q_positions, None, kv_lengths, None, None,
                           local_window, softcap)
  else:
    common.validate_inputs(q, k, v, q_positions, None, kv_lengths, None, None, local_window,
                           softcap)
  b, t, n, h = q.shape
  if t > MAX_DECODE_QUERIES:
    raise ValueError(f"decode_attention takes at most {MAX_DECODE_QUERIES} new tokens per row, got "
                     f"{t}; use flash_attention for prefill")
  s = k.shape[1]
  kv_lengths = (jnp.full((b,), s, jnp.int32) if kv_lengths is None
                else jnp.minimum(kv_lengths.astype(jnp.int32), s))
  q_positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_positions is None
                 else q_positions.astype(jnp.int32))
  cfg = MaskConfig(causal=causal, local_window=local_window, softcap=softcap,
                   scale=float(h ** -0.5 if scale is None else scale), use_segments=True)
  sizes = DecodeBlockSizes() if block_sizes is None else block_sizes
  return _decode(q, k, v, kv_lengths, q_positions, cfg, sizes, interpret, flat)
