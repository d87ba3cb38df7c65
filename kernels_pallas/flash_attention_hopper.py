# The forward kernel below is adapted from JAX's FlashAttention-3 example,
# jax/experimental/pallas/ops/gpu/attention_mgpu.py (jax 0.10.2), Copyright 2024 The JAX Authors,
# licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0).
# Changes: shared-memory tiles in the inputs' dtype (the example's float16 tiles reject bfloat16),
# the softmax scale folded into the exponent, the log-sum-exp returned in natural log as [B, N, T],
# an `interpret` switch, and the entry point, checks and backward below.
"""FlashAttention-3-style forward for Hopper GPUs (sm_90) in Pallas' Mosaic GPU dialect.

Why a second GPU kernel: the Triton-lowered FlashAttention-2 kernel (`flash_attention_gpu`) levels
off near 310 TFLOP/s on an H200 where cuDNN reaches 600-670 (RESULTS.md). cuDNN gets there with
Hopper's own machinery, which Triton's lowering does not reach from Pallas: warpgroup matrix
multiplies (wgmma) fed from shared memory by the tensor memory accelerator (TMA), and warp
specialisation. This kernel uses all three. Each program takes 2 x block_q query rows of one head:
two *compute* warpgroups (block_q rows each) run QK^T, the online softmax and PV, while a third
*memory* warpgroup streams key/value blocks into a ring of `max_concurrent_steps` shared-memory
slots, signalling barriers. A schedule barrier makes the two compute warpgroups alternate between
the tensor cores and the softmax, so one's exponentials overlap the other's matrix multiplies.

Scope (`unsupported_reason` says which call falls outside it, and the bridge then uses the Triton
kernel): q, k, v all float16 or all bfloat16, head_dim 64 or 128, no segment ids / kv lengths /
positions / window / soft-cap, a positive scale, T a multiple of 2 x block_q (128), S a multiple of
64, and causal only with T <= S (the mask is `key index <= query index`, as the other kernels'
default positions) and not on CUDA 12.8.0-12.9.1 (JAX's example refuses it there: ptxas miscompiles
the causal kernel). Backward: the Triton
kernels' dq/dkv (`flash_attention_gpu._backward`), fed this forward's output and LSE - both kernels
define the same function, so mixing them is exact up to rounding.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl

from kernels_pallas import common
from kernels_pallas.block_sizes import for_shapes, padded_lengths
from kernels_pallas.common import MaskConfig

HEAD_DIMS = (64, 128)
_DTYPES = (jnp.float16, jnp.bfloat16)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class HopperBlockSizes:
  """Tiles of the Hopper forward.

  Attributes:
    block_q: query rows per compute warpgroup (a program takes 2 x block_q); a multiple of 64
      (one wgmma is 64 rows).
    block_kv: keys per pipeline step; a multiple of 64.
    max_concurrent_steps: key/value blocks in flight in shared memory (>= 2).
  """

  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      if getattr(self, name) % 64:
        raise ValueError(f"HopperBlockSizes.{name}={getattr(self, name)} must be a multiple of 64 "
                         "(wgmma tiles are 64 rows)")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"HopperBlockSizes.max_concurrent_steps={self.max_concurrent_steps} must "
                       "be >= 2 (one block computing while the next loads)")


# head_dim -> default. Shared memory bounds the key block: a program holds 2 x block_q query rows
# plus max_concurrent_steps key and value blocks, (2 x 64 + 2 x 2 x block_kv) x H x 2 bytes, under
# Hopper's 227 KiB: block_kv 256 fits at head_dim 64 (144 KiB), 128 at head_dim 128 (160 KiB) -
# the first fitting choice of JAX's own tuning loop. An H200 sweep (2026-11-30, B 4, S 4096, bf16,
# GQA 8:1; RESULTS.md) kept them: the best other tiles were within 1-3%, kv 64 lost 10-25%, q 128
# per warpgroup 5-30%; at head_dim 128 kv 256 or 3 steps overflow shared memory.
_TABLE = {
    64: HopperBlockSizes(block_q=64, block_kv=256, max_concurrent_steps=2),
    128: HopperBlockSizes(block_q=64, block_kv=128, max_concurrent_steps=2),
}


def default_block_sizes(head_dim: int) -> HopperBlockSizes:
  if head_dim not in _TABLE:
    raise ValueError(f"head_dim={head_dim}: the Hopper kernel takes head_dim {HEAD_DIMS}")
  return _TABLE[head_dim]


def _fitted(sizes: HopperBlockSizes, kv_len: int) -> HopperBlockSizes:
  """`sizes` with block_kv halved until it divides kv_len (kv_len is a multiple of 64)."""
  block_kv = sizes.block_kv
  while kv_len % block_kv:
    block_kv //= 2
  return dataclasses.replace(sizes, block_kv=max(block_kv, 64))


def is_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (H100/H200/H800)."""
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))  # "9.0" on sm_90.
  return device.platform == "gpu" and capability.split(".")[0] == "9"


def _cuda_runtime_version() -> Optional[int]:
  """The CUDA runtime's version number (12080 for 12.8.0), or None without a CUDA plugin."""
  try:
    from jax._src.lib import cuda_versions
    return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())
  except Exception:  # No CUDA plugin (CPU-only installs), or an API change: no known bad range.
    return None


def unsupported_reason(q, k, *, causal: bool, has_mask_arrays: bool, local_window, softcap,
                       interpret, v=None, scale: Optional[float] = None,
                       sizes: Optional[HopperBlockSizes] = None) -> Optional[str]:
  """Why this kernel cannot serve the call, or None. Device-independent except for `interpret`
  and the CUDA runtime's version."""
  if interpret:
    return "the Mosaic GPU kernel has no interpret mode for its warpgroup/TMA primitives"
  dtypes = (q.dtype, k.dtype) + (() if v is None else (v.dtype,))
  if q.dtype not in _DTYPES or any(d != q.dtype for d in dtypes):
    return (f"dtypes {'/'.join(str(d) for d in dtypes)}: the Hopper kernel takes q, k and v all "
            "float16 or all bfloat16")
  b, t, n, h = q.shape
  s = k.shape[1]
  if h not in HEAD_DIMS:
    return f"head_dim={h}: the Hopper kernel takes {HEAD_DIMS}"
  if has_mask_arrays:
    return "it takes no segment ids, kv lengths or explicit positions (causal masks by index)"
  if local_window is not None:
    return f"it has no local window (local_window={local_window})"
  if softcap is not None:
    return f"it has no soft-capping (softcap={softcap})"
  if scale is not None and not scale > 0:
    return f"scale={scale}: the exponent folding needs a positive logit scale"
  version = _cuda_runtime_version()
  if causal and version is not None and 12080 <= version < 12091:
    # JAX's example refuses the same range: ptxas miscompiles the causal kernel there.
    return f"causal masking miscompiles with CUDA {version} (12.8.0 <= version < 12.9.1)"
  sizes = sizes or default_block_sizes(h)
  if t % (2 * sizes.block_q):
    return f"T={t} is not a multiple of {2 * sizes.block_q} (two warpgroups' query rows)"
  if s % 64:
    return f"S={s} is not a multiple of 64"
  if causal and t > s:
    return f"causal with T={t} > S={s}"
  triton = for_shapes(None, "gpu", t, s, h)
  if padded_lengths(triton, t, s) != (t, s):
    return f"T={t}, S={s} are not multiples of the Triton backward's blocks"
  return None


def _forward(q, k, v, *, causal: bool, scale: float, sizes: HopperBlockSizes, interpret=False):
  """out [B, T, N, H] in q's dtype, lse [B, N, T] float32 (natural log)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Imports the Mosaic GPU dialect.

  batch_size, q_seq_len, num_q_heads, head_dim = q.shape
  kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
  q_heads_per_kv_head = num_q_heads // num_kv_heads
  dtype = q.dtype
  block_q, block_kv = sizes.block_q, sizes.block_kv
  max_concurrent_steps = min(sizes.max_concurrent_steps, kv_seq_len // block_kv)
  # Logits enter the exponent as exp2(qk * scale * log2 e - m), m kept in the same units, so one
  # FMA per logit does the scaling and the change of base.
  exp2_scale = scale * math.log2(math.e)

  def kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    batch = lax.axis_index("batch")
    q_head = lax.axis_index("heads")
    smem_buffers, buffer_barriers, consumed_barriers, schedule_barrier = scoped
    wg_idx = lax.axis_index("wg")
    qo_smem2, k_smem, v_smem, lse_smem2 = smem_buffers
    k_barriers, v_barriers, q_barriers = buffer_barriers
    k_consumed_barriers, v_consumed_barriers = consumed_barriers

    def perform_schedule_barrier():
      plgpu.barrier_arrive(schedule_barrier)
      plgpu.barrier_wait(schedule_barrier)

    if causal:
      block_q_end = (lax.axis_index("q_seq") + 1) * (2 * block_q)
      block_max_kv_steps = pl.cdiv(block_q_end, jnp.array(block_kv, jnp.int32))
    else:
      block_max_kv_steps = kv_seq_len // block_kv

    @pl.when(wg_idx < 2)
    def _compute_wg():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg_idx]
      lse_smem = lse_smem2.at[wg_idx]
      q_seq_base = lax.axis_index("q_seq") * (2 * block_q) + wg_idx * block_q
      if causal:
        kv_steps = pl.cdiv(q_seq_base + block_q, jnp.array(block_kv, jnp.int32))
      else:
        kv_steps = block_max_kv_steps

      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_seq_base, block_q), q_head], qo_smem,
                              q_barriers.at[wg_idx])
      plgpu.barrier_wait(q_barriers.at[wg_idx])

      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, dtype=jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((block_q,), 0, dtype=jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, dtype=jnp.float32),
                              plgpu.Layout.WGMMA)

      @pl.when(kv_steps > 0)
      def _():
        plgpu.barrier_wait(k_barriers.at[0])

      pl.when(wg_idx == 1)(perform_schedule_barrier)

      def kv_loop(kv_step, carry, causal: bool = False):
        acc, m_i, l_i = carry
        slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          perform_schedule_barrier()
          return acc_ref[...]
        qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_consumed_barriers.at[slot])

        if causal:
          q_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0,
                                         layout=plgpu.Layout.WGMMA)
          kv_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                          layout=plgpu.Layout.WGMMA)
          mask = (q_ids + q_seq_base) >= (kv_ids + kv_step * block_kv)
          qk = jnp.where(mask, qk, -jnp.inf)

        # Online softmax in base 2 (m_i is in units of scaled logits x log2 e).
        m_ij = jnp.maximum(m_i, qk.max(axis=1) * exp2_scale)
        alpha = jnp.exp2(m_i - m_ij)
        m_i = m_ij
        p = jnp.exp2(qk * exp2_scale - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i *= alpha
        p16 = p.astype(dtype)

        def end_softmax_barriers():
          plgpu.barrier_arrive(schedule_barrier)  # Done with the softmax.
          plgpu.barrier_wait(v_barriers.at[slot])
          plgpu.barrier_wait(schedule_barrier)  # Wait until the tensor cores are free.
        # The upstream kernel's ordering (measured there to matter for speed).
        if head_dim <= 128:
          l_i += p.sum(axis=1)
          acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
          end_softmax_barriers()
        else:
          end_softmax_barriers()
          l_i += p.sum(axis=1)

        def compute_pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_step = kv_step + 1
          wait_slot = lax.rem(wait_step, jnp.array(max_concurrent_steps, kv_step.dtype))

          @pl.when(wait_step < kv_steps)
          def _wait():
            plgpu.barrier_wait(k_barriers.at[wait_slot])
        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed_barriers.at[slot])
        return acc, m_i, l_i

      if not causal:
        acc, m_i, l_i = lax.fori_loop(0, block_max_kv_steps, kv_loop, (acc, m_i, l_i))
      else:
        def epilogue_kv_loop(kv_step, _):
          # Consume the blocks the memory warpgroup loaded for the other warpgroup's longer rows.
          slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
          plgpu.barrier_arrive(k_consumed_barriers.at[slot])
          plgpu.barrier_arrive(v_consumed_barriers.at[slot])
          perform_schedule_barrier()
          perform_schedule_barrier()

        causal_kv_loop = functools.partial(kv_loop, causal=True)
        full_kv_steps = lax.div(q_seq_base, jnp.array(block_kv, jnp.int32))
        # Blocks wholly below the diagonal skip the mask; blocks crossing it apply it.
        acc, m_i, l_i = lax.fori_loop(0, full_kv_steps, kv_loop, (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(full_kv_steps, kv_steps, causal_kv_loop, (acc, m_i, l_i))
        lax.fori_loop(kv_steps, block_max_kv_steps, epilogue_kv_loop, None)
      pl.when(wg_idx == 0)(perform_schedule_barrier)

      acc /= lax.broadcast_in_dim(l_i, (block_q, head_dim), [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = m_i * _LN2 + jnp.log(l_i)  # Natural log of sum(exp(scaled logits)).
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_seq_base, block_q), q_head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(q_seq_base, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg_idx == 2)
    def _memory_wg():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(q_head, jnp.array(q_heads_per_kv_head, q_head.dtype))
      for i in range(max_concurrent_steps):
        s = (batch, pl.ds(i * block_kv, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[i], k_barriers.at[i])
        plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[i], v_barriers.at[i])

      @pl.loop(0, block_max_kv_steps - max_concurrent_steps)
      def _kv_loop(kv_step):
        tma_step = kv_step + max_concurrent_steps
        tma_slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
        s = (batch, pl.ds(tma_step * block_kv, block_kv), kv_head)
        plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
        plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[tma_slot], k_barriers.at[tma_slot])
        plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
        plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[tma_slot], v_barriers.at[tma_slot])

  def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):
    compute_wgs = 2
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    qo_scratch = plgpu.SMEM((compute_wgs, block_q, head_dim), dtype, transforms=transforms)
    k_scratch = plgpu.SMEM((max_concurrent_steps, block_kv, head_dim), dtype,
                           transforms=transforms)
    v_scratch = plgpu.SMEM((max_concurrent_steps, block_kv, head_dim), dtype,
                           transforms=transforms)
    lse_scratch = plgpu.SMEM((compute_wgs, block_q), jnp.float32)
    pl.run_scoped(
        lambda *args: kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, args),
        [qo_scratch, k_scratch, v_scratch, lse_scratch],
        (plgpu.Barrier(num_barriers=max_concurrent_steps),
         plgpu.Barrier(num_barriers=max_concurrent_steps),
         plgpu.Barrier(num_barriers=compute_wgs)),
        (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_concurrent_steps),) * 2,
        plgpu.Barrier(num_arrivals=compute_wgs),
        collective_axes="wg",
    )

  num_q_tiles = q_seq_len // (2 * block_q)
  # The LSE keeps T minor so each warpgroup writes its block_q values with one 1-D TMA copy.
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
              jax.ShapeDtypeStruct((batch_size, num_q_heads, q_seq_len), jnp.float32)]
  kwargs = {"interpret": interpret} if interpret else {}
  out, lse = plgpu.kernel(
      entry, out_type=out_type, grid=(num_q_heads, num_q_tiles, batch_size),
      grid_names=("heads", "q_seq", "batch"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs,
  )(q, k, v)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, causal, scale, sizes):
  return _forward(q, k, v, causal=causal, scale=scale, sizes=sizes)


def _flash_fwd(q, k, v, causal, scale, sizes):
  out, lse = _forward(q, k, v, causal=causal, scale=scale, sizes=sizes)
  return (out, lse), (q, k, v, out, lse)


def _flash_bwd(causal, scale, sizes, residuals, cotangents):
  from kernels_pallas import flash_attention_gpu
  q, k, v, out, lse = residuals
  do, dlse = cotangents
  b, t, _, h = q.shape
  s = k.shape[1]
  meta = common.build_meta(b, t, s, t, s)
  cfg = MaskConfig(causal=causal, scale=scale)
  triton = for_shapes(None, "gpu", t, s, h)
  dq, dk, dv = flash_attention_gpu._backward(q, k, v, meta, out, lse, do, dlse, cfg, triton,
                                             False, False)
  return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_sizes"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    scale: Optional[float] = None,
                    block_sizes: Optional[HopperBlockSizes] = None):
  """Flash attention on Hopper, differentiable in q, k, v (and through the LSE).

  Args:
    q: [B, T, N, H] float16/bfloat16 queries.
    k: [B, S, K, H] keys; N % K == 0 (query head n reads kv head n // (N // K)).
    v: [B, S, K, H] values.
    causal: mask key index > query index.
    scale: logit scale (default 1/sqrt(H)).
    block_sizes: tiles (default: this module's table for H, block_kv shrunk to divide S).

  Returns:
    out [B, T, N, H] in q's dtype and lse [B, N, T] float32 (natural log).

  Raises:
    ValueError: for a call outside the kernel's scope (the message says which limit).
  """
  common.validate_inputs(q, k, v, None, None, None, None, None, None, None)
  h = q.shape[-1]
  scale = float(h ** -0.5 if scale is None else scale)
  reason = unsupported_reason(q, k, v=v, causal=causal, has_mask_arrays=False, local_window=None,
                              softcap=None, interpret=False, scale=scale, sizes=block_sizes)
  if reason is None and jax.default_backend() == "gpu" and not is_hopper():
    reason = f"it needs an sm_90 GPU (H100/H200), not a {jax.devices()[0].device_kind}"
  if reason is not None:  # (On CPU it still traces, so that its lowering can be tested.)
    raise ValueError(f"flash_attention_hopper cannot serve this call: {reason}; use "
                     "kernels_pallas.flash_attention_gpu.flash_attention")
  sizes = _fitted(block_sizes or default_block_sizes(h), k.shape[1])
  return _flash(q, k, v, causal, scale, sizes)
