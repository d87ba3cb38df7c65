"""Tile sizes of the attention kernels, with a default table per kernel style.

Block sizes never change results (beyond float rounding order), only speed and on-chip memory. The
tables are starting points from public tuning reports (REFERENCES 3): Triton FlashAttention-2 on
A100/H100 runs 128x64 forward tiles with 4-8 warps; TPU v5e/v6e want 512-1024-wide blocks, 128 being
far too small. `for_shapes` clamps a table entry to short sequences, keeping the hardware's minimum
tile (16 rows for a Triton `dot`, 8 sublanes x 128 lanes on TPU) so small shapes still lower.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from kernels_pallas.common import next_pow2, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of one flash-attention call.

  Attributes:
    block_q: query rows per forward program.
    block_k: keys per inner step of the forward pass.
    block_q_bwd: query rows per step of both backward kernels (dq and dkv).
    block_k_bwd: keys per step of both backward kernels.
    num_warps: Triton warps per program (GPU style only; None: by head_dim).
    num_stages: Triton software-pipelining depth (GPU style only).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: Optional[int] = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name}={value} must be a positive power of two (Triton "
                         "tiles are powers of two and padding assumes nested block multiples)")


# (style, max head_dim) -> default. The first row whose head_dim bound covers the call wins.
# GPU rows for head_dim 64 and 128 were checked on an H200 (jax 0.11.2, 2026-11-29; bf16, causal,
# GQA 8:1, B=4, S=4096; `benchmarks/gpu_check.py --sections sweep`, RESULTS.md): for head_dim 128,
# 4 warps instead of 8 took the forward from 214 to 240 TFLOP/s and forward+backward from 142 to
# 245 (why was not profiled). head_dim 64's row was the sweep's best forward+backward.
_GPU_TABLE = (
    (64, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                    num_stages=3)),
    (128, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                     num_stages=2)),
    (256, BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32, num_warps=8,
                     num_stages=2)),
)
_TPU_TABLE = (
    (128, BlockSizes(block_q=512, block_k=1024, block_q_bwd=512, block_k_bwd=512)),
    (256, BlockSizes(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256)),
)
# Smallest tile per axis: Triton's dot needs 16x16; TPU blocks need 8 sublanes and 128 lanes (the
# key axis is the lane axis of the logits tile) unless a block spans the whole padded axis.
_MIN_Q = {"gpu": 16, "tpu": 8}
_MIN_K = {"gpu": 16, "tpu": 128}


def default_block_sizes(style: str, head_dim: int) -> BlockSizes:
  """The table entry for `style` ("gpu" or "tpu") and `head_dim`."""
  table = {"gpu": _GPU_TABLE, "tpu": _TPU_TABLE}.get(style)
  if table is None:
    raise ValueError(f"unknown kernel style {style!r}; use 'gpu' or 'tpu'")
  for max_head_dim, sizes in table:
    if head_dim <= max_head_dim:
      return sizes
  raise ValueError(f"head_dim={head_dim} exceeds the largest supported {table[-1][0]} for the "
                   f"{style} kernels; use impl='chunked' or split the heads")


def for_shapes(sizes: Optional[BlockSizes], style: str, q_len: int, kv_len: int,
               head_dim: int) -> BlockSizes:
  """`sizes` (or the default) with blocks shrunk to the padded sequence lengths."""
  sizes = default_block_sizes(style, head_dim) if sizes is None else sizes
  fit_q = max(_MIN_Q[style], next_pow2(q_len))
  fit_k = max(_MIN_K[style], next_pow2(kv_len))
  return dataclasses.replace(
      sizes, block_q=min(sizes.block_q, fit_q), block_k=min(sizes.block_k, fit_k),
      block_q_bwd=min(sizes.block_q_bwd, fit_q), block_k_bwd=min(sizes.block_k_bwd, fit_k))


def padded_lengths(sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Sequence lengths padded to a multiple of every block (all powers of two, so of the largest)."""
  return (round_up(q_len, max(sizes.block_q, sizes.block_q_bwd)),
          round_up(kv_len, max(sizes.block_k, sizes.block_k_bwd)))


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiles of the split-K decode kernel.

  Attributes:
    block_k: keys per inner step.
    num_splits: key splits processed by separate programs and merged by their LSE (flash
      decoding); None picks enough splits to fill ~128 streaming multiprocessors.
    num_warps: Triton warps per program.
  """

  block_k: int = 128
  num_splits: Optional[int] = None
  num_warps: int = 4

  def splits_for(self, batch: int, kv_heads: int, kv_len: int) -> int:
    if self.num_splits is not None:
      return max(1, min(self.num_splits, -(-kv_len // self.block_k)))
    want = -(-128 // max(1, batch * kv_heads))
    return max(1, min(want, kv_len // (4 * self.block_k), 32))
