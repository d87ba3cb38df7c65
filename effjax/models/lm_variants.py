"""Decoder LM variants. Byte-level vocabulary (see `effjax.data.tokenizer`): 259 ids padded to 264."""

from effjax.models.lm import LMConfig
from effjax.models.registry import register

BYTE_VOCAB = 264


@register("lm/tiny")
def tiny() -> LMConfig:
  """Smoke-test size: 2 layers, width 64 (~50k parameters)."""
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=192, max_len=256)


@register("lm/draft")
def draft() -> LMConfig:
  """Draft for speculative decoding: 2 layers, width 128 (~0.4M parameters)."""
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32, mlp_dim=384, max_len=1024)


@register("lm/small")
def small() -> LMConfig:
  """CPU target: 6 layers, width 256 (~4.8M parameters)."""
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4,
                  head_dim=32, mlp_dim=768, max_len=1024)


@register("lm/medium")
def medium() -> LMConfig:
  """CPU target past a 32 MB L3: 8 layers, width 384 (~13.9M parameters, 53 MB in float32).

  lm/small's 19 MB fit the last-level cache of some CPUs (AMD Zen 4's 32 MB), where its one-token
  decode step is no longer memory-bound and speculative decoding has little to win; this one's
  weights come from DRAM on such machines, the regime the technique is built for.
  """
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=384, num_layers=8, num_heads=6, num_kv_heads=2,
                  head_dim=64, mlp_dim=1152, max_len=1024)


@register("lm/large")
def large() -> LMConfig:
  """CPU target far past a 32 MB L3: 10 layers, width 512 (~31.5M parameters, 126 MB in float32).

  The shape of benchmarks/decode.py's `large`: every decode step streams its weights from DRAM.
  """
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=512, num_layers=10, num_heads=8, num_kv_heads=4,
                  head_dim=64, mlp_dim=1536, max_len=1024)


@register("lm/base")
def base() -> LMConfig:
  """Accelerator-sized: 12 layers, width 768, GQA 12:4 (~85M parameters)."""
  return LMConfig(vocab_size=BYTE_VOCAB, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                  head_dim=64, mlp_dim=2048, max_len=2048, dtype="bfloat16")


@register("lm/llama3_2_1b")
def llama3_2_1b() -> LMConfig:
  """Llama-3.2-1B shapes (tied embeddings, Llama-3 RoPE scaling)."""
  return LMConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                  head_dim=64, mlp_dim=8192, max_len=131072, rope_theta=500000.0,
                  rope_scaling=(32.0, 1.0, 4.0, 8192), tie_embeddings=True, dtype="bfloat16",
                  param_dtype="bfloat16")


@register("lm/llama3_8b")
def llama3_8b() -> LMConfig:
  """Llama-3.1-8B shapes (untied embeddings, Llama-3 RoPE scaling)."""
  return LMConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                  head_dim=128, mlp_dim=14336, max_len=131072, rope_theta=500000.0,
                  rope_scaling=(8.0, 1.0, 4.0, 8192), tie_embeddings=False, dtype="bfloat16",
                  param_dtype="bfloat16")
