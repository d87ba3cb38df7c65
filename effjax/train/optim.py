"""Optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, frozen-parameter masks.

`config.optim` fields: lr, warmup_steps, weight_decay, clip_norm, b1, b2 (and optionally eps,
final_lr_fraction). Weight decay skips vectors (norm scales), as is usual for transformers.
Frozen parameters (those `trainable_filter` rejects) get `optax.set_to_zero()`: no update and no
Adam moments, so a frozen Medusa backbone or distillation teacher costs no optimizer memory.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

TrainableFilter = Callable[[tuple, Any], bool]  # (path of keys, leaf) -> trainable?

_REQUIRED = ("lr", "warmup_steps", "weight_decay", "clip_norm", "b1", "b2")


def lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * final_lr_fraction` at `num_steps`."""
  missing = [k for k in _REQUIRED if k not in optim_cfg]
  if missing:
    raise ValueError(f"config.optim lacks {missing}; it needs {list(_REQUIRED)}")
  lr = float(optim_cfg.lr)
  if lr <= 0:
    raise ValueError(f"config.optim.lr={lr} must be positive")
  warmup = int(optim_cfg.warmup_steps)
  if warmup < 0:
    raise ValueError(f"config.optim.warmup_steps={warmup} must be >= 0")
  final = float(optim_cfg.get("final_lr_fraction", 0.1))
  # Keep the decay phase at least one step long so a num_steps <= warmup run is still well defined.
  decay_steps = max(int(num_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=decay_steps,
      end_value=lr * final)


def path_str(path: tuple) -> str:
  """'layer_0/attn/wq' from a jax key path (used in masks and error messages)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def trainable_labels(params, trainable_filter: Optional[TrainableFilter]):
  """A pytree of 'train' / 'frozen' labels, one per parameter leaf."""
  if trainable_filter is None:
    return jax.tree.map(lambda _: "train", params)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: "train" if trainable_filter(p, x) else "frozen", params)


def make_optimizer(optim_cfg, num_steps: int, params=None,
                   trainable_filter: Optional[TrainableFilter] = None):
  """Returns (optax transformation, lr schedule).

  Args:
    optim_cfg: `config.optim` (see module docstring).
    num_steps: total training steps (the end of the cosine).
    params: a params pytree (arrays or ShapeDtypeStructs); needed only with `trainable_filter`.
    trainable_filter: `(key_path, leaf) -> bool`; leaves it rejects are frozen.
  """
  schedule = lr_schedule(optim_cfg, num_steps)
  decay_mask = lambda tree: jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, tree)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.clip_norm)),
      optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                  eps=float(optim_cfg.get("eps", 1e-8)),
                  weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
  if trainable_filter is not None:
    if params is None:
      raise ValueError("make_optimizer needs `params` (or their shapes) with a trainable_filter")
    labels = trainable_labels(params, trainable_filter)
    if "train" not in jax.tree.leaves(labels):
      raise ValueError("trainable_filter froze every parameter; nothing would train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
