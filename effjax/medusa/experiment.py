"""The Medusa experiment behind `experiments/train_medusa.py`: backbone -> data -> `fit` -> heads.

Stages run through the generic trainer (`effjax.train.fit`), each in its own sub-workdir so it
checkpoints and resumes on its own: Medusa-1 is one stage (`heads/`: backbone frozen, passed to the
loss as a frozen pytree); Medusa-2 adds a joint stage (`joint/`) after `heads_warmup_steps` of heads.
The result, in `WORKDIR/`: `medusa_heads/` (Orbax), `medusa.json` (head shape, backbone, per-head
top-1/top-5 accuracy, per-rank accuracy, the best trees of 4-64 tokens) and, for Medusa-2,
`medusa_backbone/` (the jointly tuned backbone).

Medusa-2's higher head learning rate: `fit` has one learning rate, so the joint stage trains heads
reparametrised as theta = head_lr_mult * phi. Adam's step on phi has size ~lr, so theta moves
~head_lr_mult * lr per step, exactly a learning-rate multiplier (weight decay is off for the heads'
stage configs).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from effjax.medusa import train as mtrain
from effjax.medusa.heads import HeadsConfig, MedusaHeads, check_compatible, init_heads
from effjax.medusa.tree import best_tree
from effjax.models import registry
from effjax.models.lm import LM, LMConfig, init_params

log = logging.getLogger(__name__)
# Sizes (root included) whose best trees medusa.json lists; small ones are what a CPU can afford.
TREE_SIZES = (4, 6, 8, 12, 16, 32, 64)


class CropData:
  """Resumable random crops: the position is the number of batches drawn."""

  def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int):
    self._args = (stream, batch_size, seq_len, seed)
    self.set_state(0)

  def set_state(self, state) -> None:
    self._drawn = int(state)
    self._it = mtrain.crop_batches(*self._args)
    for _ in range(self._drawn):
      next(self._it)

  def get_state(self):
    return self._drawn

  def __iter__(self):
    return self

  def __next__(self):
    self._drawn += 1
    return {"tokens": next(self._it)}


class ArrayData(CropData):
  """Resumable shuffled batches of a fixed [N, T] array (self-distillation data)."""

  def __init__(self, data: np.ndarray, batch_size: int, seed: int):
    self._data, self._bs, self._seed = data, batch_size, seed
    self.set_state(0)

  def set_state(self, state) -> None:
    self._drawn = int(state)
    self._it = mtrain.array_batches(self._data, self._bs, self._seed)
    for _ in range(self._drawn):
      next(self._it)


def load_backbone(config: ml_collections.ConfigDict, lm_config: LMConfig):
  """The trained target from `config.backbone_workdir` (or a random one if `allow_random`)."""
  if not config.backbone_workdir:
    if not config.get("allow_random_backbone", False):
      raise ValueError("config.backbone_workdir is empty; point it at the trained target's workdir "
                       "(experiments/train.py --config=configs/lm/stdlib.py), or set "
                       "allow_random_backbone=True for a smoke test")
    return init_params(lm_config, jax.random.PRNGKey(config.seed))
  from effjax.train.checkpoint import load_params
  abstract = jax.eval_shape(lambda: init_params(lm_config, jax.random.PRNGKey(0)))
  return load_params(os.path.abspath(config.backbone_workdir), abstract)


def _scale(tree, factor):
  return jax.tree.map(lambda x: x * factor, tree)


def make_task(lm_config: LMConfig, heads_config: HeadsConfig, *, joint: bool, decay: float,
              head_loss_weight: float, head_lr_mult: float, lm_params, head_params):
  """(init_fn, loss_fn) for `effjax.train.fit`.

  Heads only (`joint=False`): params = head variables; the backbone arrives as `frozen=backbone`.
  Joint: params = {'lm', 'heads' (scaled by 1 / head_lr_mult)}.
  """

  def init_fn(rng):
    if joint:
      return {"lm": lm_params, "heads": _scale(head_params, 1.0 / head_lr_mult)}
    return head_params if head_params is not None else init_heads(heads_config, lm_params,
                                                                  lm_config, rng)

  def loss_fn(params, batch, rng, backbone=None):
    del rng
    tokens = batch["tokens"]
    lm_vars = params["lm"] if joint else backbone
    heads = _scale(params["heads"], head_lr_mult) if joint else params
    out = LM(lm_config).apply(lm_vars, tokens)
    hidden = out.hidden_states if joint else jax.lax.stop_gradient(out.hidden_states)
    head_logits = MedusaHeads(heads_config).apply(heads, hidden)  # [B, T, K, V]
    loss, m = mtrain.medusa_loss(head_logits, tokens, None, decay)
    metrics = {"head_loss": loss, "tokens": jnp.float32(tokens.size)}
    for k in range(heads_config.num_heads):
      metrics[f"head{k}_top1"] = m["head_top1"][k]
      metrics[f"head{k}_top5"] = m["head_top5"][k]
    if joint:
      l_loss = mtrain.lm_loss(out.logits, tokens)
      metrics["lm_loss"] = l_loss
      loss = l_loss + head_loss_weight * loss
    return loss, metrics

  return init_fn, loss_fn


def _stage_config(config, num_steps: int, lr: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.num_steps = int(num_steps)
  c.optim.lr = float(lr)
  return c


def save_heads(path: str, head_params, info: dict) -> None:
  """Writes head variables (Orbax) to `path/medusa_heads` and `info` to `path/medusa.json`."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "medusa_heads"), jax.device_get(head_params), force=True)
  ckpt.wait_until_finished()
  with open(os.path.join(path, "medusa.json"), "w") as f:
    json.dump(info, f, indent=1)


def load_heads(path: str, lm_config: Optional[LMConfig] = None):
  """(head variables, info dict) saved by `save_heads`; checked against `lm_config` if given."""
  path = os.path.abspath(path)
  with open(os.path.join(path, "medusa.json")) as f:
    info = json.load(f)
  head_params = ocp.StandardCheckpointer().restore(os.path.join(path, "medusa_heads"))
  if lm_config is not None:
    check_compatible(head_params, lm_config)
  return head_params, info


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains Medusa heads as `config` says; returns (and writes) the summary dict."""
  from effjax.train.loop import Data, fit
  if config.mode not in ("medusa1", "medusa2"):
    raise ValueError(f"config.mode={config.mode!r}; choose 'medusa1' or 'medusa2'")
  workdir = os.path.abspath(workdir)
  lm_config = registry.get(config.backbone, **dict(config.get("backbone_overrides", {})))
  heads_config = HeadsConfig.for_lm(lm_config, config.heads.num_heads, config.heads.num_layers)
  lm_params = load_backbone(config, lm_config)
  d = config.data
  streams = mtrain.corpus_tokens(d.get("max_docs", None), d.val_fraction)
  stream, val_stream = streams["train"], streams["validation"]
  if d.source == "self_distill":
    seqs = mtrain.self_distill_data(lm_params, lm_config, stream, num_seqs=d.num_seqs,
                                    prompt_len=d.prompt_len, seq_len=d.seq_len,
                                    temperature=d.temperature, seed=config.seed)
    train_data = ArrayData(seqs, d.batch_size, config.seed)
  elif d.source == "corpus":
    train_data = CropData(stream, d.batch_size, d.seq_len, config.seed)
  else:
    raise ValueError(f"config.data.source={d.source!r}; choose 'corpus' or 'self_distill'")
  eval_it = mtrain.crop_batches(val_stream, d.batch_size, d.seq_len, config.seed + 1)
  corpus_eval = [next(eval_it) for _ in range(config.eval_batches)]
  eval_batches = corpus_eval
  if d.source == "self_distill":
    # Held-out continuations the backbone itself wrote: what the heads must predict when decoding,
    # so the per-rank accuracies (and the trees built from them) are measured on that.
    held_out = mtrain.self_distill_data(lm_params, lm_config, val_stream,
                                        num_seqs=config.eval_batches * d.batch_size,
                                        prompt_len=d.prompt_len, seq_len=d.seq_len,
                                        temperature=d.temperature, seed=config.seed + 1)
    eval_batches = list(held_out.reshape(config.eval_batches, d.batch_size, d.seq_len))
  data = Data(train=train_data, get_state=train_data.get_state, set_state=train_data.set_state,
              eval=[{"tokens": b} for b in eval_batches])

  warm = config.num_steps if config.mode == "medusa1" else config.heads_warmup_steps
  init_fn, loss_fn = make_task(lm_config, heads_config, joint=False, decay=config.loss_decay,
                               head_loss_weight=config.head_loss_weight, head_lr_mult=1.0,
                               lm_params=lm_params, head_params=None)
  result = fit(_stage_config(config, warm, config.optim.lr), os.path.join(workdir, "heads"),
               init_fn=init_fn, loss_fn=loss_fn, data=data, frozen={"backbone": lm_params})
  head_params = result.state.params
  if config.mode == "medusa2" and config.num_steps > warm:
    mult = float(config.head_lr_mult)
    init_fn, loss_fn = make_task(lm_config, heads_config, joint=True, decay=config.loss_decay,
                                 head_loss_weight=config.head_loss_weight, head_lr_mult=mult,
                                 lm_params=lm_params, head_params=head_params)
    result = fit(_stage_config(config, config.num_steps - warm, config.optim.lr),
                 os.path.join(workdir, "joint"), init_fn=init_fn, loss_fn=loss_fn, data=data)
    lm_params = result.state.params["lm"]
    head_params = _scale(result.state.params["heads"], mult)
    ocp.StandardCheckpointer().save(os.path.join(workdir, "medusa_backbone"),
                                    jax.device_get(lm_params), force=True)

  # Self-distilled sequences are scored from the last prompt token on: what decoding will see.
  start = d.prompt_len - 1 if d.source == "self_distill" else 0
  acc = mtrain.evaluate_heads(lm_params, head_params, lm_config, heads_config, eval_batches,
                              start=start)
  rank_acc = np.asarray(acc["chain_rank_accuracy"])  # Correlated heads: see chain_rank_terms.
  trees = {str(s): [list(c) for c in best_tree(rank_acc, s).choices] for s in TREE_SIZES}
  corpus_acc = (acc if eval_batches is corpus_eval else
                mtrain.evaluate_heads(lm_params, head_params, lm_config, heads_config, corpus_eval))
  info = {"backbone": config.backbone, "backbone_workdir": config.backbone_workdir,
          "mode": config.mode, "num_heads": heads_config.num_heads,
          "num_layers": heads_config.num_layers, "d_model": heads_config.d_model,
          "vocab_size": heads_config.vocab_size, "steps": config.num_steps,
          "data_source": d.source, "accuracy_measured_on": (
              "held-out self-distilled continuations" if d.source == "self_distill"
              else "held-out corpus crops"), **acc,
          "corpus_head_top1": corpus_acc["head_top1"], "corpus_head_top5": corpus_acc["head_top5"],
          "best_trees": trees}
  save_heads(workdir, head_params, info)
  for k in range(heads_config.num_heads):
    log.info("head %d: top-1 %.3f top-5 %.3f", k, acc["head_top1"][k], acc["head_top5"][k])
  return info
