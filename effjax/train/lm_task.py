"""The LM task: next-byte prediction with `effjax.models.LM` on the `effjax.data` pipeline.

One user of the generic `effjax.train.loop.fit`: it supplies the model's `init_fn`, the masked
cross-entropy `loss_fn` and the data. Bits per byte (bpb) is the loss in bits: with the byte
tokenizer every target is one byte (BOS/EOS markers, about one per file, count as bytes too).

Config fields read here (besides those of `fit`): task ("lm"), model (a registry name such as
"lm/small"), model_overrides (LMConfig fields), data (`effjax.data.config.default_data_config()`),
seq_len, batch_size (global), eval_batches.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effjax.models import registry
from effjax.models.lm import LM, LMConfig
from effjax.train import loop
from effjax.train import tasks

_LM_FIELDS = {"model": str, "seq_len": int, "batch_size": int, "eval_batches": int}


def model_overrides(**values) -> ml_collections.ConfigDict:
  """`config.model_overrides`: one typed placeholder per LMConfig field, None meaning "the variant's
  value", so `--config.model_overrides.remat=True` works on a locked config (and is type-checked).

  Args:
    **values: overrides to set now, e.g. `matmul_precision="highest"`.
  """
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(LMConfig):
    typ = tuple if f.default is None else type(f.default)  # rope_scaling is the None-default one.
    out[f.name] = ml_collections.config_dict.placeholder(typ)
  for name, value in values.items():
    if name not in out:
      raise ValueError(f"model_overrides: {name!r} is not an LMConfig field")
    out[name] = value
  return out


def model_config(config) -> LMConfig:
  """The LMConfig from `config.model` and `config.model_overrides`, validated field by field.

  Override values of None (the placeholders of `model_overrides()`) keep the variant's value.
  """
  known = {f.name for f in dataclasses.fields(LMConfig)}
  overrides = {k: v for k, v in dict(config.get("model_overrides", None) or {}).items()
               if v is not None}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"config.model_overrides.{unknown[0]} is not an LMConfig field; known "
                     f"fields: {sorted(known)}")
  for name, value in overrides.items():
    default = getattr(LMConfig, name, None)
    if isinstance(value, list):
      overrides[name] = value = tuple(value)
    if default is not None and not isinstance(value, type(default)) and not (
        isinstance(default, float) and isinstance(value, int)):
      raise ValueError(f"config.model_overrides.{name}={value!r} must be "
                       f"{type(default).__name__} like LMConfig.{name}={default!r}")
  try:
    return registry.get(config.model, **overrides)
  except KeyError as e:
    raise ValueError(f"config.model={config.model!r}: {e.args[0]}") from None


def validate(config) -> LMConfig:
  """Checks every field the LM run reads; raises ValueError naming the bad one."""
  loop.validate_config(config)
  for name, typ in _LM_FIELDS.items():
    if name not in config:
      raise ValueError(f"config.{name} is missing; the LM task needs {sorted(_LM_FIELDS)}")
    if not isinstance(config[name], typ) or isinstance(config[name], bool):
      raise ValueError(f"config.{name}={config[name]!r} must be {typ.__name__}")
  if "data" not in config:
    raise ValueError("config.data is missing; use effjax.data.config.default_data_config()")
  from effjax.data import config as data_config  # Lazy: keeps `import effjax.train` light.
  data_config.validate_data_config(config.data)
  cfg = model_config(config)
  if config.seq_len < 1 or config.seq_len > cfg.max_len:
    raise ValueError(f"config.seq_len={config.seq_len} must be in [1, {cfg.max_len}] (the "
                     f"model's max_len); lower seq_len or raise model_overrides.max_len")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of the process "
                     f"count {jax.process_count()}")
  return cfg


def make_init_fn(cfg: LMConfig):
  """`rng -> params` boxed with logical axes (so `fit` can shard them)."""
  def init_fn(rng):
    return LM(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))
  return init_fn


def make_loss_fn(cfg: LMConfig):
  """`(params, batch, rng) -> (loss, metrics)`: mean next-byte cross-entropy over `mask`."""
  model = LM(cfg)

  def loss_fn(params, batch, rng):
    del rng  # The LM has no dropout.
    out = model.apply(params, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])  # [B, T]
    mask = batch["mask"].astype(jnp.float32)  # [B, T]
    tokens = mask.sum()
    loss = (ce * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"bpb": loss / math.log(2), "tokens": tokens}

  return loss_fn


def make_data(config) -> loop.Data:
  """The training iterator for this process and the global validation batches."""
  from effjax.data import pipeline
  pc, pi = jax.process_count(), jax.process_index()
  it = pipeline.train_iterator(config.data, seq_len=config.seq_len,
                               batch_size=config.batch_size // pc, seed=config.seed,
                               shard_index=pi, shard_count=pc)
  evals = []
  if config.eval_batches > 0 and config.eval_every > 0:
    evals = pipeline.eval_batches(config.data, seq_len=config.seq_len,
                                  batch_size=config.batch_size, max_batches=config.eval_batches)
  return loop.Data(train=it, get_state=lambda: pipeline.iterator_state(it),
                   set_state=lambda s: pipeline.restore_iterator(it, s), eval=evals)


def check(config):
  """Validates `config` and returns the abstract (eval_shape) parameters of its model."""
  cfg = validate(config)
  return jax.eval_shape(make_init_fn(cfg), jax.random.PRNGKey(0))


def one_step(config, workdir: str) -> loop.FitResult:
  """One real step of `config` (its model, data and optimizer), one eval batch, one checkpoint."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_steps = 1
    config.eval_batches = min(config.eval_batches, 1)
    config.eval_every = config.log_every = config.checkpoint_every = 1
    config.progress_bar = False
  return run(config, workdir)


@tasks.register("lm", check=check, one_step=one_step)
def run(config, workdir: str) -> loop.FitResult:
  """Trains the LM `config` describes in `workdir` (resuming from its checkpoints)."""
  cfg = validate(config)
  return loop.fit(config, workdir, init_fn=make_init_fn(cfg), loss_fn=make_loss_fn(cfg),
                  data=make_data(config))
