"""BERT encoder (post-LayerNorm, learned absolute positions), shaped to load real BERT checkpoints.

Read top to bottom: config -> embeddings -> SelfAttention -> Block -> BertEncoder -> pooling ->
variants. Sentence embeddings follow sentence-transformers: mean of the final hidden states over
real tokens, then L2 normalisation (all-MiniLM-L6-v2's modules.json).

Blocks are named `layer_{i}` as in the decoder LM, so `effjax.distill.student_init` copies layers of
either model family with one function.

Einsum letters: B batch, T tokens, D width, N heads, H head dim, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import MaskSpec, dot_product_attention
from effjax.models.numerics import Numerics
from effjax.models.registry import register

WORDPIECE_UNCASED = "wordpiece-bert-uncased-30522"


@dataclasses.dataclass(frozen=True)
class BertConfig(Numerics):
  """Shape and numerics of a BERT encoder. Frozen: usable as a static jit argument.

  `tokenizer` names the vocabulary, so distillation can refuse a student and a teacher that do
  not share one.
  """

  vocab_size: int = 30522
  d_model: int = 384
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  max_len: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  tokenizer: str = WORDPIECE_UNCASED
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  matmul_precision: str = "default"  # "highest" for parity tests

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
    self.check_numerics()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def num_params(self, include_embeddings: bool = True) -> int:
    d, f = self.d_model, self.mlp_dim
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    embed = (self.vocab_size + self.max_len + self.type_vocab_size) * d + 2 * d
    return self.num_layers * per_layer + (embed if include_embeddings else 0)


@flax.struct.dataclass
class BertOutput:
  """What the encoder returns.

  Attributes:
    hidden_states: [B, T, D] last block's output.
    embedding: [B, D] mean-pooled over real tokens and L2-normalised (sentence embedding).
    layer_hidden: tuple of [B, T, D]: the embeddings' output then each block's output, when
      `return_layer_hidden=True`; else ().
  """

  hidden_states: jax.Array
  embedding: jax.Array
  layer_hidden: tuple = ()


def _param(module, name, shape, axes, dtype, init=None):
  init = init or nn.initializers.normal(stddev=0.02)  # BERT's initializer_range
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # float32 statistics whatever the activation dtype: eps = 1e-12 vanishes in bfloat16.
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                      name=name)


class SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, token_mask):
    cfg = self.config
    d, n, h, dt, pdt, prec = (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.compute_dtype,
                              cfg.weight_dtype, cfg.precision)
    zeros = nn.initializers.zeros
    proj = {}
    for name in ("q", "k", "v"):
      w = _param(self, f"w{name}", (d, n, h), ("embed", "heads", "head_dim"), pdt)
      b = _param(self, f"b{name}", (n, h), ("heads", "head_dim"), pdt, zeros)
      proj[name] = (jnp.einsum("btd,dnh->btnh", x, w.astype(dt), precision=prec)
                    + b.astype(dt))  # [B, T, N, H]
    wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), pdt)
    bo = _param(self, "bo", (d,), ("embed",), pdt, zeros)
    # Segment ids 1 (real) / 0 (pad): real queries see only real keys, as BERT's additive mask does.
    seg = token_mask.astype(jnp.int32)  # [B, T]
    spec = MaskSpec(q_segment_ids=seg, kv_segment_ids=seg)
    out = dot_product_attention(proj["q"], proj["k"], proj["v"], spec, impl=cfg.attention_impl,
                                precision=prec)  # [B, T, N, H]
    return jnp.einsum("btnh,nhd->btd", out, wo.astype(dt), precision=prec) + bo.astype(dt)


class Block(nn.Module):
  """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, token_mask):
    cfg = self.config
    dt, pdt, prec = cfg.compute_dtype, cfg.weight_dtype, cfg.precision
    zeros = nn.initializers.zeros
    x = _layer_norm(cfg, "attn_norm")(x + SelfAttention(cfg, name="attn")(x, token_mask))
    x = x.astype(dt)
    wi = _param(self, "wi", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), pdt)
    bi = _param(self, "bi", (cfg.mlp_dim,), ("mlp",), pdt, zeros)
    wo = _param(self, "wo", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), pdt)
    bo = _param(self, "bo", (cfg.d_model,), ("embed",), pdt, zeros)
    hidden = nn.gelu(jnp.einsum("btd,df->btf", x, wi.astype(dt), precision=prec) + bi.astype(dt),
                     approximate=False)  # [B, T, F]; BERT's "gelu" is the erf form
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
    out = jnp.einsum("btf,fd->btd", hidden, wo.astype(dt), precision=prec) + bo.astype(dt)
    x = _layer_norm(cfg, "mlp_norm")(x + out).astype(dt)  # [B, T, D]
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def mean_pool(hidden: jax.Array, token_mask: jax.Array, normalize: bool = True) -> jax.Array:
  """[B, T, D] hidden states and [B, T] mask -> [B, D] float32 mean over real tokens.

  Clamps (count >= 1e-9, norm >= 1e-12) as sentence-transformers does, so an all-pad row gives
  zeros, not NaN.
  """
  m = token_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  pooled = jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  if not normalize:
    return pooled
  norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
  return pooled / jnp.maximum(norm, 1e-12)  # [B, D]


class BertEncoder(nn.Module):
  """BERT encoder: `__call__(ids, token_mask, type_ids=None) -> BertOutput`."""

  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array, token_mask: Optional[jax.Array] = None,
               type_ids: Optional[jax.Array] = None,
               return_layer_hidden: bool = False) -> BertOutput:
    """Encodes right- or arbitrarily-padded token ids.

    Args:
      ids: [B, T] int32 WordPiece ids.
      token_mask: [B, T], nonzero for real tokens (None: all real).
      type_ids: [B, T] segment (sentence A/B) ids (None: zeros).
      return_layer_hidden: also return every layer's output (for feature distillation).
    """
    cfg = self.config
    b, t = ids.shape
    if t > cfg.max_len:
      raise ValueError(f"{t} tokens exceed the {cfg.max_len} learned positions; truncate the "
                       "input (the tokenizer's max_len) or use a config with a larger max_len")
    token_mask = jnp.ones((b, t), jnp.int32) if token_mask is None else token_mask
    type_ids = jnp.zeros((b, t), jnp.int32) if type_ids is None else type_ids
    pdt = cfg.weight_dtype
    word = _param(self, "word_embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    pos = _param(self, "pos_embed", (cfg.max_len, cfg.d_model), (None, "embed"), pdt)
    typ = _param(self, "type_embed", (cfg.type_vocab_size, cfg.d_model), (None, "embed"), pdt)
    x = (jnp.take(word, ids, axis=0) + pos[None, :t]
         + jnp.take(typ, type_ids, axis=0))  # [B, T, D]
    x = _layer_norm(cfg, "embed_norm")(x).astype(cfg.compute_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    layer_hidden = [x] if return_layer_hidden else []
    for i in range(cfg.num_layers):
      x = Block(cfg, name=f"layer_{i}")(x, token_mask)
      if return_layer_hidden:
        layer_hidden.append(x)
    return BertOutput(hidden_states=x, embedding=mean_pool(x, token_mask),
                      layer_hidden=tuple(layer_hidden))


def init_params(config: BertConfig, rng: jax.Array, seq_len: int = 8):
  """Unboxed float parameters `{'params': ...}` for `config`."""
  variables = BertEncoder(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))
  return nn.unbox(variables)


@register("bert/minilm_l6")
def minilm_l6() -> BertConfig:
  """all-MiniLM-L6-v2's shapes: 6 layers, width 384, 12 heads (22.7M parameters, 11.7M embedding)."""
  return BertConfig()


@register("bert/minilm_l3")
def minilm_l3() -> BertConfig:
  """DistilBERT-style student of MiniLM-L6: the same widths, every other layer (3 layers)."""
  return BertConfig(num_layers=3)


@register("bert/tiny")
def tiny() -> BertConfig:
  """Smoke-test size: 2 layers, width 32, vocabulary 512 (random weights only)."""
  return BertConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64,
                    tokenizer="test-512")
