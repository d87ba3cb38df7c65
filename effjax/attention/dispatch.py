"""The one attention entry point every effjax model calls.

`impl` chooses how attention is computed; the mask semantics (`MaskSpec`) are identical for all:

* `"xla"`     full logits in XLA; fastest for short sequences on CPU.
* `"chunked"` online softmax over (query chunk, kv chunk) tiles with a recomputing backward:
              O(q_chunk * kv_chunk) temporaries per head (32k tokens fit in well under 2 GB).
* `"pallas"`  the flash-attention kernels in `kernels_pallas/` (GPU Triton style or TPU Mosaic style
              by backend; interpret mode on CPU, forced by `interpret=True` or `EFFJAX_PALLAS_INTERPRET=1`).
* `"cudnn"`   `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs.
* `"cpu_decode"` a C++ kernel (XLA FFI, `cpu_decode.py`) for the LM's cached calls over its flat
              float32 KV cache on CPU: prefill, decoding, speculative verification and Medusa's
              tree pass (`MaskSpec.tree_mask`).
* `"auto"`    Pallas on TPU/GPU; on CPU `cpu_decode` where it serves the call, otherwise chunked for
              long keys (>= `AUTO_CHUNK_THRESHOLD`) and XLA for short ones.

Keys and values come as [B, S, K, H] (`kv_layout="bskh"`) or, for the LM's KV cache, heads-major and
flattened as [B*K, S, H] (`kv_layout="flat"`): XLA and Pallas' split-K decode kernel read that
layout in place; the other implementations receive it transposed to [B, S, K, H].

When the chosen implementation cannot serve a call (say cuDNN with an extra mask), `strict=True` raises
and `strict=False` falls back to XLA/chunked with a one-time warning that says why.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

from effjax.attention.mask import MaskSpec
from effjax.attention import xla as xla_impl

IMPLS = ("auto", "xla", "chunked", "pallas", "cudnn", "cpu_decode")
KV_LAYOUTS = ("bskh", "flat")
AUTO_CHUNK_THRESHOLD = 4096
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
  if msg not in _warned:
    _warned.add(msg)
    logging.warning(msg)


def interpret_forced() -> bool:
  """True when the environment asks Pallas kernels to run in interpret mode (CPU tests)."""
  return os.environ.get("EFFJAX_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


def _validate(q, k, v, spec: MaskSpec) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, seq, heads, head_dim] arrays; got q{q.shape}, "
                     f"k{k.shape}, v{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape")
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q{q.shape} and k{k.shape} disagree on batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads; "
                     "grouped-query attention needs num_heads % num_kv_heads == 0")
  if (spec.q_segment_ids is None) != (spec.kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if spec.tree_mask is not None:
    b, t = q.shape[:2]
    if spec.kv_lengths is None:
      raise ValueError("tree_mask describes the last T keys before kv_lengths; give kv_lengths too")
    if spec.tree_mask.shape != (b, t, t):
      raise ValueError(f"tree_mask must be [batch, T, T] = {(b, t, t)} for q{q.shape}; got "
                       f"{spec.tree_mask.shape}")


def _validate_flat(q, k, v, spec: MaskSpec) -> None:
  if k.ndim != 3 or k.shape != v.shape or k.shape[0] % q.shape[0]:
    raise ValueError(f"kv_layout='flat' expects [batch * kv_heads, seq, head_dim] keys and "
                     f"values; got k{k.shape}, v{v.shape} for q{q.shape}")
  bk, s, h = k.shape
  as_bskh = jax.ShapeDtypeStruct((q.shape[0], s, bk // q.shape[0], h), k.dtype)
  _validate(q, as_bskh, as_bskh, spec)


def resolve_impl(impl: str, kv_len: int) -> str:
  """Maps `auto` to a concrete implementation for the current backend and key length."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend in ("tpu", "gpu") or interpret_forced():
    return "pallas"
  return "chunked" if kv_len >= AUTO_CHUNK_THRESHOLD else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec = MaskSpec(), *,
                          scale: Optional[float] = None, softcap: Optional[float] = None,
                          impl: str = "auto", strict: bool = False,
                          interpret: Optional[bool] = None, kv_chunk: int = 512,
                          precision=None, return_lse: bool = False, kv_layout: str = "bskh"):
  """Scaled dot-product attention with grouped-query support.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0 ([B*K, S, H] with `kv_layout="flat"`).
    v: values, shaped as k.
    spec: which keys each query sees (see `effjax.attention.mask`).
    scale: logit scale (default 1/sqrt(H)).
    softcap: if set, logits -> softcap * tanh(logits / softcap) (Gemma-2 style).
    impl: one of `IMPLS`.
    strict: raise instead of falling back when `impl` cannot serve this call.
    interpret: run Pallas kernels in interpret mode (default: on CPU, or when forced by env).
    kv_chunk: key chunk of the chunked path.
    precision: matmul precision for the XLA paths (e.g. `jax.lax.Precision.HIGHEST` for exactness tests).
    return_lse: also return the [B, N, T] log-sum-exp.
    kv_layout: "bskh" or "flat" (heads-major [B*K, S, H], the KV cache's layout).

  Returns:
    [B, T, N, H] outputs (and the LSE if asked).
  """
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"unknown kv_layout {kv_layout!r}; choose one of {KV_LAYOUTS}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  chosen = resolve_impl(impl, k.shape[1])
  flat = kv_layout == "flat"
  if flat:
    _validate_flat(q, k, v, spec)
  else:
    _validate(q, k, v, spec)
  if chosen == "cpu_decode" or (chosen in ("xla", "chunked") and impl == "auto" and flat):
    from effjax.attention import cpu_decode  # Imported lazily: its first use builds the kernel.
    reason = cpu_decode.unsupported_reason(q, k, spec, kv_layout)
    if reason is None:
      reason = cpu_decode.unavailable_reason()
      if reason is not None:
        _warn_once(f"attention: {reason}; XLA serves decoding instead")
    if reason is None:
      out, lse = cpu_decode.flat_decode_attention(q, k, v, spec, scale=scale, softcap=softcap)
      return (out, lse) if return_lse else out
    if chosen == "cpu_decode":
      if strict:
        raise ValueError(f"impl='cpu_decode' cannot serve this call: {reason}; use impl='auto'")
      _warn_once(f"attention: falling back from cpu_decode: {reason}")
      chosen = resolve_impl("auto", k.shape[1])
  if flat:
    if chosen == "xla":
      out, lse = xla_impl.flat_kv_attention(q, k, v, spec, scale=scale, softcap=softcap,
                                            precision=precision)
      return (out, lse) if return_lse else out
    if chosen != "pallas":  # Pallas' decode kernel reads the flat cache in place.
      k, v = xla_impl.unflatten_kv(k, q.shape[0]), xla_impl.unflatten_kv(v, q.shape[0])
      flat = False
  if chosen == "cudnn":
    reason = None
    if jax.default_backend() != "gpu":
      reason = "cuDNN attention needs an NVIDIA GPU"
    elif (spec.extra_mask is not None or spec.tree_mask is not None
          or spec.q_positions is not None or spec.kv_positions is not None
          or spec.q_segment_ids is not None or softcap is not None):
      # The call below passes kv_lengths and the window only: anything else would be dropped.
      reason = ("cuDNN attention here takes no extra masks, positions, segment ids or "
                "soft-capping")
    if reason:
      if strict:
        raise ValueError(f"impl='cudnn' cannot serve this call: {reason}; use impl='auto'")
      chosen = "chunked" if k.shape[1] >= AUTO_CHUNK_THRESHOLD else "xla"
      _warn_once(f"attention: falling back from cudnn to {chosen}: {reason}")
  if chosen == "pallas":
    from effjax.attention import pallas_bridge  # Imported lazily: Pallas is heavy to import.
    use_interpret = interpret if interpret is not None else (
        interpret_forced() or jax.default_backend() == "cpu")
    out = pallas_bridge.pallas_attention(q, k, v, spec, scale=scale, softcap=softcap,
                                         interpret=use_interpret, strict=strict,
                                         kv_layout="flat" if flat else "bskh")
    if out is not None:
      return out if return_lse else out[0]
    chosen = "chunked" if k.shape[1] >= AUTO_CHUNK_THRESHOLD else "xla"
    if flat:
      k, v = xla_impl.unflatten_kv(k, q.shape[0]), xla_impl.unflatten_kv(v, q.shape[0])
  if chosen == "cudnn":
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=spec.causal, implementation="cudnn",
        key_value_seq_lengths=spec.kv_lengths, local_window_size=(
            (spec.local_window - 1, 0) if spec.local_window else None))
    if return_lse:
      raise ValueError("impl='cudnn' does not return the LSE here; use impl='xla' or 'pallas'")
    return out
  if chosen == "chunked":
    out, lse = xla_impl.chunked_attention(q, k, v, spec, scale=scale, softcap=softcap,
                                          kv_chunk=kv_chunk, precision=precision)
  else:
    out, lse = xla_impl.xla_attention(q, k, v, spec, scale=scale, softcap=softcap,
                                      precision=precision)
  return (out, lse) if return_lse else out
