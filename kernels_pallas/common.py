"""What both flash-attention kernel styles share: mask semantics, padding and block skipping.

Every kernel reduces the caller's mask description to four per-token int32 arrays, computed once in
XLA, so that a kernel tile needs no more than two comparisons and two equalities:

* `q_pos [B, T]`, `kv_pos [B, S]`: absolute positions (causality and the local window compare them).
* `q_seg [B, T]`, `kv_seg [B, S]`: segment ids. Padding (to a block multiple) and keys past a row's
  `kv_lengths` get sentinel ids that match nothing, so one equality covers packing, padding and
  ragged lengths alike.

A (query i, key j) pair is visible when `q_seg[i] == kv_seg[j]`, and `kv_pos[j] <= q_pos[i]` if
causal, and `q_pos[i] - kv_pos[j] < window` if a window is set: the `MaskSpec` rules of
`effjax.attention.mask`, minus the dense `extra_mask`.

From the same arrays `block_ranges` derives, per query block, the half-open range of key blocks that
hold any visible pair (and per key block the range of query blocks), so kernels skip the rest: the
causal upper triangle, other packed segments, keys past a row's length, keys outside the window.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head
dim; `nq`/`nk` are numbers of query/key blocks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Finite, so a fully masked row gives exp(MASK - MASK) = 1 before zeroing rather than NaN; the same
# value as `effjax.attention.mask.MASK_VALUE` (REFERENCES 3).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Segment ids reserved for padding: padded queries and invalid keys never match anything.
Q_PAD_SEGMENT = -(2 ** 31)
KV_PAD_SEGMENT = -(2 ** 31) + 1
_BIG = 2 ** 30


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """The static part of a kernel call: what to mask, how to scale, and whether to mask at all.

  Attributes:
    causal: key position <= query position.
    local_window: keep keys with query_pos - key_pos < local_window (None: unlimited).
    softcap: logits -> softcap * tanh(logits / softcap) (None: off).
    scale: logit scale.
    use_segments: compare segment ids (packing, padding, kv lengths); False when all pairs are valid.
  """

  causal: bool = False
  local_window: Optional[int] = None
  softcap: Optional[float] = None
  scale: float = 1.0
  use_segments: bool = False

  @property
  def use_positions(self) -> bool:
    return self.causal or self.local_window is not None


class Meta(NamedTuple):
  """Per-token mask arrays of padded length (see module docstring)."""

  q_pos: jax.Array  # [B, Tp] int32
  kv_pos: jax.Array  # [B, Sp] int32
  q_seg: jax.Array  # [B, Tp] int32
  kv_seg: jax.Array  # [B, Sp] int32


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def validate_inputs(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids,
                    kv_segment_ids, local_window, softcap) -> None:
  """Raises ValueError with a fix for shapes or options the kernels cannot take."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash attention expects [batch, seq, heads, head_dim]; got q{q.shape}, "
                     f"k{k.shape}, v{v.shape}")
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k{k.shape} and v{v.shape} must equal [batch={b}, S, K, head_dim={h}]")
  if n % k.shape[2]:
    raise ValueError(f"{n} query heads are not a multiple of {k.shape[2]} kv heads; grouped-query "
                     "attention needs num_heads % num_kv_heads == 0")
  s = k.shape[1]
  for name, arr, shape in (("q_positions", q_positions, (b, t)),
                           ("kv_positions", kv_positions, (b, s)),
                           ("kv_lengths", kv_lengths, (b,)),
                           ("q_segment_ids", q_segment_ids, (b, t)),
                           ("kv_segment_ids", kv_segment_ids, (b, s))):
    if arr is not None and tuple(arr.shape) != shape:
      raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected {shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if local_window is not None and local_window < 1:
    raise ValueError(f"local_window={local_window} must be >= 1 (or None for no window)")
  if softcap is not None and softcap <= 0:
    raise ValueError(f"softcap={softcap} must be > 0 (or None for no soft-capping)")


def build_meta(batch: int, t: int, s: int, t_pad: int, s_pad: int, *, q_positions=None,
               kv_positions=None, kv_lengths=None, q_segment_ids=None,
               kv_segment_ids=None) -> Meta:
  """Per-token position and segment arrays of the padded lengths, with padding sentinels."""
  def pad(x, width, value):
    return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, width - x.shape[1])), constant_values=value)

  iota_t = jnp.arange(t_pad, dtype=jnp.int32)
  iota_s = jnp.arange(s_pad, dtype=jnp.int32)
  q_pos = (jnp.broadcast_to(iota_t, (batch, t_pad)) if q_positions is None
           else pad(q_positions, t_pad, 0))
  kv_pos = (jnp.broadcast_to(iota_s, (batch, s_pad)) if kv_positions is None
            else pad(kv_positions, s_pad, 0))
  if q_segment_ids is None:
    q_seg = jnp.zeros((batch, t), jnp.int32)
    kv_seg = jnp.zeros((batch, s), jnp.int32)
  else:
    q_seg, kv_seg = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
  q_seg = pad(q_seg, t_pad, Q_PAD_SEGMENT)
  kv_seg = pad(kv_seg, s_pad, KV_PAD_SEGMENT)
  if kv_lengths is not None:
    kv_seg = jnp.where(iota_s[None, :] < kv_lengths.astype(jnp.int32)[:, None], kv_seg,
                       KV_PAD_SEGMENT)
  return Meta(q_pos, kv_pos, q_seg, kv_seg)


def tile_mask(q_pos, kv_pos, q_seg, kv_seg, cfg: MaskConfig):
  """[bq, bk] visibility of one tile from [bq, 1] query and [1, bk] key metadata (None: all)."""
  mask = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.use_segments:
    mask = conj(mask, q_seg == kv_seg)
  if cfg.causal:
    mask = conj(mask, kv_pos <= q_pos)
  if cfg.local_window is not None:
    mask = conj(mask, (q_pos - kv_pos) < cfg.local_window)
  return mask


def scaled_logits(s, cfg: MaskConfig):
  """Scale then soft-cap float32 logits; returns (logits, capped tanh or None for the backward)."""
  s = s * cfg.scale
  if cfg.softcap is None:
    return s, None
  tanh = jnp.tanh(s / cfg.softcap)
  return cfg.softcap * tanh, tanh


def _block_stats(pos, seg, block, valid):
  """Per-block [B, nb] min/max of positions and segments over valid tokens, and non-emptiness."""
  b, length = pos.shape
  nb = length // block
  pos = pos.reshape(b, nb, block)
  seg = seg.reshape(b, nb, block)
  valid = valid.reshape(b, nb, block)
  big = jnp.int32(_BIG)
  return dict(
      pos_min=jnp.min(jnp.where(valid, pos, big), axis=-1),
      pos_max=jnp.max(jnp.where(valid, pos, -big), axis=-1),
      seg_min=jnp.min(jnp.where(valid, seg, jnp.iinfo(jnp.int32).max), axis=-1),
      seg_max=jnp.max(jnp.where(valid, seg, jnp.iinfo(jnp.int32).min), axis=-1),
      any=jnp.any(valid, axis=-1))


def block_visibility(meta: Meta, block_q: int, block_k: int, cfg: MaskConfig) -> jax.Array:
  """[B, nq, nk] bool: may block (i, j) hold a visible pair? Conservative, never misses one."""
  qs = _block_stats(meta.q_pos, meta.q_seg, block_q, meta.q_seg != Q_PAD_SEGMENT)
  ks = _block_stats(meta.kv_pos, meta.kv_seg, block_k, meta.kv_seg != KV_PAD_SEGMENT)
  q_ = lambda name: qs[name][:, :, None]  # [B, nq, 1]
  k_ = lambda name: ks[name][:, None, :]  # [B, 1, nk]
  vis = q_("any") & k_("any")
  if cfg.use_segments:
    vis &= (q_("seg_min") <= k_("seg_max")) & (k_("seg_min") <= q_("seg_max"))
  if cfg.causal:
    vis &= k_("pos_min") <= q_("pos_max")
  if cfg.local_window is not None:
    vis &= (q_("pos_min") - k_("pos_max")) < cfg.local_window
  return vis


def _first_last(vis: jax.Array):
  """Half-open [lo, hi) of True entries along the last axis; lo == hi when none."""
  n = vis.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(vis, idx, n), axis=-1)
  hi = jnp.max(jnp.where(vis, idx + 1, 0), axis=-1)
  lo = jnp.minimum(lo, hi)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def block_ranges(meta: Meta, block_q: int, block_k: int, cfg: MaskConfig):
  """Key-block range per query block and query-block range per key block.

  Returns:
    kv_lo, kv_hi: [B, nq] int32, key blocks [kv_lo, kv_hi) of query block i.
    q_lo, q_hi: [B, nk] int32, query blocks [q_lo, q_hi) of key block j.
  Blocks inside a range that hold no visible pair are still visited (and masked): the range keeps
  loops simple; packed segments make such gaps rare and small.
  """
  vis = block_visibility(meta, block_q, block_k, cfg)
  kv_lo, kv_hi = _first_last(vis)
  q_lo, q_hi = _first_last(jnp.swapaxes(vis, 1, 2))
  return kv_lo, kv_hi, q_lo, q_hi


def online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, dot_pv):
  """One FlashAttention update for a [bq, bk] tile of masked, capped logits `s`.

  Masked entries are zeroed explicitly: with a finite MASK_VALUE, a row masked so far has
  m == MASK_VALUE and exp(s - m) would be 1, not 0.
  """
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [bq, 1]
  p = jnp.exp(s - m_new)  # [bq, bk]
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  corr = jnp.exp(m_prev - m_new)  # [bq, 1]
  l_new = l_prev * corr + jnp.sum(p, axis=-1, keepdims=True)
  acc_new = acc_prev * corr + dot_pv(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def finalize(m, l, acc):
  """Output and natural-log LSE from the online-softmax state; empty rows give 0 and MASK_VALUE."""
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  out = acc / safe_l
  lse = jnp.where(empty, MASK_VALUE, m + jnp.log(safe_l))
  return out, lse


def softmax_grad(s, tanh, mask, lse, do_v, delta, cfg: MaskConfig):
  """Backward of one tile: probabilities p and d(loss)/d(raw scaled logits) for `s`.

  Args:
    s: [bq, bk] capped logits (before masking).
    tanh: the soft-cap tanh (None without soft-capping).
    mask: [bq, bk] visibility or None.
    lse: [bq, 1] forward log-sum-exp.
    do_v: [bq, bk] dO @ V^T.
    delta: [bq, 1] rowsum(dO * O) minus the LSE cotangent.
  Returns:
    (p, ds) with ds already multiplied by the logit scale and soft-cap derivative.
  """
  if mask is not None:  # Masked logits may be huge (future tokens); keep exp() finite.
    s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  ds = p * (do_v - delta)
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  return p, ds * cfg.scale
