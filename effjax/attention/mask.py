"""The attention mask, described once and built in one place.

Every attention implementation (XLA, chunked, Pallas) receives the same `MaskSpec` and must agree on
which (query, key) pairs are visible. A pair (i, j) of row b is visible when all of these hold:

* `j < kv_lengths[b]`                          (keys past a row's cache length are stale or padding)
* `kv_positions[b, j] <= q_positions[b, i]`     if `causal`
* `q_positions[b, i] - kv_positions[b, j] < local_window`   if `local_window` is set
* `q_segment_ids[b, i] == kv_segment_ids[b, j]` if segment ids are given (packing, padding)
* `extra_mask[b, i, j]`                         if given (any dense mask)
* `tree_mask[b, i, j - (kv_lengths[b] - T)]`    for the last T keys, if given (Medusa's tree)

`tree_mask` is the compact form of the one dense mask the decoding loops need: the T new tokens of
a tree pass sit in the last T slots before `kv_lengths[b]`; every query sees the whole prefix before
them and, among them, the nodes its [T, T] row allows (its ancestors and itself). Kernels that read
it directly (the CPU decode kernel) never build the [B, T, S] mask; the others expand it here.

Einsum letters used across `effjax.attention`: B batch, T query length, S key length, N query heads,
K key/value heads, G query heads per kv head (N = K * G), H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives exp(mask - max) = exp(0) rather than NaN (see REFERENCES 3).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Which keys each query may see. Array fields are pytree leaves; the rest is static.

  Attributes:
    q_positions: [B, T] int32 absolute position of each query (None: 0..T-1).
    kv_positions: [B, S] int32 absolute position of each key (None: 0..S-1).
    kv_lengths: [B] int32 number of valid keys per row (None: all S).
    q_segment_ids: [B, T] int32 (None: no segment masking).
    kv_segment_ids: [B, S] int32.
    extra_mask: [B, T, S] bool, ANDed with the rest (None: none).
    tree_mask: [B, T, T] bool over the last T keys before kv_lengths (needs kv_lengths; None: none).
    causal: key position <= query position.
    local_window: keep only keys within this many positions behind the query (None: unlimited).
  """

  q_positions: Optional[jax.Array] = None
  kv_positions: Optional[jax.Array] = None
  kv_lengths: Optional[jax.Array] = None
  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  extra_mask: Optional[jax.Array] = None
  tree_mask: Optional[jax.Array] = None
  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
  local_window: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))

  def has_mask(self) -> bool:
    return (self.causal or self.local_window is not None or self.kv_lengths is not None
            or self.q_segment_ids is not None or self.extra_mask is not None
            or self.tree_mask is not None)

  def dense(self, batch: int, q_len: int, kv_len: int, kv_offset: int | jax.Array = 0,
            kv_chunk: Optional[int] = None, q_offset: int | jax.Array = 0,
            q_chunk: Optional[int] = None) -> jax.Array:
    """Materialises the [B, T', S'] boolean mask of queries q_offset .. q_offset + T' - 1 and keys
    kv_offset .. kv_offset + S' - 1.

    `kv_chunk` and `q_chunk` (static) let the chunked path build only one tile. Columns past
    `kv_len` are masked; rows past `q_len` are padding whose mask the caller must ignore.
    """
    width = kv_len if kv_chunk is None else kv_chunk
    cols = kv_offset + jnp.arange(width, dtype=jnp.int32)  # [S']
    if q_chunk is None:
      rows = None
      q_pos = (self.q_positions if self.q_positions is not None
               else jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len)))
    else:
      rows = q_offset + jnp.arange(q_chunk, dtype=jnp.int32)  # [T']
      q_pos = (jnp.take(self.q_positions, rows, axis=1, mode="clip")
               if self.q_positions is not None else jnp.broadcast_to(rows, (batch, q_chunk)))
    q_rows = q_pos.shape[1]
    if self.kv_positions is not None:
      kv_pos = jnp.take(self.kv_positions, cols, axis=1, mode="clip")  # [B, S']
    else:
      kv_pos = jnp.broadcast_to(cols, (batch, width))
    mask = jnp.ones((batch, q_rows, width), dtype=bool)
    if self.kv_lengths is not None:
      mask &= (cols[None, None, :] < self.kv_lengths[:, None, None])
    else:
      mask &= (cols[None, None, :] < kv_len)
    if self.causal:
      mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if self.local_window is not None:
      mask &= (q_pos[:, :, None] - kv_pos[:, None, :]) < self.local_window
    if self.q_segment_ids is not None:
      kv_seg = jnp.take(self.kv_segment_ids, cols, axis=1, mode="clip")
      q_seg = (self.q_segment_ids if rows is None
               else jnp.take(self.q_segment_ids, rows, axis=1, mode="clip"))
      mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if self.extra_mask is not None:
      extra = jnp.take(self.extra_mask, cols, axis=2, mode="clip")
      if rows is not None:
        extra = jnp.take(extra, rows, axis=1, mode="clip")
      mask &= extra
    if self.tree_mask is not None:
      t = self.tree_mask.shape[1]
      rel = cols[None, :] - (self.kv_lengths[:, None] - t)  # [B, S'] slot - first new slot
      node_rows = self.tree_mask if rows is None else jnp.take(self.tree_mask, rows, axis=1,
                                                               mode="clip")  # [B, T', T]
      in_tree = jnp.take_along_axis(
          node_rows, jnp.broadcast_to(jnp.clip(rel, 0, t - 1)[:, None, :],
                                      (batch, node_rows.shape[1], width)), axis=2)
      mask &= jnp.where(rel[:, None, :] < 0, True, in_tree)
    return mask


def segment_ids_from_lengths(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B] valid lengths -> [B, max_len] segment ids (1 for tokens, 0 for padding)."""
  return (jnp.arange(max_len)[None, :] < lengths[:, None]).astype(jnp.int32)
