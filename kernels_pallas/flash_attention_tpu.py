"""FlashAttention-2 for TPUs in Pallas' Mosaic style.

Same mask semantics, arguments and results as `flash_attention_gpu` (see `common`), but laid out
the way Mosaic wants it: heads before sequence ([B, N, T, H], transposed in XLA), a grid whose last
("arbitrary") axis walks key blocks while the online-softmax state lives in VMEM scratch, and
per-block skip ranges as scalar-prefetch operands in SMEM. A skipped grid step keeps the previous
block index in its index map, so the pipeline issues no DMA for it, and `pl.when` skips its compute.

Backward (FlashAttention-2, no atomics): `delta = rowsum(O * dO)` in XLA; a dq kernel with grid
(B, N, q blocks, k blocks) accumulating dq in scratch; a dkv kernel with grid
(B, K, k blocks, G, q blocks) whose two trailing "arbitrary" axes walk the G query heads of a kv
head and their query blocks, so GQA/MQA sum dk/dv on chip.

Row statistics (m, l, LSE, delta) are kept 128 lanes wide and metadata as [B, T, 128] / [B, 8, S]
(the layouts of jax's reference TPU kernel) so every block is (8, 128)-tileable. On CPU run with
`interpret=True`, or `interpret=pltpu.InterpretParams(...)` to simulate TPU memory (and detect races).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.block_sizes import BlockSizes, for_shapes, padded_lengths
from kernels_pallas.common import MaskConfig, Meta

LANES = 128
SUBLANES = 8
_VMEM_LIMIT = 32 * 1024 * 1024


def _dot(a, b, trans_b=False):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _lanes(x):
  """[b, 1] -> [b, 128]: row statistics are stored lane-replicated."""
  return jnp.broadcast_to(x, (x.shape[0], LANES))


def _tile_mask(qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg):
  col = lambda r: None if r is None else r[0:1, :]  # [1, bk]
  row = lambda r: None if r is None else r[:, 0:1]  # [bq, 1]
  return common.tile_mask(row(qpos_ref), col(kvpos_ref), row(qseg_ref), col(kvseg_ref), cfg)


def _fwd_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kvpos_ref,
                kvseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: MaskConfig, nq: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= kv_lo_ref[row]) & (j < kv_hi_ref[row]))
  def _step():
    s, _ = common.scaled_logits(_dot(q_ref[...], k_ref[...], trans_b=True), cfg)  # [bq, bk]
    mask = _tile_mask(qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg)
    m, l, acc = common.online_softmax_step(s, mask, m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...],
                                           v_ref[...], _dot)
    m_scr[...] = _lanes(m)
    l_scr[...] = _lanes(l)
    acc_scr[...] = acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    out, lse = common.finalize(m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = _lanes(lse)


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
               qseg_ref, kvpos_ref, kvseg_ref, dq_ref, dq_scr, *, cfg: MaskConfig, nq: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= kv_lo_ref[row]) & (j < kv_hi_ref[row]))
  def _step():
    k = k_ref[...]  # [bk, H]
    s, tanh = common.scaled_logits(_dot(q_ref[...], k, trans_b=True), cfg)
    mask = _tile_mask(qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg)
    _, ds = common.softmax_grad(s, tanh, mask, lse_ref[:, 0:1],
                                _dot(do_ref[...], v_ref[...], trans_b=True), delta_ref[:, 0:1],
                                cfg)
    dq_scr[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                qseg_ref, kvpos_ref, kvseg_ref, dk_ref, dv_ref, dk_scr, dv_scr, *,
                cfg: MaskConfig, nk: int):
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  col = b * nk + j

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= q_lo_ref[col]) & (i < q_hi_ref[col]))
  def _step():
    q, do = q_ref[...], do_ref[...]  # [bq, H]
    s, tanh = common.scaled_logits(_dot(q, k_ref[...], trans_b=True), cfg)  # [bq, bk]
    mask = _tile_mask(qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg)
    p, ds = common.softmax_grad(s, tanh, mask, lse_ref[:, 0:1],
                                _dot(do, v_ref[...], trans_b=True), delta_ref[:, 0:1], cfg)
    dv_scr[...] += _dot(p.astype(do.dtype).T, do)  # [bk, H]
    dk_scr[...] += _dot(ds.astype(q.dtype).T, q)  # [bk, H]

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _store():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _clamp(idx, lo, hi):
  """Block index to fetch at grid step `idx`: out-of-range steps repeat a fetched block (no DMA)."""
  return jnp.minimum(jnp.maximum(idx, lo), jnp.maximum(hi - 1, lo))


def _wide_meta(meta: Meta, cfg: MaskConfig):
  """[B, Tp, 128] query and [B, 8, Sp] key metadata (None where the mask does not need it)."""
  wide_q = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))
  wide_kv = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))
  pos, seg = cfg.use_positions, cfg.use_segments
  return (wide_q(meta.q_pos) if pos else None, wide_q(meta.q_seg) if seg else None,
          wide_kv(meta.kv_pos) if pos else None, wide_kv(meta.kv_seg) if seg else None)


def _meta_specs(wide, q_map, kv_map, bq, bk):
  q_spec = pl.BlockSpec((None, bq, LANES), q_map)
  kv_spec = pl.BlockSpec((None, SUBLANES, bk), kv_map)
  return [None if x is None else spec for x, spec in zip(wide, (q_spec, q_spec, kv_spec, kv_spec))]


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary,
      vmem_limit_bytes=_VMEM_LIMIT)


def _forward(q, k, v, meta: Meta, cfg: MaskConfig, sizes: BlockSizes, interpret, debug):
  b, n, tp, h = q.shape
  kh, sp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = sizes.block_q, sizes.block_k
  nq, nk = tp // bq, sp // bk
  kv_lo, kv_hi, _, _ = common.block_ranges(meta, bq, bk, cfg)
  wide = _wide_meta(meta, cfg)

  def kv_block(bi, i, j, lo, hi):
    return _clamp(j, lo[bi * nq + i], hi[bi * nq + i])

  q_map = lambda bi, ni, i, j, lo, hi: (bi, ni, i, 0)
  kv_map = lambda bi, ni, i, j, lo, hi: (bi, lax.div(ni, g), kv_block(bi, i, j, lo, hi), 0)
  q_spec = pl.BlockSpec((None, None, bq, h), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  meta_specs = _meta_specs(wide, lambda bi, ni, i, j, lo, hi: (bi, i, 0),
                           lambda bi, ni, i, j, lo, hi: (bi, 0, kv_block(bi, i, j, lo, hi)), bq, bk)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, n, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, *meta_specs],
          out_specs=[q_spec, pl.BlockSpec((None, None, bq, LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp, LANES), jnp.float32)],
      compiler_params=_params(3, 1), interpret=interpret, debug=debug,
      name="effjax_flash_fwd_tpu",
  )(kv_lo.reshape(-1), kv_hi.reshape(-1), q, k, v, *wide)
  return out, lse


def _backward(q, k, v, meta: Meta, out, lse, do, dlse, cfg: MaskConfig, sizes: BlockSizes,
              interpret, debug):
  b, n, tp, h = q.shape
  kh, sp = k.shape[1], k.shape[2]
  g = n // kh
  bq, bk = sizes.block_q_bwd, sizes.block_k_bwd
  nq, nk = tp // bq, sp // bk
  delta = jnp.einsum("bnth,bnth->bnt", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  delta = jnp.broadcast_to(delta[..., None], (b, n, tp, LANES))
  kv_lo, kv_hi, q_lo, q_hi = common.block_ranges(meta, bq, bk, cfg)
  wide = _wide_meta(meta, cfg)

  # dq: grid (B, N, q blocks, k blocks).
  def kv_block(bi, i, j, lo, hi):
    return _clamp(j, lo[bi * nq + i], hi[bi * nq + i])

  q_map = lambda bi, ni, i, j, lo, hi: (bi, ni, i, 0)
  kv_map = lambda bi, ni, i, j, lo, hi: (bi, lax.div(ni, g), kv_block(bi, i, j, lo, hi), 0)
  q_spec = pl.BlockSpec((None, None, bq, h), q_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  meta_specs = _meta_specs(wide, lambda bi, ni, i, j, lo, hi: (bi, i, 0),
                           lambda bi, ni, i, j, lo, hi: (bi, 0, kv_block(bi, i, j, lo, hi)), bq, bk)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, n, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *meta_specs],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(3, 1), interpret=interpret, debug=debug,
      name="effjax_flash_dq_tpu",
  )(kv_lo.reshape(-1), kv_hi.reshape(-1), q, k, v, do, lse, delta, *wide)

  # dk, dv: grid (B, K, k blocks, G, q blocks).
  def q_block(bi, j, i, lo, hi):
    return _clamp(i, lo[bi * nk + j], hi[bi * nk + j])

  qh_map = lambda bi, ki, j, gi, i, lo, hi: (bi, ki * g + gi, q_block(bi, j, i, lo, hi), 0)
  kv_map = lambda bi, ki, j, gi, i, lo, hi: (bi, ki, j, 0)
  q_spec = pl.BlockSpec((None, None, bq, h), qh_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), qh_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  meta_specs = _meta_specs(wide, lambda bi, ki, j, gi, i, lo, hi: (bi, q_block(bi, j, i, lo, hi), 0),
                           lambda bi, ki, j, gi, i, lo, hi: (bi, 0, j), bq, bk)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, kh, nk, g, nq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *meta_specs],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(3, 2), interpret=interpret, debug=debug,
      name="effjax_flash_dkv_tpu",
  )(q_lo.reshape(-1), q_hi.reshape(-1), q, k, v, do, lse, delta, *wide)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, meta, cfg, sizes, interpret, debug):
  out, lse = _forward(q, k, v, meta, cfg, sizes, interpret, debug)
  return out, lse[..., 0]


def _flash_fwd(q, k, v, meta, cfg, sizes, interpret, debug):
  out, lse = _forward(q, k, v, meta, cfg, sizes, interpret, debug)
  return (out, lse[..., 0]), (q, k, v, meta, out, lse)


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
  """Flash attention (Mosaic TPU style) on [B, T, N, H] inputs; see `flash_attention_gpu`.

  Args and returns are those of `flash_attention_gpu.flash_attention`, except that
  `block_sizes` defaults to the TPU table and `interpret` may also be a `pltpu.InterpretParams`.
  """
  common.validate_inputs(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids,
                         kv_segment_ids, local_window, softcap)
  b, t, n, h = q.shape
  s = k.shape[1]
  sizes = for_shapes(block_sizes, "tpu", t, s, h)
  tp, sp = padded_lengths(sizes, t, s)
  cfg = MaskConfig(causal=causal, local_window=local_window, softcap=softcap,
                   scale=float(h ** -0.5 if scale is None else scale),
                   use_segments=(q_segment_ids is not None or kv_lengths is not None or sp != s))
  meta = common.build_meta(b, t, s, tp, sp, q_positions=q_positions, kv_positions=kv_positions,
                           kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids)
  heads_first = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0),
                                             (0, 0))).transpose(0, 2, 1, 3)  # [B, heads, L, H]
  out, lse = _flash(heads_first(q, tp), heads_first(k, sp), heads_first(v, sp), meta, cfg, sizes,
                    interpret, debug)
  return out.transpose(0, 2, 1, 3)[:, :t], lse[:, :, :t]
