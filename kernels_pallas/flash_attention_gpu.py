"""FlashAttention-2 for GPUs in Pallas' Triton style, [batch, seq, heads, head_dim] layout.

Forward: one program per (query block, batch, query head) keeps its query tile in registers and runs
an online softmax over the key blocks its mask can see (`common.block_ranges`), writing the output
and the natural-log LSE. Backward (FlashAttention-2): `delta = rowsum(O * dO)` in XLA, then two
kernels with no atomics: a dq kernel over query blocks and a dkv kernel over key blocks. The dkv
program of kv head `kh` loops over the `G` query heads that share it, so grouped-query and
multi-query attention accumulate dk/dv on chip instead of materialising per-query-head gradients.

Masks: causal and local window by absolute positions, segment ids (packing, padding), per-row key
lengths, and sequence padding all reduce to `common.Meta`; logit soft-capping is applied before
masking, and its derivative in the backward. Lengths that are not block multiples (ViT's 197) are
padded in XLA and masked through segment ids (REFERENCES 3), head dims that are not powers of two are
zero-padded. Run with `interpret=True` on CPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import common
from kernels_pallas.block_sizes import BlockSizes, for_shapes, padded_lengths
from kernels_pallas.common import MaskConfig, Meta


def _dot(a, b, contract=(1, 0)):
  """a @ b in float32 with the given contracting dims; float32 inputs stay float32 (no TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=jnp.float32, precision=precision)


def _row(ref, sl=None):
  """Loads a [b] metadata slice as a [b, 1] column (None stays None)."""
  if ref is None:
    return None
  return (ref[...] if sl is None else ref[sl])[:, None]


def _col(ref, sl=None):
  if ref is None:
    return None
  return (ref[...] if sl is None else ref[sl])[None, :]


def _fwd_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kvpos_ref, kvseg_ref,
                o_ref, lse_ref, *, cfg: MaskConfig, block_k: int):
  i = pl.program_id(0)
  q = q_ref[...]  # [bq, H]
  bq, h = q.shape
  q_pos, q_seg = _row(qpos_ref), _row(qseg_ref)  # [bq, 1]

  def body(j, carry):
    m, l, acc = carry
    ks = pl.ds(j * block_k, block_k)
    s, _ = common.scaled_logits(_dot(q, k_ref[ks, :], (1, 1)), cfg)  # [bq, bk]
    mask = common.tile_mask(q_pos, _col(kvpos_ref, ks), q_seg, _col(kvseg_ref, ks), cfg)
    return common.online_softmax_step(s, mask, m, l, acc, v_ref[ks, :], _dot)

  init = (jnp.full((bq, 1), common.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, h), jnp.float32))
  m, l, acc = lax.fori_loop(kv_lo_ref[i], kv_hi_ref[i], body, init)
  out, lse = common.finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
               qseg_ref, kvpos_ref, kvseg_ref, dq_ref, *, cfg: MaskConfig, block_k: int):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]  # [bq, H]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]
  q_pos, q_seg = _row(qpos_ref), _row(qseg_ref)

  def body(j, dq):
    ks = pl.ds(j * block_k, block_k)
    k = k_ref[ks, :]  # [bk, H]
    s, tanh = common.scaled_logits(_dot(q, k, (1, 1)), cfg)
    mask = common.tile_mask(q_pos, _col(kvpos_ref, ks), q_seg, _col(kvseg_ref, ks), cfg)
    _, ds = common.softmax_grad(s, tanh, mask, lse, _dot(do, v_ref[ks, :], (1, 1)), delta, cfg)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(kv_lo_ref[i], kv_hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                qseg_ref, kvpos_ref, kvseg_ref, dk_ref, dv_ref, *, cfg: MaskConfig, block_q: int,
                groups: int):
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [bk, H]
  kv_pos, kv_seg = _col(kvpos_ref), _col(kvseg_ref)  # [1, bk]
  lo, hi = q_lo_ref[j], q_hi_ref[j]

  def group_body(g, carry):
    def body(i, carry):
      dk, dv = carry
      qs = pl.ds(i * block_q, block_q)
      q, do = q_ref[qs, g, :], do_ref[qs, g, :]  # [bq, H]
      lse, delta = lse_ref[g, qs][:, None], delta_ref[g, qs][:, None]  # [bq, 1]
      s, tanh = common.scaled_logits(_dot(q, k, (1, 1)), cfg)  # [bq, bk]
      mask = common.tile_mask(_row(qpos_ref, qs), kv_pos, _row(qseg_ref, qs), kv_seg, cfg)
      p, ds = common.softmax_grad(s, tanh, mask, lse, _dot(do, v, (1, 1)), delta, cfg)
      dv = dv + _dot(p.astype(do.dtype), do, (0, 0))  # p^T @ dO: [bk, H]
      dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))  # dS^T @ Q: [bk, H]
      return dk, dv
    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, group_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _meta_specs(meta: Meta, cfg: MaskConfig, q_block, kv_block):
  """Positions only when masking by position, segments only when masking by segment."""
  q_pos = meta.q_pos if cfg.use_positions else None
  kv_pos = meta.kv_pos if cfg.use_positions else None
  q_seg = meta.q_seg if cfg.use_segments else None
  kv_seg = meta.kv_seg if cfg.use_segments else None
  arrays = [q_pos, q_seg, kv_pos, kv_seg]
  specs = [q_block if q_pos is not None else None, q_block if q_seg is not None else None,
           kv_block if kv_pos is not None else None, kv_block if kv_seg is not None else None]
  return arrays, specs


def _compiler_params(sizes: BlockSizes, head_dim: int):
  warps = sizes.num_warps if sizes.num_warps is not None else (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=sizes.num_stages)


def _forward(q, k, v, meta: Meta, cfg: MaskConfig, sizes: BlockSizes, interpret, debug):
  b, tp, n, h = q.shape
  sp, kh = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = sizes.block_q, sizes.block_k
  nq = tp // bq
  kv_lo, kv_hi, _, _ = common.block_ranges(meta, bq, bk, cfg)  # [B, nq]
  meta_arrays, meta_specs = _meta_specs(
      meta, cfg, pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)))
  range_spec = pl.BlockSpec((None, nq), lambda i, bi, ni: (bi, 0))
  kv_spec = pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
  q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, block_k=bk),
      grid=(nq, b, n),
      in_specs=[range_spec, range_spec, q_spec, kv_spec, kv_spec, *meta_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=_compiler_params(sizes, h), interpret=interpret, debug=debug,
      name="effjax_flash_fwd",
  )(kv_lo, kv_hi, q, k, v, *meta_arrays)
  return out, lse


def _backward(q, k, v, meta: Meta, out, lse, do, dlse, cfg: MaskConfig, sizes: BlockSizes,
              interpret, debug):
  b, tp, n, h = q.shape
  sp, kh = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = sizes.block_q_bwd, sizes.block_k_bwd
  nq, nk = tp // bq, sp // bk
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - dlse  # The LSE's own cotangent enters as a shift of delta.  [B, N, Tp]
  kv_lo, kv_hi, q_lo, q_hi = common.block_ranges(meta, bq, bk, cfg)
  params = _compiler_params(sizes, h)

  # dq: one program per (query block, batch, query head), looping over key blocks.
  meta_arrays, meta_specs = _meta_specs(
      meta, cfg, pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)))
  q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
  kv_spec = pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
  range_spec = pl.BlockSpec((None, nq), lambda i, bi, ni: (bi, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, block_k=bk),
      grid=(nq, b, n),
      in_specs=[range_spec, range_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *meta_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, debug=debug, name="effjax_flash_dq",
  )(kv_lo, kv_hi, q, k, v, do, lse, delta, *meta_arrays)

  # dk, dv: one program per (key block, batch, kv head), looping over its G query heads.
  meta_arrays, meta_specs = _meta_specs(
      meta, cfg, pl.BlockSpec((None, tp), lambda j, bi, ki: (bi, 0)),
      pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)))
  qg_spec = pl.BlockSpec((None, tp, g, h), lambda j, bi, ki: (bi, 0, ki, 0))
  kv_spec = pl.BlockSpec((None, bk, None, h), lambda j, bi, ki: (bi, j, ki, 0))
  rows_spec = pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0))
  range_spec = pl.BlockSpec((None, nk), lambda j, bi, ki: (bi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, block_q=bq, groups=g),
      grid=(nk, b, kh),
      in_specs=[range_spec, range_spec, qg_spec, kv_spec, kv_spec, qg_spec, rows_spec, rows_spec,
                *meta_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, debug=debug, name="effjax_flash_dkv",
  )(q_lo, q_hi, q, k, v, do, lse, delta, *meta_arrays)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, meta, cfg, sizes, interpret, debug):
  return _forward(q, k, v, meta, cfg, sizes, interpret, debug)


def _flash_fwd(q, k, v, meta, cfg, sizes, interpret, debug):
  out, lse = _forward(q, k, v, meta, cfg, sizes, interpret, debug)
  return (out, lse), (q, k, v, meta, out, lse)


def _flash_bwd(cfg, sizes, interpret, debug, residuals, cotangents):
  q, k, v, meta, out, lse = residuals
  do, dlse = cotangents
  dq, dk, dv = _backward(q, k, v, meta, out, lse, do, dlse, cfg, sizes, interpret, debug)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "local_window", "softcap", "scale",
                                             "block_sizes", "interpret", "debug"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_positions: Optional[jax.Array] = None,
                    kv_positions: Optional[jax.Array] = None,
                    kv_lengths: Optional[jax.Array] = None,
                    q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None,
                    causal: bool = False, local_window: Optional[int] = None,
                    softcap: Optional[float] = None, scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None, interpret=False,
                    debug: bool = False):
  """Flash attention (Triton style), differentiable in q, k, v (and through the LSE).

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; N % K == 0 (GQA/MQA: query head n reads kv head n // (N // K)).
    v: [B, S, K, H] values.
    q_positions, kv_positions: [B, T] / [B, S] int32 absolute positions (None: 0..T-1 / 0..S-1).
    kv_lengths: [B] int32 valid keys per row (None: all S).
    q_segment_ids, kv_segment_ids: [B, T] / [B, S] int32, ids above -2**31 + 1 (None: no packing).
    causal: mask keys whose position exceeds the query's.
    local_window: keep keys with query_pos - key_pos < local_window.
    softcap: logits -> softcap * tanh(logits / softcap).
    scale: logit scale (default 1/sqrt(H)).
    block_sizes: tiles (default: `block_sizes.default_block_sizes("gpu", H)`).
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    debug: print the kernels' jaxprs.

  Returns:
    out [B, T, N, H] in q's dtype (zeros for rows that see no key) and lse [B, N, T] float32
    (natural log; MASK_VALUE for rows that see no key).
  """
  common.validate_inputs(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids,
                         kv_segment_ids, local_window, softcap)
  b, t, n, h = q.shape
  s = k.shape[1]
  sizes = for_shapes(block_sizes, "gpu", t, s, h)
  tp, sp = padded_lengths(sizes, t, s)
  cfg = MaskConfig(causal=causal, local_window=local_window, softcap=softcap,
                   scale=float(h ** -0.5 if scale is None else scale),
                   use_segments=(q_segment_ids is not None or kv_lengths is not None or sp != s))
  meta = common.build_meta(b, t, s, tp, sp, q_positions=q_positions, kv_positions=kv_positions,
                           kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids)
  hp = common.next_pow2(h)  # Triton tiles are powers of two; zero columns change no logit.
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
  out, lse = _flash(pad(q, tp), pad(k, sp), pad(v, sp), meta, cfg, sizes, interpret, debug)
  return out[:, :t, :, :h], lse[:, :, :t]
