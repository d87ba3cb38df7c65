"""Medusa heads: K extra next-next-token predictors on the backbone's last hidden state.

Head k (0-based) reads the final-norm hidden state at position t and predicts the token at t + 2 + k;
the LM head itself predicts t + 1. Each head is `num_layers` residual SiLU blocks (zero-initialised, so a
fresh head is the identity on the hidden state) and a [D, V] projection copied from the LM head, so an
untrained head starts as "the next token again": a useful prior that training then shifts by k + 1.

Einsum letters: B batch, T positions, D model width, V vocabulary, K heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.models.lm import LMConfig, lm_head_matrix


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """Shape of the Medusa heads. Frozen so it can be a static jit argument.

  Attributes:
    num_heads: K, the number of extra future tokens proposed per step (Medusa uses 4-5).
    num_layers: residual SiLU blocks per head (Medusa uses 1).
    d_model: backbone width D (filled from the LM config by `for_lm`).
    vocab_size: backbone vocabulary V.
    matmul_precision: "default" | "high" | "highest", as in `LMConfig`.
  """

  num_heads: int = 4
  num_layers: int = 1
  d_model: int = 256
  vocab_size: int = 264
  matmul_precision: str = "default"

  def __post_init__(self):
    if self.num_heads < 1:
      raise ValueError(f"num_heads={self.num_heads}; Medusa needs at least one head")
    if self.num_layers < 0:
      raise ValueError(f"num_layers={self.num_layers} must be >= 0")

  @classmethod
  def for_lm(cls, lm_config: LMConfig, num_heads: int = 4, num_layers: int = 1) -> "HeadsConfig":
    """Heads sized for `lm_config` (same width, vocabulary and matmul precision)."""
    return cls(num_heads=num_heads, num_layers=num_layers, d_model=lm_config.d_model,
               vocab_size=lm_config.vocab_size, matmul_precision=lm_config.matmul_precision)

  @property
  def precision(self):
    return None if self.matmul_precision == "default" else self.matmul_precision

  def replace(self, **kw) -> "HeadsConfig":
    return dataclasses.replace(self, **kw)


class ResBlock(nn.Module):
  """x + SiLU(x W + b), with W and b zero-initialised so the block starts as the identity."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")),
                   (d, d), jnp.float32)
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (d,),
                   jnp.float32)
    return x + nn.silu(jnp.einsum("...d,de->...e", x, w, precision=self.precision) + b)


class MedusaHeads(nn.Module):
  """K heads. `__call__(hidden [..., D]) -> logits [..., K, V]` (float32)."""

  config: HeadsConfig

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config
    x = hidden.astype(jnp.float32)  # [..., D]
    outs = []
    for k in range(cfg.num_heads):
      h = x
      for i in range(cfg.num_layers):
        h = ResBlock(cfg.precision, name=f"head_{k}_block_{i}")(h)
      proj = self.param(f"head_{k}_proj", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.d_model ** -0.5), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.float32)
      outs.append(jnp.einsum("...d,dv->...v", h, proj, precision=cfg.precision))  # [..., V]
    return jnp.stack(outs, axis=-2)  # [..., K, V]


def init_heads(config: HeadsConfig, lm_params, lm_config: LMConfig, rng: jax.Array | None = None):
  """Unboxed head variables `{'params': ...}` with every projection copied from the LM head.

  Args:
    config: the heads' shape; must match `lm_config` (see `check_compatible`).
    lm_params: the backbone's variables (`{'params': ...}`), whose output projection is copied.
    lm_config: the backbone's config.
    rng: PRNG key (the blocks are zero-initialised, so it only matters for fresh projections).

  Returns:
    `{'params': {...}}` for `MedusaHeads(config).apply`.
  """
  if config.d_model != lm_config.d_model or config.vocab_size != lm_config.vocab_size:
    raise ValueError(f"HeadsConfig(d_model={config.d_model}, vocab_size={config.vocab_size}) does "
                     f"not match the backbone (d_model={lm_config.d_model}, vocab_size="
                     f"{lm_config.vocab_size}); build it with HeadsConfig.for_lm(lm_config)")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  variables = nn.unbox(MedusaHeads(config).init(rng, jnp.zeros((1, 1, config.d_model))))
  head = jnp.asarray(lm_head_matrix(lm_params, lm_config), jnp.float32)  # [D, V]
  params = dict(variables["params"])
  for k in range(config.num_heads):
    params[f"head_{k}_proj"] = head
  return {"params": params}


def infer_config(head_params) -> HeadsConfig:
  """Reads K, the block count, D and V back from a head parameter tree."""
  p = head_params["params"] if "params" in head_params else head_params
  p = nn.unbox(p)
  num_heads = sum(1 for name in p if name.endswith("_proj"))
  if num_heads == 0 or "head_0_proj" not in p:
    raise ValueError(f"not a Medusa head parameter tree (no head_<k>_proj entries); keys: {sorted(p)}")
  num_layers = sum(1 for name in p if name.startswith("head_0_block_"))
  d, v = p["head_0_proj"].shape
  return HeadsConfig(num_heads=num_heads, num_layers=num_layers, d_model=int(d), vocab_size=int(v))


def check_compatible(head_params, lm_config: LMConfig, heads_config: HeadsConfig | None = None):
  """Raises a clear error when heads were trained for another backbone (or another head shape).

  Args:
    head_params: head variables, e.g. restored from a checkpoint.
    lm_config: the backbone the heads will run on.
    heads_config: the head shape the caller expects, if any.
  """
  found = infer_config(head_params)
  if (found.d_model, found.vocab_size) != (lm_config.d_model, lm_config.vocab_size):
    raise ValueError(
        f"Medusa heads were trained for a backbone with d_model={found.d_model}, vocab_size="
        f"{found.vocab_size}, but this LM has d_model={lm_config.d_model}, vocab_size="
        f"{lm_config.vocab_size}; load the backbone the heads were trained on, or train heads for "
        "this one (experiments/train_medusa.py)")
  if heads_config is not None and (found.num_heads, found.num_layers) != (
      heads_config.num_heads, heads_config.num_layers):
    raise ValueError(
        f"head parameters have {found.num_heads} heads x {found.num_layers} blocks but the config "
        f"asks for {heads_config.num_heads} x {heads_config.num_layers}; set HeadsConfig to match "
        "the checkpoint")
  for name, leaf in (head_params["params"] if "params" in head_params else head_params).items():
    if name.endswith("_proj") and tuple(leaf.shape) != (found.d_model, found.vocab_size):
      raise ValueError(f"{name} has shape {tuple(leaf.shape)}, expected "
                       f"{(found.d_model, found.vocab_size)}; the head checkpoint is inconsistent")


def apply_heads(head_params, config: HeadsConfig, hidden: jax.Array) -> jax.Array:
  """Head logits [..., K, V] for hidden states [..., D]."""
  return MedusaHeads(config).apply(head_params, hidden)
