"""Run records from process 0: `config.json`, `metrics.jsonl`, TensorBoard events, a progress bar.

`metrics.jsonl` holds one JSON object per logged step, e.g.
`{"step": 100, "loss": 2.31, "bpb": 3.33, "tokens_per_s": 41000.0}`; evaluation rows carry `val_*`
keys. After a resume, rows past the restored step (logged by the killed run after its last
checkpoint) are dropped, so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Mapping, Optional

import jax

log = logging.getLogger(__name__)


def _flatten(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep the fact visible.
  return v


def _summary_writer_cls():
  """tensorboardX's SummaryWriter, imported without dragging in torch.

  tensorboardX imports torch (about 5 s on a small CPU) only to accept torch tensors; we log Python
  floats. When torch is not loaded yet, it is hidden for the duration of the import (tensorboardX
  falls back to numpy) and un-hidden right after, so later `import torch` works normally.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` now raises ImportError.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes config and metrics on process 0; a no-op on other processes."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._tb_wanted = tensorboard
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")

  def write_config(self, config) -> None:
    if not self.enabled:
      return
    text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(
        config, "to_json_best_effort") else json.dumps(config, indent=2, default=str)
    path = os.path.join(self.workdir, "config.json")
    if os.path.exists(path):  # A resume: say which settings changed since the run started.
      try:
        with open(path) as f:
          old = _flatten(json.load(f))
        new = _flatten(json.loads(text))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
          log.warning("resuming %s with changed config fields %s (was %s)", self.workdir,
                      changed, {k: old.get(k) for k in changed})
      except (OSError, json.JSONDecodeError):
        pass
    with open(path, "w") as f:
      f.write(text + "\n")

  def truncate_after(self, step: int) -> None:
    """Drops rows with `step > step` (written by a run that died after its last checkpoint)."""
    if not self.enabled or not os.path.exists(self.metrics_path):
      return
    kept = []
    with open(self.metrics_path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line torn by the kill.
        if row.get("step", 0) <= step:
          kept.append(json.dumps(row))
    with open(self.metrics_path, "w") as f:
      f.write("".join(k + "\n" for k in kept))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    tb = self._tensorboard()
    if tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          tb.add_scalar(k, v, int(step))
      tb.flush()

  def _tensorboard(self):
    if self._tb is None and self._tb_wanted:
      self._tb = _summary_writer_cls()(logdir=os.path.join(self.workdir, "tensorboard"))
    return self._tb

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class ProgressBar:
  """A tqdm bar with loss and tokens/s, on process 0 only (stderr, so stdout stays parseable)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int, loss: Optional[float] = None, tokens_per_s: Optional[float] = None):
    if self._bar is None:
      return
    post = {}
    if loss is not None:
      post["loss"] = f"{loss:.4f}"
    if tokens_per_s is not None:
      post["tok/s"] = f"{tokens_per_s:,.0f}"
    if post:
      self._bar.set_postfix(post, refresh=False)
    self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
