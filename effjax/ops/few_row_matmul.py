"""Few-row float32 matmuls on CPU through a C++ kernel (XLA FFI custom call), built on first use.

A decode step multiplies a handful of rows (batch x new tokens: 1-9 when decoding or verifying a
speculative draft, up to 65 for a Medusa tree) by every weight matrix of the model. XLA:CPU is
1.5-2.4x slower than torch at 2-9 rows (RESULTS.md, "Where the time goes"); the kernel
(`cpu_kernels/few_row_matmul.cc`) holds up to 6 rows' accumulators in registers while it streams
a weight panel once, split over XLA's intra-op threads. For models whose weights come from DRAM
every step (`streams_from_memory`), rows past the first three reuse each block of weight rows from
L1 instead of reading it again in narrow pieces.

Exactness: each output element is computed by the same sequence of float operations whatever the
number of rows or the row's place among them (the kernel's contract; `tests/test_few_row_matmul.py`
checks it bit for bit). Speculative and Medusa decoding rely on that: their verification passes
multiply more rows than plain decoding does, and must give the same logits bit for bit.

The LM routes its cached calls here (`LMConfig.matmul_impl="auto"`) when a row brings at most
`MAX_TOKENS_PER_ROW` new tokens, the backend is CPU and the weights are float32. Gradients (never
needed when decoding, but allowed) are XLA's. `EFFJAX_CPU_MATMUL_KERNEL=0` turns the kernel off;
without a compiler it is off with a reason (`unavailable_reason`).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp

from effjax.ops import cpu_ffi

MAX_TOKENS_PER_ROW = 80  # Covers speculative verification (gamma + 1) and Medusa trees (<= 65).
# Models with more float32 weight bytes than this read them from DRAM on every decode step on
# typical CPUs (last-level caches of 16-64 MB; the 126 MB `large` model of benchmarks/decode.py
# does here although the VM reports 480 MB of L3); the 19 MB lm/small stays cached.
# EFFJAX_STREAMING_WEIGHT_BYTES overrides it.
STREAMING_WEIGHT_BYTES = 48 << 20
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels",
                       "few_row_matmul.cc")
_TARGET = "effjax_few_row_matmul"
# No -ffast-math: the exactness contract needs the operations as written, fused multiply-adds
# only where the source asks for them.
_FLAGS = (*cpu_ffi.BASE_FLAGS, "-ffp-contract=off")


@functools.cache
def _load() -> Optional[str]:
  if cpu_ffi.disabled("EFFJAX_CPU_MATMUL_KERNEL"):
    return "disabled by EFFJAX_CPU_MATMUL_KERNEL=0"
  return cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxFewRowMatmul", _TARGET, "CPU few-row matmul kernel")


def unavailable_reason() -> Optional[str]:
  """None when the kernel is ready (building it on first call), else why not."""
  return _load()


def unsupported_reason(x_dtype, w_dtype) -> Optional[str]:
  """Why the kernel cannot serve x @ w on this backend with these dtypes, or None when it can."""
  if jax.default_backend() != "cpu":
    return "not a CPU backend"
  if jnp.dtype(x_dtype) != jnp.float32 or jnp.dtype(w_dtype) != jnp.float32:
    return f"dtypes x={jnp.dtype(x_dtype)}, w={jnp.dtype(w_dtype)} (the kernel is float32 only)"
  return unavailable_reason()


def streams_from_memory(weight_bytes: int) -> bool:
  """Whether a model with `weight_bytes` of weights reads them from DRAM on every decode step."""
  limit = int(os.environ.get("EFFJAX_STREAMING_WEIGHT_BYTES", STREAMING_WEIGHT_BYTES))
  return weight_bytes > limit


def _call(x2, w2, transpose_w: bool, stream: bool):
  n = w2.shape[0] if transpose_w else w2.shape[1]
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                          vmap_method="sequential")(x2, w2, transpose_w=transpose_w, stream=stream)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x2, w2, transpose_w, stream):
  return _call(x2, w2, transpose_w, stream)


def _matmul_fwd(x2, w2, transpose_w, stream):
  return _call(x2, w2, transpose_w, stream), (x2, w2)


def _matmul_bwd(transpose_w, stream, residuals, g):
  x2, w2 = residuals
  hi = jax.lax.Precision.HIGHEST
  if transpose_w:  # out = x @ w.T
    return jnp.matmul(g, w2, precision=hi), jnp.matmul(g.T, x2, precision=hi)
  return jnp.matmul(g, w2.T, precision=hi), jnp.matmul(x2.T, g, precision=hi)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False,
           stream: bool = False) -> jax.Array:
  """x [..., K] @ w [K, N] (or w [N, K] with transpose_w) -> [..., N], float32, on CPU.

  `stream`: the weights come from DRAM (`streams_from_memory`); a speed hint, same results.

  Call only when `unsupported_reason(x.dtype, w.dtype)` is None.
  """
  k = x.shape[-1]
  if w.ndim != 2 or w.shape[1 if transpose_w else 0] != k:
    raise ValueError(f"x [..., {k}] does not fit w {w.shape} (transpose_w={transpose_w})")
  out = _matmul(x.reshape(-1, k), w, transpose_w, bool(stream))  # [M, N]
  return out.reshape(*x.shape[:-1], out.shape[-1])
