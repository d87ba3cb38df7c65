"""Decode attention on CPU through a small C++ kernel (XLA FFI custom call), built on first use.

Serves the LM's cached calls on CPU - prefill, decoding, speculative verification, Medusa's tree
pass - over the heads-major [B*K, S, H] float32 cache, with the masks a cache needs (per-row
lengths, causal by position, a local window, `MaskSpec.tree_mask` as a bitmask) and soft-capping.
The kernel (`cpu_kernels/decode_attention.cc`) reads each (row, kv head)'s keys and values once for
up to 128 of its G*T query rows at a time, only over the slots those rows can see, and splits the
(block, row chunk) units over XLA's intra-op threads - where XLA:CPU runs the same attention as one
small Eigen matmul per (row, kv head) over every slot of the allocated cache (RESULTS.md, "What
still limits batch 8"): 1.9-2.5x faster for one-token decoding, 3-6x for a prefill of 64-1,024
tokens (RESULTS.md, "Prefill attention through the kernel; prefetching from DRAM"). Its scratch is
128 x S floats per thread. A bfloat16 cache (with bfloat16 q) is widened to float32 as it is read,
the sums are float32 and the output is rounded to bfloat16 once, as XLA does for the same call.

Build: `effjax.ops.cpu_ffi` compiles the source once per source/jaxlib/CPU combination into
`$EFFJAX_KERNEL_CACHE` (default `~/.cache/effjax/kernels`), in a few seconds. Without a compiler,
or with `EFFJAX_CPU_DECODE_KERNEL=0`, `unavailable_reason()` says why and the dispatch uses XLA
(with a one-time warning when a build failed). Gradients (never needed when decoding, but allowed)
are XLA's.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from effjax.attention import xla as xla_impl
from effjax.attention.mask import MASK_VALUE, MaskSpec
from effjax.ops import cpu_ffi

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels",
                       "decode_attention.cc")
_TARGET = "effjax_cpu_decode_attention"
_TARGET_BF16 = "effjax_cpu_decode_attention_bf16"
_FLAGS = (*cpu_ffi.BASE_FLAGS, "-ffast-math", "-fopenmp-simd")


@functools.cache
def _load() -> Optional[str]:
  """Builds (once) and registers the kernel; returns why it is unavailable, or None."""
  if cpu_ffi.disabled("EFFJAX_CPU_DECODE_KERNEL"):
    return "disabled by EFFJAX_CPU_DECODE_KERNEL=0"
  return (cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxCpuDecodeAttention", _TARGET,
                       "CPU decode-attention kernel")
          or cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxCpuDecodeAttentionBf16", _TARGET_BF16,
                          "CPU decode-attention kernel (bfloat16)"))


def unavailable_reason() -> Optional[str]:
  """None when the kernel is ready (building it on first call), else why not."""
  return _load()


def unsupported_reason(q, k, spec: MaskSpec, kv_layout: str) -> Optional[str]:
  """Why the kernel cannot serve this call (shapes, dtypes, mask, backend), or None when it can.

  Whether the kernel could be built is `unavailable_reason`'s answer.
  """
  if kv_layout != "flat":
    return "it reads the LM cache's flat [B*K, S, H] layout only (kv_layout='flat')"
  if jax.default_backend() != "cpu":
    return "not a CPU backend"
  if q.dtype != k.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"dtypes q={q.dtype}, k={k.dtype} (the kernel takes both float32 or both bfloat16)"
  if (spec.extra_mask is not None or spec.q_segment_ids is not None
      or spec.kv_positions is not None):
    return "extra masks, segment ids and explicit key positions are XLA's"
  if spec.tree_mask is not None and (spec.causal or spec.local_window is not None):
    return "a tree_mask combined with causal or local-window masking is XLA's"
  return None


def _row_ranges(spec: MaskSpec, b: int, t: int, s: int):
  """[B, T] half-open ranges [lo, hi) of key slots each query sees (slot index == position).

  With a tree mask, [lo, hi) is the prefix before the T new tokens; `_tree_bits` adds the nodes.
  """
  if spec.tree_mask is not None:
    hi = jnp.broadcast_to((spec.kv_lengths.astype(jnp.int32) - t)[:, None], (b, t))
    return jnp.zeros((b, t), jnp.int32), hi
  pos = (spec.q_positions.astype(jnp.int32) if spec.q_positions is not None
         else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  hi = jnp.full((b, t), s, jnp.int32)
  if spec.kv_lengths is not None:
    hi = jnp.minimum(hi, spec.kv_lengths.astype(jnp.int32)[:, None])
  if spec.causal:
    hi = jnp.minimum(hi, pos + 1)
  lo = jnp.zeros((b, t), jnp.int32)
  if spec.local_window is not None:
    lo = jnp.maximum(lo, pos - spec.local_window + 1)
  return lo, hi


def _tree_bits(spec: MaskSpec, b: int, t: int) -> jax.Array:
  """[B, T, W] int32 words: bit i of row t's words is tree_mask[b, t, i] (W = 0 without a tree)."""
  if spec.tree_mask is None:
    return jnp.zeros((b, t, 0), jnp.int32)
  words = -(-t // 32)
  bits = jnp.pad(spec.tree_mask.astype(jnp.uint32), ((0, 0), (0, 0), (0, 32 * words - t)))
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
  packed = jnp.sum(bits.reshape(b, t, words, 32) * weights, axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(packed, jnp.int32)


def _call_kernel(q, k, v, spec: MaskSpec, scale: float, softcap: Optional[float]):
  b, t, n, h = q.shape
  bk, s = k.shape[0], k.shape[1]
  kh = bk // b
  g = n // kh
  m = g * t
  lo, hi = _row_ranges(spec, b, t, s)  # [B, T]
  per_row = lambda x: jnp.broadcast_to(x[:, None, None, :], (b, kh, g, t)).reshape(bk, m)
  bits = _tree_bits(spec, b, t)  # [B, T, W]
  bits = jnp.broadcast_to(bits[:, None, None], (b, kh, g, *bits.shape[1:])).reshape(
      bk, m, bits.shape[-1])  # [B*K, G*T, W]
  target = _TARGET_BF16 if q.dtype == jnp.bfloat16 else _TARGET
  out, lse = jax.ffi.ffi_call(
      target, (jax.ShapeDtypeStruct((b, t, n, h), q.dtype),  # q's layout: no copies
                jax.ShapeDtypeStruct((bk, m), jnp.float32)),
      vmap_method="sequential",  # Correct under any vmap; the LM never vmaps its cached calls.
  )(q, k, v, per_row(lo), per_row(hi), bits, scale=np.float32(scale),
    softcap=np.float32(softcap or 0.0), mask_value=np.float32(MASK_VALUE))
  return out, lse.reshape(b, n, t)  # [B, T, N, H], [B * K, G * T] = [B, N, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, spec, scale, softcap):
  return _call_kernel(q, k, v, spec, scale, softcap)


def _attention_fwd(q, k, v, spec, scale, softcap):
  return _call_kernel(q, k, v, spec, scale, softcap), (q, k, v, spec)


def _attention_bwd(scale, softcap, residuals, cotangents):
  q, k, v, spec = residuals
  _, pullback = jax.vjp(lambda q_, k_, v_: xla_impl.flat_kv_attention(
      q_, k_, v_, spec, scale=scale, softcap=softcap), q, k, v)
  # The mask's leaves here are integer positions and lengths: their cotangent type is float0.
  no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), spec)
  return (*pullback(cotangents), no_grad)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flat_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                          scale: float, softcap: Optional[float] = None):
  """Attention of q [B, T, N, H] over the flat cache k, v [B*K, S, H]: (out [B,T,N,H], lse [B,N,T]).

  Same semantics as `xla.flat_kv_attention` (zeros and MASK_VALUE for rows that see no key). Call
  only when `unsupported_reason` and `unavailable_reason` are None.
  """
  return _attention(q, k, v, spec, float(scale), None if softcap is None else float(softcap))
