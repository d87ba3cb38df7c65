"""Loading a trained LM for generation: which LMConfig a workdir's config describes, and its weights.

Library code (no flags), so `experiments/generate.py`, notebooks and tests share it.
"""

from __future__ import annotations

import dataclasses
import json
import os


def _plain(obj):
  """ConfigDict / FrozenConfigDict -> plain dict (JSON-like)."""
  if hasattr(obj, "to_dict"):
    return obj.to_dict()
  return obj


def lm_config_from_experiment(cfg: dict, model_name: str | None = None):
  """The LMConfig an experiment config describes.

  Accepted shapes (the trainer's `config.json` or an experiment config): `model: "lm/small"`
  (with optional `model_overrides: {...}`), `model: {name: "lm/small", <overrides>}`, or
  `model: {<LMConfig fields>}`; the same under `lm` or `student`.
  """
  from effjax.models import LMConfig, registry
  fields = {f.name for f in dataclasses.fields(LMConfig)}

  def clean(d):
    # None means "the variant's value": the trainer's config.json lists every LMConfig field so.
    d = {k: v for k, v in dict(d).items() if k in fields and v is not None}
    if isinstance(d.get("rope_scaling"), list):
      d["rope_scaling"] = tuple(d["rope_scaling"])
    return d

  if model_name:
    return registry.get(model_name, **clean(cfg.get("model_overrides") or {}))
  for key in ("model", "lm", "student"):
    spec = cfg.get(key)
    if isinstance(spec, str):
      return registry.get(spec, **clean(cfg.get(f"{key}_overrides") or {}))
    if isinstance(spec, dict):
      spec = _plain(spec)
      name = spec.get("name") or spec.get("variant")
      if name:
        return registry.get(name, **clean(spec))
      if "d_model" in spec:
        return LMConfig(**clean(spec))
  raise ValueError("cannot tell which model this config describes (no `model: \"lm/...\"` "
                   "entry); pass --model=lm/<variant>")


def load_from_workdir(workdir: str, config_obj=None, model_name=None, step=None):
  """(params, LMConfig) from an effjax training workdir, via effjax.train.checkpoint."""
  import jax
  from effjax.models import init_params
  from effjax.train import checkpoint as ckpt_lib
  if config_obj is not None:
    cfg = _plain(config_obj)
  else:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found; pass --config=<the experiment config> or "
                              "--hf_dir for a transformers directory")
    with open(path) as fh:
      cfg = json.load(fh)
  lm_cfg = lm_config_from_experiment(cfg, model_name)
  abstract = jax.eval_shape(lambda: init_params(lm_cfg, jax.random.key(0)))
  try:
    params = ckpt_lib.load_params(workdir, abstract, step)
  except ckpt_lib.CheckpointMismatchError:
    # Some trainers store the bare tree rather than {'params': ...}.
    params = {"params": ckpt_lib.load_params(workdir, abstract["params"], step)}
  return params, lm_cfg
