"""Few-row float32 and bfloat16 matmuls on CPU through a C++ kernel (XLA FFI custom call).

A decode step multiplies a handful of rows (batch x new tokens: 1-9 when decoding or verifying a
speculative draft, up to 65 for a Medusa tree) by every weight matrix of the model. XLA:CPU is
1.5-2.4x slower than torch at 2-9 rows (RESULTS.md, "Where the time goes"); the kernel
(`cpu_kernels/few_row_matmul.cc`) holds up to 6 rows' accumulators in registers while it streams
a weight panel once, split over XLA's intra-op threads (one contiguous range of panels per core).
For models whose weights come from DRAM every step (`reads_in_blocks`: past the L2 caches and the
last-level cache), rows past the first three reuse each block of weight rows from L1 instead of
reading it again in narrow pieces, and prefetch the next block into L2 meanwhile.

Packed weights (`pack`): the same elements reordered into 128-column panels, each a contiguous
[K, 128] block, so a tile streams its panel front to back; same results bit for bit. Whole
generations with the 126 MB `large` model of benchmarks/decode.py run 1.05-1.22x faster on them
(RESULTS.md), so `effjax.models.lm.pack_weights`, which loaders call once, packs models whose
weights stream (lm/small's 19 MB included), and leaves ones the L2 caches hold alone.

Exactness: each output element is computed by the same sequence of float operations whatever the
number of rows or the row's place among them (the kernel's contract; `tests/test_few_row_matmul.py`
checks it bit for bit). Speculative and Medusa decoding rely on that: their verification passes
multiply more rows than plain decoding does, and must give the same logits bit for bit.

bfloat16 (x and w both; the output too): the weights are widened to float32 as the kernel loads
them and the sums run in float32, each output rounded to bfloat16 once, as XLA's bfloat16 dot does
on CPU - the same values up to the order of the sums, from half the weight bytes (RESULTS.md,
"bfloat16 decoding"). Row independence holds as for float32.

The LM routes its cached calls here (`LMConfig.matmul_impl="auto"`) when a row brings at most
`MAX_TOKENS_PER_ROW` new tokens, the backend is CPU and activations and weights are both float32
or both bfloat16. The kernel is built on first use. Gradients (never needed when decoding, but
allowed) are XLA's. `EFFJAX_CPU_MATMUL_KERNEL=0` turns the kernel off;
without a compiler it is off with a reason (`unavailable_reason`).
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Optional

import jax
import jax.numpy as jnp

from effjax.ops import cpu_ffi

MAX_TOKENS_PER_ROW = 80  # Covers speculative verification (gamma + 1) and Medusa trees (<= 65).
# Models with more float32 weight bytes than this stream them past the cores' own caches on every
# decode step. A split between the two sizes measured here: the 1.7 MB lm/draft stays in L2
# (1-2 MB per core on typical CPUs, 2 MB here); lm/small (19 MB) decodes at ~29 GB/s, a DRAM
# rate, although the VM reports 480 MB of L3, and streamed + packed + prefetched it generates 3-9%
# faster (plain and speculative, batch 1 and 4; packing alone measured 0.94-1.09x, i.e. noise;
# RESULTS.md, few-row matmul section). EFFJAX_STREAMING_WEIGHT_BYTES overrides it.
STREAMING_WEIGHT_BYTES = 8 << 20
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels",
                       "few_row_matmul.cc")
_TARGET = "effjax_few_row_matmul"
_TARGET_BF16 = "effjax_few_row_matmul_bf16"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# No -ffast-math: the exactness contract needs the operations as written, fused multiply-adds
# only where the source asks for them.
_FLAGS = (*cpu_ffi.BASE_FLAGS, "-ffp-contract=off")


@functools.cache
def _load() -> Optional[str]:
  if cpu_ffi.disabled("EFFJAX_CPU_MATMUL_KERNEL"):
    return "disabled by EFFJAX_CPU_MATMUL_KERNEL=0"
  return (cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxFewRowMatmul", _TARGET, "CPU few-row matmul kernel")
          or cpu_ffi.load(_SOURCE, _FLAGS, "EffjaxFewRowMatmulBf16", _TARGET_BF16,
                          "CPU few-row matmul kernel (bfloat16)"))


def unavailable_reason() -> Optional[str]:
  """None when the kernel is ready (building it on first call), else why not."""
  return _load()


def unsupported_reason(x_dtype, w_dtype) -> Optional[str]:
  """Why the kernel cannot serve x @ w on this backend with these dtypes, or None when it can."""
  if jax.default_backend() != "cpu":
    return "not a CPU backend"
  if jnp.dtype(x_dtype) != jnp.dtype(w_dtype) or jnp.dtype(x_dtype) not in _DTYPES:
    return (f"dtypes x={jnp.dtype(x_dtype)}, w={jnp.dtype(w_dtype)} (the kernel takes both float32 "
            "or both bfloat16)")
  return unavailable_reason()


def streams_from_memory(weight_bytes: int) -> bool:
  """Whether a model with `weight_bytes` of weights streams them past the L2 caches every step."""
  limit = int(os.environ.get("EFFJAX_STREAMING_WEIGHT_BYTES", STREAMING_WEIGHT_BYTES))
  return weight_bytes > limit


# Last-level caches reported larger than this are not taken at their word: the Intel VM of
# 2026-11-29/30 reported 480 MB of L3 (its host's, shared with other tenants) and read lm/small's
# 19 MB at a DRAM rate, where blocked reads made generation 3-9% faster.
PLAUSIBLE_LLC_BYTES = 128 << 20


SYSFS_CPU_CACHES = "/sys/devices/system/cpu/cpu0/cache"  # index*/size: "32K", "1024K", "32768K"
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@functools.cache
def last_level_cache_bytes() -> Optional[int]:
  """The largest CPU cache sysfs reports for cpu0, or None when unknown or implausibly large."""
  sizes = []
  for index in glob.glob(os.path.join(SYSFS_CPU_CACHES, "index*", "size")):
    try:
      with open(index) as f:
        text = f.read().strip().upper()
    except OSError:
      continue
    if text and text[-1] in _SIZE_UNITS and text[:-1].isdigit():
      sizes.append(int(text[:-1]) * _SIZE_UNITS[text[-1]])
    elif text.isdigit():
      sizes.append(int(text))
  llc = max(sizes, default=0)
  return llc if 0 < llc <= PLAUSIBLE_LLC_BYTES else None


def reads_in_blocks(weight_bytes: int) -> bool:
  """Whether the kernel should read weights in L1-sized blocks (its `stream` mode) for a model.

  Blocks pay when each step's weights come from DRAM: the narrow tiles' scattered 256-byte reads
  were the slow part there (RESULTS.md, few-row section). When the last-level cache holds the
  model they only add passes over the accumulators: on AMD Zen 4 (32 MB L3) lm/small's 5-28-row
  matmuls ran 13-60% slower blocked (RESULTS.md, "A new machine"). So: models that stream past L2
  (`streams_from_memory`) and do not fit the last-level cache, or whose cache size is unknown.
  EFFJAX_BLOCKED_WEIGHT_BYTES overrides the cache size.
  """
  if not streams_from_memory(weight_bytes):
    return False
  override = os.environ.get("EFFJAX_BLOCKED_WEIGHT_BYTES")
  llc = int(override) if override else last_level_cache_bytes()
  return llc is None or weight_bytes > llc


PANEL = 128  # Columns per panel of packed weights (the kernel's kPanel).


def pack(w: jax.Array) -> jax.Array:
  """w [K, N] -> the same elements panel by panel, shaped [K, N] (a layout, not a matrix).

  Panel j holds columns [128 j, 128 j + 128) (the last one the N % 128 left over) as a row-major
  [K, width] block; the blocks follow each other. `unpack` inverts it.
  """
  k, n = w.shape
  full = n // PANEL * PANEL
  panels = w[:, :full].reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)  # [N / 128, K, 128]
  return jnp.concatenate([panels.reshape(-1), w[:, full:].reshape(-1)]).reshape(k, n)


def unpack(packed: jax.Array) -> jax.Array:
  """The [K, N] matrix whose `pack` is `packed`."""
  k, n = packed.shape
  full = n // PANEL * PANEL
  flat = packed.reshape(-1)
  panels = flat[:k * full].reshape(n // PANEL, k, PANEL).transpose(1, 0, 2).reshape(k, full)
  return jnp.concatenate([panels, flat[k * full:].reshape(k, n - full)], axis=1)


def _call(x2, w2, transpose_w: bool, stream: bool, packed: bool):
  n = w2.shape[0] if transpose_w else w2.shape[1]
  target = _TARGET_BF16 if x2.dtype == jnp.bfloat16 else _TARGET
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), x2.dtype),
                          vmap_method="sequential")(x2, w2, transpose_w=transpose_w, stream=stream,
                                                    packed=packed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x2, w2, transpose_w, stream, packed):
  return _call(x2, w2, transpose_w, stream, packed)


def _matmul_fwd(x2, w2, transpose_w, stream, packed):
  return _call(x2, w2, transpose_w, stream, packed), (x2, w2)


def _matmul_bwd(transpose_w, stream, packed, residuals, g):
  x2, w2 = residuals
  hi = jax.lax.Precision.HIGHEST
  if transpose_w:  # out = x @ w.T
    return jnp.matmul(g, w2, precision=hi), jnp.matmul(g.T, x2, precision=hi)
  w = unpack(w2) if packed else w2
  grad_w = jnp.matmul(x2.T, g, precision=hi)
  return jnp.matmul(g, w.T, precision=hi), pack(grad_w) if packed else grad_w


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, stream: bool = False,
           packed: bool = False) -> jax.Array:
  """x [..., K] @ w [K, N] (or w [N, K] with transpose_w) -> [..., N] in x's dtype, on CPU.

  `stream`: read weights in blocks reused from L1 (for models `reads_in_blocks` says come from
  DRAM); a speed hint, same results. `packed`: w is `pack(W)` for the [K, N] matrix W meant.

  Call only when `unsupported_reason(x.dtype, w.dtype)` is None.
  """
  k = x.shape[-1]
  if w.ndim != 2 or w.shape[1 if transpose_w else 0] != k:
    raise ValueError(f"x [..., {k}] does not fit w {w.shape} (transpose_w={transpose_w})")
  if packed and transpose_w:
    raise ValueError("packed weights are [K, N] panels (pack); transpose_w must be False")
  out = _matmul(x.reshape(-1, k), w, transpose_w, bool(stream), bool(packed))  # [M, N]
  return out.reshape(*x.shape[:-1], out.shape[-1])
