"""Pallas attention kernels, one per file, each with its `BlockSizes` and a `jnp` reference.

* `flash_attention_gpu.flash_attention`: FlashAttention-2, Triton style (GPU).
* `flash_attention_hopper.flash_attention`: FlashAttention-3-style forward in Mosaic GPU (sm_90
  only, no interpreter), with the Triton backward.
* `flash_attention_tpu.flash_attention`: FlashAttention-2, Mosaic style (TPU).
* `decode_attention.decode_attention`: split-K decoding over a KV cache (GPU).
* `reference.attention_reference`: dense `jnp` attention with the same mask semantics.

All but the Hopper kernel run on CPU with `interpret=True`. `effjax.attention.dot_product_attention(impl="pallas")` is the
entry point models use; it picks the kernel by backend.
"""

from kernels_pallas.block_sizes import BlockSizes, DecodeBlockSizes, default_block_sizes
from kernels_pallas.common import MASK_VALUE

__all__ = ["BlockSizes", "DecodeBlockSizes", "MASK_VALUE", "default_block_sizes"]
