"""Bridge from the dispatch point to the Pallas kernels in `kernels_pallas/`.

Kernel style by backend: the Mosaic kernel (`flash_attention_tpu`) on TPU, the Triton kernel
(`flash_attention_gpu`) on GPU, and in interpret mode on CPU the Triton kernel unless the TPU style is
asked for, by `EFFJAX_PALLAS_STYLE=tpu` or by passing a `pltpu.InterpretParams` as `interpret` (which
also simulates TPU memory). On Hopper (sm_90), compiled calls inside its scope (`_use_hopper`: no
position/segment/length arrays, window or soft-cap; fp16/bf16; head_dim 64/128) go to the Mosaic
GPU FlashAttention-3-style forward instead (`flash_attention_hopper`, backward through the Triton
kernels; 0.88-1.10x cuDNN on an H200, RESULTS.md); `EFFJAX_PALLAS_HOPPER=0` turns it off.
On GPU and in GPU-style interpret mode, calls with at most 16 queries per row over a cache
(`MaskSpec` with kv_lengths/q_positions, no segments, no explicit key positions) go to the split-K
decode kernel, which reads the KV cache's heads-major [B*K, S, H] buffers in place.

What the kernels serve: causal masking by positions, `kv_lengths`, segment ids (packing/padding),
a local window, logit soft-capping, grouped/multi-query attention, Sq != Sk, any sequence length,
head_dim up to 256, float32/bfloat16/float16. What makes `pallas_attention` return None (the
dispatcher then falls back to XLA/chunked with a one-time warning, or raises under `strict`):

* `spec.extra_mask` or `spec.tree_mask` (tree attention, e.g. Medusa verification);
* a CPU backend without interpret mode (compiled Pallas needs a GPU or TPU);
* head_dim > 256, another dtype, or a traced (non-static) `scale`/`softcap`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from effjax.attention import dispatch
from effjax.attention.mask import MaskSpec

MAX_HEAD_DIM = 256
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def kernel_style(interpret) -> str:
  """"tpu" or "gpu": which kernel family serves this backend and interpret setting."""
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend == "gpu" and not interpret:
    return "gpu"
  if interpret is not None and not isinstance(interpret, bool):
    return "tpu"  # A pltpu.InterpretParams: simulate the TPU kernel.
  style = os.environ.get("EFFJAX_PALLAS_STYLE", "gpu").lower()
  if style not in ("gpu", "tpu"):
    raise ValueError(f"EFFJAX_PALLAS_STYLE={style!r}; use 'gpu' (Triton) or 'tpu' (Mosaic)")
  return style


def unsupported_reason(q, k, spec: MaskSpec, scale, softcap, interpret) -> Optional[str]:
  """Why the kernels cannot serve this call, or None when they can."""
  if spec.extra_mask is not None or spec.tree_mask is not None:
    return ("the kernels take no extra_mask or tree_mask (tree attention); express the mask "
            "through positions and segment ids")
  if jax.default_backend() == "cpu" and not interpret:
    return ("compiled Pallas kernels need a GPU or TPU; pass interpret=True (or set "
            "EFFJAX_PALLAS_INTERPRET=1)")
  if q.shape[-1] > MAX_HEAD_DIM:
    return f"head_dim={q.shape[-1]} exceeds {MAX_HEAD_DIM}"
  if q.dtype not in _DTYPES or k.dtype != q.dtype:
    return f"dtypes q={q.dtype}, k={k.dtype}; the kernels take one of float32/bfloat16/float16"
  for name, value in (("scale", scale), ("softcap", softcap)):
    if value is not None and not isinstance(value, (int, float)):
      return f"{name} must be a Python number (it is compiled into the kernel), got {type(value)}"
  return None


def _is_decode(q, spec: MaskSpec) -> bool:
  from kernels_pallas.decode_attention import MAX_DECODE_QUERIES
  return (q.shape[1] <= MAX_DECODE_QUERIES and spec.kv_lengths is not None
          and spec.kv_positions is None and spec.q_segment_ids is None)


def _use_hopper(q, k, v, spec: MaskSpec, scale, softcap, interpret) -> bool:
  """Whether the Hopper forward serves this (GPU-style, non-decode) call."""
  if os.environ.get("EFFJAX_PALLAS_HOPPER", "1").lower() in ("0", "off", "false"):
    return False
  from kernels_pallas import flash_attention_hopper as hopper
  if interpret or not hopper.is_hopper():
    return False
  has_arrays = any(x is not None for x in (spec.q_positions, spec.kv_positions, spec.kv_lengths,
                                           spec.q_segment_ids, spec.kv_segment_ids))
  return hopper.unsupported_reason(q, k, v=v, causal=spec.causal, has_mask_arrays=has_arrays,
                                   local_window=spec.local_window, softcap=softcap,
                                   interpret=interpret, scale=scale) is None


def pallas_attention(q, k, v, spec: MaskSpec, *, scale, softcap, interpret, strict,
                     kv_layout: str = "bskh"):
  """Runs the Pallas flash-attention kernels, or returns None to make the dispatcher fall back.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, or the KV cache's [B*K, S, H] with kv_layout="flat" (the decode kernel
      reads that in place; the prefill kernels get it transposed).
    v: values, laid out as k.
    spec: the mask (see module docstring for what is served).
    scale: logit scale (a Python number).
    softcap: soft-capping value or None.
    interpret: False to compile, True for the Pallas interpreter, or a `pltpu.InterpretParams`.
    strict: raise a ValueError instead of returning None.
    kv_layout: "bskh" or "flat".

  Returns:
    (out [B, T, N, H], lse [B, N, T]) or None.
  """
  reason = unsupported_reason(q, k, spec, scale, softcap, interpret)
  if reason is not None:
    if strict:
      raise ValueError(f"impl='pallas' cannot serve this call: {reason}; use impl='auto' (falls "
                       "back) or impl='xla'")
    dispatch._warn_once(f"attention: falling back from pallas: {reason}")
    return None
  style = kernel_style(interpret)
  scale = float(scale)
  softcap = None if softcap is None else float(softcap)
  interpret = interpret if interpret else False
  if style == "gpu" and _is_decode(q, spec):
    from kernels_pallas.decode_attention import decode_attention
    return decode_attention(q, k, v, kv_lengths=spec.kv_lengths, q_positions=spec.q_positions,
                            causal=spec.causal, local_window=spec.local_window, softcap=softcap,
                            scale=scale, interpret=interpret, kv_layout=kv_layout)
  if kv_layout == "flat":
    from kernels_pallas.decode_attention import unflatten_kv
    k, v = unflatten_kv(k, q.shape[0]), unflatten_kv(v, q.shape[0])
  if style == "tpu":
    from kernels_pallas.flash_attention_tpu import flash_attention
  elif _use_hopper(q, k, v, spec, scale, softcap, interpret):
    from kernels_pallas.flash_attention_hopper import flash_attention as hopper_attention
    return hopper_attention(q, k, v, causal=spec.causal, scale=scale)
  else:
    from kernels_pallas.flash_attention_gpu import flash_attention
  return flash_attention(q, k, v, q_positions=spec.q_positions, kv_positions=spec.kv_positions,
                         kv_lengths=spec.kv_lengths, q_segment_ids=spec.q_segment_ids,
                         kv_segment_ids=spec.kv_segment_ids, causal=spec.causal,
                         local_window=spec.local_window, softcap=softcap, scale=scale,
                         interpret=interpret)
