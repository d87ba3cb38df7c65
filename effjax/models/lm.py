"""Decoder-only language model of the Llama family, with an explicit KV cache.

Read top to bottom: config -> cache -> RMSNorm -> RoPE -> Attention -> MLP -> Block -> LM.

The model is a pure function of (params, tokens, positions, cache). Attention writes the new keys and
values of every call at each row's `cache.lengths[b]` and returns the cache with `lengths + T`; callers
that accept fewer tokens (prefill of ragged prompts, speculative rollback) simply set `lengths` back.
Slots past a row's length are stale and masked, so rollback never copies.

Einsum letters: B batch, T new tokens, S cache slots, D model width, N query heads, K kv heads,
H head dim, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import MaskSpec, dot_product_attention
from effjax.attention.xla import unflatten_kv
from effjax.models.numerics import Numerics
from effjax.ops import few_row_matmul



@dataclasses.dataclass(frozen=True)
class LMConfig(Numerics):
  """Shape and numerics of a decoder LM. Frozen so it can be a static jit argument.

  `rope_scaling` follows transformers' Llama-3 convention: a tuple of
  (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), or None.
  """

  vocab_size: int = 264
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  max_len: int = 512
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple[float, float, float, int]] = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  attention_kv_chunk: int = 512
  attention_interpret: Optional[bool] = None  # Force Pallas interpret mode (None: env / CPU default).
  # "auto": cached calls with few new tokens per row use effjax.ops.few_row_matmul on CPU
  # (float32, or bfloat16 activations and weights); "xla": always XLA's dot.
  matmul_impl: str = "auto"
  matmul_precision: str = "default"  # "highest" for bit-exactness tests
  remat: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                       f"{self.num_kv_heads} (grouped-query attention)")
    if self.matmul_impl not in ("auto", "xla"):
      raise ValueError(f"matmul_impl={self.matmul_impl!r}: use 'auto' (the CPU few-row kernel "
                       "where it applies) or 'xla'")
    self.check_numerics()

  def uses_few_row_matmul(self, cached: bool, tokens_per_row: int) -> bool:
    """Whether a call's weight matmuls go to the CPU few-row kernel (decided at trace time)."""
    return (cached and self.matmul_impl == "auto"
            and tokens_per_row <= few_row_matmul.MAX_TOKENS_PER_ROW
            and few_row_matmul.unsupported_reason(self.compute_dtype, self.weight_dtype) is None)

  def weight_bytes(self) -> int:
    return self.num_params() * jnp.dtype(self.weight_dtype).itemsize

  def weights_stream(self) -> bool:
    """Whether decode steps stream this model's weights past the L2 caches (a few-row kernel hint)."""
    return few_row_matmul.streams_from_memory(self.weight_bytes())

  def weights_in_blocks(self) -> bool:
    """Whether the few-row kernel reads this model's weights in L1-sized blocks (`stream`)."""
    return few_row_matmul.reads_in_blocks(self.weight_bytes())

  def num_params(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    per_layer = attn + mlp + 2 * self.d_model
    embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + self.d_model


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values in fixed-size buffers, plus each row's number of valid slots.

  The buffers are heads-major and flattened, [B*K, S, H]: kv head j of row b is the contiguous
  [S, H] matrix at index b * K + j. Decode attention is then one batched matmul per layer over
  B*K blocks that reads the buffer in place; the [B, S, K, H] layout this replaced made XLA:CPU
  transpose every layer's cache on every step (10-20% of decoding time, RESULTS.md).

  Attributes:
    k: tuple over layers of [B*K, S, H].
    v: tuple over layers of [B*K, S, H].
    lengths: [B] int32, valid slots per row.
  """

  k: tuple
  v: tuple
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def kv_heads(self) -> int:
    return self.k[0].shape[0] // self.lengths.shape[0]

  def row(self, r) -> "KVCache":
    """Row `r` (an int or a traced scalar) alone, as a batch-1 cache."""
    k = self.kv_heads
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, r * k, k, axis=0)
    return KVCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)),
                   lengths=jax.lax.dynamic_slice_in_dim(self.lengths, r, 1))

  def row_view(self, x: jax.Array) -> jax.Array:
    """One layer's [B*K, S, H] buffer as [B, S, K, H] (a copy; for inspection and tests)."""
    return unflatten_kv(x, self.lengths.shape[0])

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    """Rollback (or commit) by length alone: no data moves."""
    return self.replace(lengths=lengths.astype(jnp.int32))


def init_cache(config: LMConfig, batch: int, max_len: Optional[int] = None,
               dtype: Any = None) -> KVCache:
  """An empty cache of `max_len` slots (default `config.max_len`)."""
  max_len = config.max_len if max_len is None else max_len
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (batch * config.num_kv_heads, max_len, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


@flax.struct.dataclass
class Output:
  """What the LM returns.

  Attributes:
    logits: [B, T, V] float32.
    cache: the updated KVCache (None when called without one).
    hidden_states: [B, T, D] final hidden states after the last norm (Medusa heads read these).
    layer_hidden: tuple of [B, T, D], the input of each block then the last block's output
      (before the final norm), when `return_layer_hidden=True`; else ().
  """

  logits: jax.Array
  cache: Optional[KVCache]
  hidden_states: jax.Array
  layer_hidden: tuple = ()


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Match transformers: cast to the activation dtype before the weight multiply.
    return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: Optional[tuple[float, float, float, int]] = None) -> np.ndarray:
  """Inverse frequencies [H/2], with Llama-3 band-wise scaling when `scaling` is given."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  if scaling is None:
    return inv_freq
  factor, low_ff, high_ff, old_len = scaling
  low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles, each [B, T, 1, H] float32, for `positions` [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
  return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def rope_cos_sin_once(positions: jax.Array,
                      inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """`rope_cos_sin`, evaluated once per forward however many layers and heads use it.

  XLA:CPU fuses the cos and sin into every consumer, each layer's q and k rotation, and evaluates
  them there once per output element: per head, per layer. In a `large` batch-8 decode step that
  was 16 us for q and 10 us for k per layer, ~3.5% of the step (RESULTS.md, "RoPE tables once per
  forward"). `jax.lax.optimization_barrier` does not stop it (XLA:CPU drops the barrier before
  fusing); a conditional does: its operands and results are buffers that fusion cannot cross. Both
  branches are this same function, so the predicate (one XLA does not fold) does not change the
  values. Other platforms fuse well and would pay for a conditional, so they get `rope_cos_sin` as
  it is (chosen by the platform the program is lowered for). Under `jax.vmap` with batched positions
  the conditional becomes a select and the saving is lost (the values stay the same).
  """
  tables = lambda p: rope_cos_sin(p, inv_freq)
  if positions.size == 0:
    return tables(positions)
  once = lambda p: jax.lax.cond(p.reshape(-1)[0] >= 0, tables, tables, p)
  return jax.lax.platform_dependent(positions, cpu=once, default=tables)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [B, T, heads, H] by `rope_cos_sin`'s tables (transformers' rotate_half convention)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def _dense_param(module, name, shape, axes, dtype, fan_in):
  init = nn.initializers.normal(stddev=fan_in ** -0.5)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _write_cache(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes new [B, T, K, H] into buf [B*K, S, H] at per-row slot `starts` [B].

  One scatter; slots past the end are dropped (callers check lengths before decoding).
  """
  b, t, k, h = new.shape
  new = jnp.swapaxes(new, 1, 2).reshape(b * k, t, h).astype(buf.dtype)  # [B*K, T, H]
  blocks = jnp.arange(b * k, dtype=jnp.int32)[:, None]  # [B*K, 1]
  slots = jnp.repeat(starts, k)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B*K, T]
  if buf.dtype == jnp.bfloat16:
    # XLA:CPU has no bfloat16 scatter: it widened the whole cache to float32 and back around the
    # write, every layer and step (55% of `large`'s bfloat16 decoding). The same bits as uint16
    # are written in place.
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    out = bits(buf).at[blocks, slots].set(bits(new), mode="drop", unique_indices=True)
    return jax.lax.bitcast_convert_type(out, jnp.bfloat16)
  return buf.at[blocks, slots].set(new, mode="drop", unique_indices=True)


# The variable collection `pack_weights` adds: the few-row kernel's packed copies of the weights
# multiplied in `_project`, each as the [Din, Dout] matrix the kernel sees. Projections that read
# the same input are packed side by side and multiplied in one call: q, k and v as "wqkv"
# [D, (N + 2K) H], gate and up as "gate_up" [D, 2F] (`_FUSED`).
PACKED_WEIGHTS = "packed_weights"
_PROJECTIONS = ("wq", "wk", "wv", "wo", "gate", "up", "down", "lm_head")
_FUSED = {"wqkv": ("wq", "wk", "wv"), "gate_up": ("gate", "up")}


def _as_matrix(name: str, w: jax.Array) -> jax.Array:
  """A projection weight as `_project` multiplies it: [Din, Dout]."""
  return w.reshape(-1, w.shape[-1]) if name == "wo" else w.reshape(w.shape[0], -1)


def pack_weights(variables, config: LMConfig, force: bool = False) -> dict:
  """{"params": ..., "packed_weights": the few-row kernel's packed projection weights}.

  Call it once after loading, outside jit, and decode with the result: cached calls then read
  each weight panel front to back (effjax.ops.few_row_matmul.pack), with the same results bit for
  bit, at the price of a second copy of the weights in memory. Measured end to end
  (benchmarks/decode.py, RESULTS.md) it pays for models whose weights stream past the cores'
  caches every step (`LMConfig.weights_stream`: 1.05-1.22x faster generation for the 126 MB
  `large` model) and not for ones the L2 caches hold, so for those it is a no-op unless `force` - as
  it is when the copies are there already, or where the kernel does not serve this config (other
  backends, mixed float32 / bfloat16, matmul_impl "xla"). A no-op still returns `{"params": ...}`
  variables.

  q, k and v are packed as one matrix and so are gate and up (`_FUSED`): a decode step then makes
  4 matmul calls per layer instead of 7, each output column computed exactly as before (the
  kernel's columns are independent). That saves each call's fixed cost (~5 us): 7.5% of lm/small's
  batch-1 generation, 2% of `large`'s (RESULTS.md, "Fused projections").

  The copies are a snapshot: after any change to the params (training, an edit) pack again, and
  do not differentiate through cached calls of packed variables (their projection gradients go to
  the copies). Traced inside a jitted loop's body it would re-pack every step: XLA neither hoists
  the copy out of a loop nor, without the barrier below, keeps it out.
  """
  variables = variables if isinstance(variables, Mapping) and "params" in variables else {
      "params": variables}
  if (PACKED_WEIGHTS in variables or not config.uses_few_row_matmul(True, 1)
      or not (force or config.weights_stream())):
    return dict(variables)

  def packed(tree):
    out, in_fused = {}, set()
    for fused, parts in _FUSED.items():
      if all(part in tree for part in parts):
        out[fused] = few_row_matmul.pack(jnp.concatenate(
            [_as_matrix(part, tree[part]) for part in parts], axis=1))
        in_fused.update(parts)
    for name, value in tree.items():
      if isinstance(value, Mapping):
        out[name] = packed(value)
      elif name in _PROJECTIONS and name not in in_fused:
        out[name] = few_row_matmul.pack(_as_matrix(name, value))
    return out
  copies = packed(nn.unbox(variables["params"]))
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(copies)):
    # Under jit: keeps XLA from sinking the copies into the caller's loop (its fusible-op sinking
    # otherwise re-packs every weight on every iteration). Eagerly it would only copy them again.
    copies = jax.lax.optimization_barrier(copies)
  return {**variables, PACKED_WEIGHTS: copies}


def _packed(module: nn.Module, name: str) -> Optional[jax.Array]:
  """`pack_weights`' copy of the module's weight `name`, when the caller packed them."""
  if module.has_variable(PACKED_WEIGHTS, name):
    return module.get_variable(PACKED_WEIGHTS, name)
  return None


def _project(x, w, cfg: LMConfig, few_rows: bool, equation: str,
             packed: Optional[jax.Array] = None):
  """x [B, T, Din] times w [Din, ...] (`equation` for XLA's einsum) -> [B, T, ...].

  `packed`: `pack_weights`' copy of w, which the kernel reads instead (in blocks from L1).
  """
  if few_rows:  # The kernel wants w as [Din, Dout]; the reshapes are free (row-major).
    if packed is not None:
      out = few_row_matmul.matmul(x, packed, packed=True, stream=cfg.weights_in_blocks())
    else:
      out = few_row_matmul.matmul(x, w.reshape(w.shape[0], -1), stream=cfg.weights_in_blocks())
    return out.reshape(*x.shape[:-1], *w.shape[1:])
  return jnp.einsum(equation, x, w.astype(cfg.compute_dtype), precision=cfg.precision)


class Attention(nn.Module):
  config: LMConfig
  few_rows: bool = False  # Weight matmuls through effjax.ops.few_row_matmul (LMConfig docs).
  # Positions are arange(T) (a full forward given none): the mask then omits them, which means the
  # same, and lets kernels that take no position arrays serve it (the Hopper flash attention).
  default_positions: bool = False

  @nn.compact
  def __call__(self, x, positions, layer_k=None, layer_v=None, lengths=None, segment_ids=None,
               new_token_mask=None, rope=None):
    """`rope`: `rope_cos_sin(positions, ...)`, computed once for all layers (None: here)."""
    cfg = self.config
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, prec = cfg.weight_dtype, cfg.precision
    wq = _dense_param(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), pdt, d)
    wk = _dense_param(self, "wk", (d, k, h), ("embed", "kv_heads", "head_dim"), pdt, d)
    wv = _dense_param(self, "wv", (d, k, h), ("embed", "kv_heads", "head_dim"), pdt, d)
    wo = _dense_param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), pdt, n * h)
    few_rows = self.few_rows
    wqkv = _packed(self, "wqkv")
    if few_rows and wqkv is not None:  # pack_weights' q, k and v side by side: one call.
      qkv = few_row_matmul.matmul(x, wqkv, packed=True,
                                  stream=cfg.weights_in_blocks())  # [B, T, (N + 2K) H]
      q, key, val = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
      q = q.reshape(*x.shape[:-1], n, h)  # [B, T, N, H]
      key, val = (a.reshape(*x.shape[:-1], k, h) for a in (key, val))  # [B, T, K, H]
    else:
      q = _project(x, wq, cfg, few_rows, "btd,dnh->btnh", _packed(self, "wq"))  # [B, T, N, H]
      key = _project(x, wk, cfg, few_rows, "btd,dkh->btkh", _packed(self, "wk"))  # [B, T, K, H]
      val = _project(x, wv, cfg, few_rows, "btd,dkh->btkh", _packed(self, "wv"))  # [B, T, K, H]
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    if rope is None:
      rope = rope_cos_sin(positions, rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling))
    q, key = rotate(q, *rope), rotate(key, *rope)

    t = x.shape[1]
    if layer_k is None:  # Training / full forward: attend within the new tokens.
      all_k, all_v = key, val
      mask_positions = None if self.default_positions else positions
      spec = MaskSpec(q_positions=mask_positions, kv_positions=mask_positions, causal=True,
                      q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    else:
      all_k = _write_cache(layer_k, key, lengths)  # [B*K, S, H]
      all_v = _write_cache(layer_v, val, lengths)
      if new_token_mask is None:
        # Slot index == absolute position for ordinary decoding, so causality compares positions.
        spec = MaskSpec(q_positions=lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None],
                        kv_lengths=lengths + t, causal=True)
      else:
        # Tree attention: the prefix is fully visible, new tokens see what new_token_mask allows.
        spec = MaskSpec(kv_lengths=lengths + t, tree_mask=new_token_mask)
    out = dot_product_attention(q, all_k, all_v, spec, impl=cfg.attention_impl,
                                kv_chunk=cfg.attention_kv_chunk, precision=prec,
                                interpret=cfg.attention_interpret,
                                kv_layout="bskh" if layer_k is None else "flat")  # [B, T, N, H]
    # As one [B, T, N*H] x [N*H, D] matmul: written as "btnh,nhd->btd", XLA:CPU transposed wo into
    # [H, N, D] on every call (15% of lm/small's decode step; tests/test_decode_step_hlo.py).
    out = _project(out.reshape(out.shape[0], t, n * h), wo.reshape(n * h, d), cfg,
                   self.few_rows, "btf,fd->btd", _packed(self, "wo"))  # [B, T, D]
    if layer_k is None:
      return out, None, None
    return out, all_k, all_v


class MLP(nn.Module):
  config: LMConfig
  few_rows: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f = cfg.d_model, cfg.mlp_dim
    gate = _dense_param(self, "gate", (d, f), ("embed", "mlp"), cfg.weight_dtype, d)
    up = _dense_param(self, "up", (d, f), ("embed", "mlp"), cfg.weight_dtype, d)
    down = _dense_param(self, "down", (f, d), ("mlp", "embed"), cfg.weight_dtype, f)
    few_rows = self.few_rows
    gate_up = _packed(self, "gate_up")
    if few_rows and gate_up is not None:  # pack_weights' gate and up side by side: one call.
      gu = few_row_matmul.matmul(x, gate_up, packed=True, stream=cfg.weights_in_blocks())
      g, u = jnp.split(gu, [f], axis=-1)  # [B, T, F] each
      hidden = nn.silu(g) * u  # [B, T, F]
    else:
      hidden = nn.silu(_project(x, gate, cfg, few_rows, "btd,df->btf", _packed(self, "gate"))) * (
          _project(x, up, cfg, few_rows, "btd,df->btf", _packed(self, "up")))  # [B, T, F]
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
    # [B, T, D]
    return _project(hidden, down, cfg, few_rows, "btf,fd->btd", _packed(self, "down"))


class Block(nn.Module):
  config: LMConfig
  few_rows: bool = False
  default_positions: bool = False  # See Attention.

  @nn.compact
  def __call__(self, x, positions, layer_k, layer_v, lengths, segment_ids, new_token_mask,
               rope=None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
    attn_out, new_k, new_v = Attention(cfg, self.few_rows, self.default_positions, name="attn")(
        norm("attn_norm")(x), positions, layer_k, layer_v, lengths, segment_ids, new_token_mask,
        rope)
    x = x + attn_out
    x = x + MLP(cfg, self.few_rows, name="mlp")(norm("mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, new_k, new_v


class LM(nn.Module):
  """Llama-family decoder. `__call__(tokens, positions, cache, ...) -> Output`."""

  config: LMConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None, segment_ids: Optional[jax.Array] = None,
               new_token_mask: Optional[jax.Array] = None,
               return_layer_hidden: bool = False) -> Output:
    """Runs T new tokens per row.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] RoPE positions (default: `cache.lengths + arange(T)`, or `arange(T)`).
      cache: KVCache to read and extend, or None for a full (training) forward.
      segment_ids: [B, T] for packed / padded training batches (no cache).
      new_token_mask: [B, T, T] bool, which new tokens each new token sees (tree attention);
        None means causal.
      return_layer_hidden: also return every block's input (for feature distillation).
    """
    cfg = self.config
    b, t = tokens.shape
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are for full forwards; a cached call masks by cache.lengths")
    default_positions = positions is None and cache is None
    if positions is None:
      base = cache.lengths[:, None] if cache is not None else jnp.zeros((b, 1), jnp.int32)
      positions = base + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    embed = self.param("embed", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    x = jnp.take(embed, tokens, axis=0).astype(cfg.compute_dtype)  # [B, T, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    block_cls = nn.remat(Block) if cfg.remat else Block
    few_rows = cfg.uses_few_row_matmul(cache is not None, t)
    # cos/sin of the rotary angles, once for every layer (see rope_cos_sin_once).
    rope = rope_cos_sin_once(
        positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    new_k, new_v, layer_hidden = [], [], []
    for i in range(cfg.num_layers):
      if return_layer_hidden:
        layer_hidden.append(x)
      lk = cache.k[i] if cache is not None else None
      lv = cache.v[i] if cache is not None else None
      x, k_i, v_i = block_cls(cfg, few_rows, default_positions, name=f"layer_{i}")(
          x, positions, lk, lv, cache.lengths if cache is not None else None, segment_ids,
          new_token_mask, rope)
      new_k.append(k_i)
      new_v.append(v_i)
    if return_layer_hidden:
      layer_hidden.append(x)
    hidden = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm")(x)
    if cfg.tie_embeddings and few_rows:
      logits = few_row_matmul.matmul(hidden, embed, transpose_w=True)  # [B, T, V]
    elif cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", hidden, embed.astype(cfg.compute_dtype),
                          precision=cfg.precision)
    else:
      head = _dense_param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                          cfg.weight_dtype, cfg.d_model)
      logits = _project(hidden, head, cfg, few_rows, "btd,dv->btv", _packed(self, "lm_head"))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                        ("batch", "length", "act_vocab"))  # [B, T, V]
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + t)
    return Output(logits=logits, cache=new_cache, hidden_states=hidden,
                  layer_hidden=tuple(layer_hidden))


def lm_head_matrix(params, config: LMConfig) -> jax.Array:
  """The [D, V] output projection (the transposed embedding when tied)."""
  p = params["params"] if "params" in params else params
  p = nn.unbox(p)
  return p["embed"].T if config.tie_embeddings else p["lm_head"]


def init_params(config: LMConfig, rng: jax.Array, seq_len: int = 8):
  """Unboxed float parameters for `config` (logical metadata dropped)."""
  model = LM(config)
  variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
  return nn.unbox(variables)


def random_params(config: LMConfig, seed: int):
  """Parameters drawn with numpy: std fan_in^-1/2, norm scales near 1, in `config.param_dtype`.

  No initializer is compiled, so tests and benchmarks get large random models in milliseconds.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) * fan_in ** -0.5, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)
