"""The generic training loop: one `fit` for LM pre-training, distillation, Medusa heads and drafts.

A task supplies three things: how to make parameters, how to score a batch, and the batches.
`fit` does the rest: sharded init on the (data, fsdp, tensor) mesh, AdamW with warmup + cosine and
clipping, the jitted step, periodic evaluation, Orbax checkpoints with auto-resume (data position
included), `config.json`, `metrics.jsonl`, TensorBoard events and a progress bar.

Example (a student distilled from a frozen teacher; see `effjax.train.lm_task` for the LM):

    def init_fn(rng):                      # may return params boxed with logical axes
      return LM(student_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))

    def loss_fn(params, batch, rng, teacher):   # frozen pytrees arrive as keyword arguments
      s = LM(student_cfg).apply(params, batch["inputs"]).logits      # [B, T, V]
      t = LM(teacher_cfg).apply(teacher, batch["inputs"]).logits     # [B, T, V]
      loss = kl(t, s, batch["mask"])
      return loss, {"kl": loss, "tokens": batch["mask"].sum()}

    result = fit(config, workdir, init_fn=init_fn, loss_fn=loss_fn,
                 data=Data(train=iterator, get_state=..., set_state=..., eval=eval_batches),
                 frozen={"teacher": teacher_params})

`trainable_filter(path, leaf) -> bool` freezes the rest of the parameters (Medusa heads on a frozen
backbone). A metric named `tokens` weights the evaluation average and feeds tokens/s.

Config fields read here: num_steps, seed, optim (see `effjax.train.optim`), eval_every, log_every,
checkpoint_every, keep_checkpoints, sharding.mesh_shape, sharding.rules and, optionally,
progress_bar (default True) and async_checkpoints (default True).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from effjax import sharding as sharding_lib
from effjax.train import checkpoint as ckpt_lib
from effjax.train import metrics as metrics_lib
from effjax.train import optim
from effjax.train.state import StateFactory, TrainState

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]

# Config fields `fit` needs, with the Python types they must have.
_FIELDS = {"num_steps": int, "seed": int, "eval_every": int, "log_every": int,
           "checkpoint_every": int, "keep_checkpoints": int}


@dataclasses.dataclass
class Data:
  """What `fit` trains and evaluates on.

  Attributes:
    train: iterator of this process's batches (numpy dicts; the leading axis is the per-process
      batch, i.e. the global batch divided by `jax.process_count()`).
    get_state: returns the iterator's position (JSON-able or bytes), saved with each checkpoint.
    set_state: restores a position returned by `get_state`.
    eval: global evaluation batches, identical on every process (each process feeds its rows).
  """

  train: Iterator[Batch]
  get_state: Optional[Callable[[], Any]] = None
  set_state: Optional[Callable[[Any], None]] = None
  eval: Sequence[Batch] = ()


@dataclasses.dataclass
class FitResult:
  step: int
  state: TrainState
  train_metrics: dict
  eval_metrics: dict


def validate_config(config) -> None:
  """Raises ValueError naming the first missing or mistyped field that `fit` needs."""
  for name, typ in _FIELDS.items():
    if name not in config:
      raise ValueError(f"config.{name} is missing; `fit` needs {sorted(_FIELDS)}")
    value = config[name]
    if not isinstance(value, typ) or isinstance(value, bool):
      raise ValueError(f"config.{name}={value!r} must be {typ.__name__}")
  if config.num_steps < 0:
    raise ValueError(f"config.num_steps={config.num_steps} must be >= 0")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if config[name] < 1:
      raise ValueError(f"config.{name}={config[name]} must be >= 1")
  if "optim" not in config:
    raise ValueError("config.optim is missing (lr, warmup_steps, weight_decay, clip_norm, b1, b2)")
  if "sharding" not in config or "mesh_shape" not in config.sharding:
    raise ValueError("config.sharding.mesh_shape is missing; use (-1, 1, 1) for data parallel")


def make_mesh_and_rules(config):
  """The mesh from `config.sharding.mesh_shape` and the rules from `config.sharding.rules`."""
  shard_cfg = config.sharding
  mesh = sharding_lib.make_mesh(tuple(shard_cfg.mesh_shape))
  rules = sharding_lib.rules_from_config(shard_cfg.get("rules", None))
  return mesh, rules


def batch_sharding(mesh, rules) -> NamedSharding:
  """Shards a batch's leading axis the way the rules shard the logical 'batch' axis."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, PartitionSpec(spec[0]))


def to_global(batch: Batch, sharding: NamedSharding) -> dict:
  """Per-process numpy rows -> global jax Arrays sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def local_rows(batch: Batch) -> dict:
  """This process's rows of a global batch."""
  n, pc, pi = None, jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    n = v.shape[0]
    if n % pc:
      raise ValueError(f"eval batch of {n} rows does not split over {pc} processes; make the "
                       f"batch size a multiple of the process count")
    out[k] = v[pi * n // pc:(pi + 1) * n // pc]
  return out


def make_step_fns(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, labels=None):
  """The pure train and eval steps (jit them under the mesh and the logical-axis rules).

  Returns:
    train_step(state, batch, frozen) -> (state, metrics) and eval_step(params, batch, frozen)
    -> metrics; `frozen` is a dict passed to `loss_fn` as keyword arguments.
  """
  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      if labels is not None:  # Frozen leaves: no backward pass through them at all.
        params = jax.tree.map(lambda l, p: p if l == "train" else jax.lax.stop_gradient(p),
                              labels, params)
      return loss_fn(params, batch, rng, **frozen)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch, frozen):
    loss, metrics = loss_fn(params, batch, jax.random.PRNGKey(0), **frozen)
    return {**metrics, "loss": loss}

  return train_step, eval_step


_PER_STEP = ("grad_norm",)  # Averaged over steps, not tokens.
_LAST = ("lr",)  # Reported at the last step of the interval.


def _mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict:
  """Averages metric dicts: loss-like metrics weighted by `tokens` (when present), per-step ones
  (grad_norm) plainly, the learning rate as of the last row; `tokens` is summed."""
  rows = jax.device_get(list(rows))
  if not rows:
    return {}
  weights = np.array([float(r.get("tokens", 1.0)) for r in rows])
  weights = weights / max(weights.sum(), 1e-9)
  out = {}
  for k in rows[0]:
    values = np.array([float(r[k]) for r in rows])
    if k == "tokens":
      out[k] = float(values.sum())
    elif k in _LAST:
      out[k] = float(values[-1])
    elif k in _PER_STEP:
      out[k] = float(values.mean())
    else:
      out[k] = float((weights * values).sum())
  return out


def _batch_tokens(batch: Batch) -> int:
  first = next(iter(batch.values()))
  return int(np.prod(first.shape[:2])) * jax.process_count()


def fit(config, workdir: str, *, init_fn: Callable[[jax.Array], Any], loss_fn: LossFn, data: Data,
        frozen: Optional[Mapping[str, Any]] = None,
        trainable_filter: Optional[optim.TrainableFilter] = None) -> FitResult:
  """Trains (or resumes training) until `config.num_steps`.

  Args:
    config: ml_collections ConfigDict (see the module docstring for the fields).
    workdir: where checkpoints, config.json, metrics.jsonl and TensorBoard events go; a workdir
      with checkpoints is resumed from its latest readable one.
    init_fn: `rng -> params` (boxed with logical axes for sharding, or plain).
    loss_fn: `(params, batch, rng, **frozen) -> (loss, metrics)`; batch values are global arrays.
    data: the batches (see `Data`).
    frozen: pytrees the loss reads but never trains (a teacher, a backbone), by keyword.
    trainable_filter: `(key_path, leaf) -> bool`; parameters it rejects are not updated.

  Returns:
    FitResult with the final state and the last train and eval metrics.
  """
  validate_config(config)
  frozen = dict(frozen or {})
  mesh, rules = make_mesh_and_rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  abstract_params = nn.unbox(abstract_boxed)  # Outside the rules: no constraint on shapes.
  tx, schedule = optim.make_optimizer(config.optim, config.num_steps, abstract_params,
                                      trainable_filter)
  factory = StateFactory(init_fn, tx, mesh, rules)
  labels = (optim.trainable_labels(abstract_params, trainable_filter)
            if trainable_filter is not None else None)

  writer = metrics_lib.MetricWriter(workdir)
  manager = ckpt_lib.make_manager(workdir, config.keep_checkpoints,
                                  async_save=config.get("async_checkpoints", True))
  restored = ckpt_lib.restore_latest(manager, factory.abstract,
                                     with_data=data.set_state is not None)
  if restored is None:
    state = factory.init(jax.random.PRNGKey(config.seed))
    start = 0
  else:
    start, state, data_state = restored
    if data_state is not None:
      data.set_state(data_state)
    elif data.set_state is not None:
      log.warning("checkpoint step %d has no data-iterator state; the data restarts from its "
                  "beginning", start)
    writer.truncate_after(start)
    log.info("resumed from step %d in %s", start, workdir)
  writer.write_config(config)

  train_step, eval_step = make_step_fns(loss_fn, tx, schedule, labels)
  b_shard = batch_sharding(mesh, rules)
  repl = NamedSharding(mesh, PartitionSpec())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(train_step, out_shardings=(factory.shardings, repl), donate_argnums=0)
    eval_step = jax.jit(eval_step, out_shardings=repl)

  def evaluate(params) -> dict:
    rows = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for batch in data.eval:
        rows.append(eval_step(params, to_global(local_rows(batch), b_shard), frozen))
    return {f"val_{k}": v for k, v in _mean_metrics(rows).items()}

  num_steps = config.num_steps
  bar = metrics_lib.ProgressBar(num_steps, start, enabled=config.get("progress_bar", True))
  pending, train_metrics, eval_metrics = [], {}, {}
  tokens, t_last, step = 0, time.perf_counter(), start
  try:
    while step < num_steps:
      host_batch = next(data.train)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, step_metrics = train_step(state, to_global(host_batch, b_shard), frozen)
      step += 1
      pending.append(step_metrics)
      tokens += _batch_tokens(host_batch)
      if step % config.log_every == 0 or step == num_steps:
        train_metrics = _mean_metrics(pending)  # Blocks on the device: the only sync per log.
        train_metrics.pop("tokens", None)
        elapsed = time.perf_counter() - t_last
        train_metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        writer.write(step, train_metrics)
        bar.update(len(pending), train_metrics["loss"], train_metrics["tokens_per_s"])
        pending, tokens, t_last = [], 0, time.perf_counter()
      t_aside = time.perf_counter()
      if data.eval and config.eval_every > 0 and (step % config.eval_every == 0
                                                  or step == num_steps):
        eval_metrics = evaluate(state.params)
        writer.write(step, eval_metrics)
        log.info("step %d: %s", step, eval_metrics)
      if step % config.checkpoint_every == 0 or step == num_steps:
        ckpt_lib.save(manager, step, state,
                      data.get_state() if data.get_state is not None else None)
      t_last += time.perf_counter() - t_aside  # tokens/s counts training time only.
    if start >= num_steps and data.eval:
      eval_metrics = evaluate(state.params)  # Already done: report, but do not log twice.
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return FitResult(step=step, state=state, train_metrics=train_metrics, eval_metrics=eval_metrics)
