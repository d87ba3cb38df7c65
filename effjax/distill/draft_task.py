"""Drafts for speculative decoding, distilled from the trained target LM (DistillSpec's study).

Every draft has the same small architecture and the same compute:

1. `pretrain`: the draft learns the corpus with cross-entropy for `pretrain_steps` (shared by all).
2. One of the methods, `num_steps` more steps each, starting from the pretrained draft:
   * `scratch`       more corpus cross-entropy (the draft trained without distillation: baseline);
   * `offline_fkl`   forward KL to the target's distribution on corpus text;
   * `seqkd`         cross-entropy on a corpus the target wrote (`teacher_data`, a TFDS dataset);
   * `onpolicy_fkl`, `onpolicy_rkl`, `onpolicy_tvd`, `onpolicy_jsd`: the draft writes, the target
     grades (`on_policy`), with that divergence.
3. Each draft then drafts for the target (`effjax.speculative`): acceptance alpha, TAR, predicted
   speedup from the measured cost ratio c, and measured wall-clock speedup over plain decoding.

Starting every method from the same pretrained draft is DistillSpec's protocol (they distil a
pretrained draft), and it makes "+x% over the undistilled draft" a like-for-like comparison.
The target is frozen and passed to the step as a frozen argument; checkpoints hold only the draft.

Callable from Python: `run(config, workdir)` (all of it), or `train_draft(...)` and
`evaluate_drafts(...)` separately.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax.data import tokenizer as tok_lib
from effjax.distill import losses
from effjax.distill import on_policy
from effjax.distill import student_init
from effjax.distill import teacher as teacher_lib
from effjax.distill import teacher_data
from effjax.models.lm import LM, LMConfig
from effjax.train import tasks

log = logging.getLogger(__name__)

METHODS = ("scratch", "offline_fkl", "seqkd", "onpolicy_fkl", "onpolicy_rkl", "onpolicy_tvd",
           "onpolicy_jsd")


def _ce(logits, targets, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
  m = mask.astype(jnp.float32)
  return (ce * m).sum() / jnp.maximum(m.sum(), 1.0), m.sum()


def make_loss_fn(method: str, s_cfg: LMConfig, t_cfg: LMConfig, config):
  """`(params, batch, rng, teacher=None) -> (loss, metrics)` for `fit`."""
  s_model, t_model = LM(s_cfg), LM(t_cfg)
  kd_t = float(config.kd.temperature)

  def corpus_forward(model, params, batch):
    return model.apply(params, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"]).logits  # [B, T, V]

  if method in ("pretrain", "scratch", "seqkd"):
    def loss_fn(params, batch, rng, teacher=None):
      del rng, teacher
      loss, n = _ce(corpus_forward(s_model, params, batch), batch["targets"], batch["mask"])
      return loss, {"bpb": loss / math.log(2), "tokens": n}
  elif method == "offline_fkl":
    def loss_fn(params, batch, rng, teacher):
      del rng
      s = corpus_forward(s_model, params, batch)
      t = corpus_forward(t_model, jax.lax.stop_gradient(teacher), batch)
      loss = losses.forward_kl(t, s, batch["mask"], kd_t)
      ce, n = _ce(s, batch["targets"], batch["mask"])
      return loss, {"bpb": ce / math.log(2), "alpha": 1.0 - losses.total_variation(
          t, s, batch["mask"]), "tokens": n}
  elif method.startswith("onpolicy_"):
    div = method.split("_", 1)[1]
    op = config.onpolicy

    def loss_fn(params, batch, rng, teacher):
      return on_policy.on_policy_loss(
          params, teacher, s_cfg, t_cfg, batch["prompts"], rng, divergence=div,
          gen_len=int(op.gen_len), sample_temperature=float(op.sample_temperature),
          kd_temperature=kd_t)
  else:
    raise ValueError(f"unknown draft method {method!r}; choose from {METHODS}")
  return loss_fn


class PromptBatches:
  """Prompts [B, P] cut from corpus batches, each inside one document (no boundary inside)."""

  def __init__(self, corpus_iter, batch_size: int, prompt_len: int):
    self._it, self._b, self._p = corpus_iter, batch_size, prompt_len
    self._pending: list[np.ndarray] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while len(self._pending) < self._b:
      self._pending.extend(prompts_from_batch(next(self._it), self._p))
    rows, self._pending = self._pending[:self._b], self._pending[self._b:]
    return {"prompts": np.stack(rows).astype(np.int32)}

  def get_state(self):
    from effjax.data import pipeline
    return {"corpus": pipeline.iterator_state(self._it)}

  def set_state(self, state):
    from effjax.data import pipeline
    pipeline.restore_iterator(self._it, state["corpus"])
    self._pending = []


def prompts_from_batch(batch: dict, prompt_len: int) -> list[np.ndarray]:
  """Windows of `prompt_len` tokens lying inside one document, one per row at most."""
  out = []
  seg, inputs = np.asarray(batch["segment_ids"]), np.asarray(batch["inputs"])
  for r in range(inputs.shape[0]):
    for start in range(0, inputs.shape[1] - prompt_len + 1, prompt_len):
      s = seg[r, start:start + prompt_len]
      if s[0] > 0 and np.all(s == s[0]):
        out.append(inputs[r, start:start + prompt_len])
        break
  return out


def _corpus(config, seed: int):
  from effjax.data import pipeline
  return pipeline.train_iterator(config.data, seq_len=config.seq_len,
                                 batch_size=config.batch_size, seed=seed)


def _eval_batches(config):
  from effjax.data import pipeline
  return pipeline.eval_batches(config.data, seq_len=config.seq_len, batch_size=config.batch_size,
                               max_batches=config.eval_batches)


def build_seqkd_data(config, teacher_cfg, teacher_params, data_dir: str) -> str:
  """Writes the teacher-generated corpus (TFDS) unless an identical one exists; returns data_dir."""
  sk = config.seqkd
  want = {"teacher": dict(config.teacher), "num_sequences": int(sk.num_sequences),
          "prompt_len": int(sk.prompt_len), "gen_len": int(sk.gen_len),
          "temperature": float(sk.temperature), "seed": int(config.seed)}
  try:
    if teacher_data.metadata(data_dir) == json.loads(json.dumps(want, default=str)):
      return data_dir
  except Exception:  # noqa: BLE001 - no readable build: make one.
    pass
  prompts = []
  it = _corpus(config, seed=config.seed + 7)
  while len(prompts) < sk.num_sequences:
    prompts.extend(prompts_from_batch(next(it), int(sk.prompt_len)))
  prompts = np.stack(prompts[:sk.num_sequences])
  seqs = teacher_data.generate_sequences(
      teacher_params, teacher_cfg, prompts, gen_len=int(sk.gen_len),
      temperature=float(sk.temperature), batch_size=int(sk.gen_batch_size), seed=config.seed)
  teacher_data.write_dataset(data_dir, seqs, [len(p) for p in prompts], metadata=want)
  return data_dir


def _method_data(method, config, t_cfg, teacher_params, workdir, seed):
  from effjax.train import loop
  if method.startswith("onpolicy_"):
    it = PromptBatches(_corpus(config, seed), config.batch_size, int(config.onpolicy.prompt_len))
    return loop.Data(train=it, get_state=it.get_state, set_state=it.set_state)
  if method == "seqkd":
    data_dir = build_seqkd_data(config, t_cfg, teacher_params, os.path.join(workdir, "seqkd_tfds"))
    it = teacher_data.SequenceBatches(
        teacher_data.open_source(data_dir), seq_len=config.seq_len, batch_size=config.batch_size,
        seed=seed, pad_id=tok_lib.PAD_ID, continuation_only=bool(config.seqkd.continuation_only))
    return loop.Data(train=it, get_state=it.get_state, set_state=it.set_state)
  from effjax.data import pipeline
  it = _corpus(config, seed)
  return loop.Data(train=it, get_state=lambda: pipeline.iterator_state(it),
                   set_state=lambda s: pipeline.restore_iterator(it, s))


def train_draft(method: str, config, workdir: str, t_cfg: LMConfig, teacher_params,
                s_cfg: LMConfig, init_values=None, num_steps: Optional[int] = None):
  """Trains one draft with `method` in `workdir` (resumable); returns its unboxed params."""
  from effjax.train import loop
  run_cfg = config.copy_and_resolve_references()
  with run_cfg.unlocked():
    run_cfg.num_steps = int(config.num_steps if num_steps is None else num_steps)
    run_cfg.optim.warmup_steps = min(int(config.optim.warmup_steps), max(run_cfg.num_steps // 5, 1))
  seed = config.seed + METHODS.index(method) + 1 if method in METHODS else config.seed
  if init_values is None:
    init_fn = lambda rng: teacher_lib.init_boxed(s_cfg, rng)
  else:
    # jax Arrays, made before tracing: init_fn closes over them (numpy cannot be staged).
    init_values = jax.tree.map(jnp.asarray, init_values)
    init_fn = lambda rng: teacher_lib.rebox_like(s_cfg, init_values)
  needs_teacher = method == "offline_fkl" or method.startswith("onpolicy_")
  result = loop.fit(run_cfg, workdir, init_fn=init_fn,
                    loss_fn=make_loss_fn(method, s_cfg, t_cfg, config),
                    data=_method_data(method, config, t_cfg, teacher_params, workdir, seed),
                    frozen={"teacher": teacher_params} if needs_teacher else {})
  return jax.device_get(result.state.params), result


def draft_bpb(params, cfg: LMConfig, batches) -> float:
  """The draft's own bits per byte on held-out corpus batches."""
  fwd = jax.jit(lambda p, b: _ce(LM(cfg).apply(p, b["inputs"], positions=b["positions"],
                                               segment_ids=b["segment_ids"]).logits,
                                 b["targets"], b["mask"]))
  tot = n = 0.0
  for b in batches:
    loss, cnt = fwd(params, b)
    tot, n = tot + float(loss) * float(cnt), n + float(cnt)
  return tot / max(n, 1.0) / math.log(2)


def _timed(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def evaluate_drafts(drafts: dict, t_cfg: LMConfig, teacher_params, s_cfg: LMConfig, config,
                    eval_batches) -> list[dict]:
  """One table row per draft: alpha, TAR, tau, predicted and measured speedup, bpb."""
  from effjax.generate.engine import generate
  from effjax.generate.sampling import SamplingParams
  from effjax.speculative import metrics as spec_metrics
  from effjax.speculative.decode import speculative_generate
  se = config.spec_eval
  prompts = []
  for b in eval_batches:
    prompts.extend(prompts_from_batch(b, int(se.prompt_len)))
  if len(prompts) < se.num_prompts:
    raise ValueError(f"only {len(prompts)} held-out prompts of {se.prompt_len} tokens; lower "
                     "spec_eval.num_prompts or raise eval_batches")
  prompts = np.stack(prompts[:se.num_prompts])
  any_draft = next(iter(drafts.values()))
  if se.timing_reps > 0:
    cost = spec_metrics.measure_cost_ratio(teacher_params, t_cfg, any_draft, s_cfg,
                                           batch=len(prompts), context=int(se.prompt_len),
                                           iters=int(se.timing_reps) * 3)
  else:  # No timing (smoke runs): the parameter-count ratio stands in for c.
    cost = {"cost_ratio": s_cfg.num_params() / t_cfg.num_params()}
  rows = []
  plain_time = {}
  for name, params in drafts.items():
    row = {"draft": name, "bpb": draft_bpb(params, s_cfg, eval_batches),
           "cost_ratio": cost["cost_ratio"]}
    for temp in se.temperatures:
      sampling = SamplingParams(temperature=float(temp))
      key = jax.random.key(int(config.seed))
      run_spec = lambda: speculative_generate(
          teacher_params, t_cfg, params, s_cfg, prompts, gamma=int(se.gamma),
          max_new_tokens=int(se.max_new_tokens), sampling=sampling, rng=key)
      out = run_spec()
      summ = spec_metrics.summarize(out.metrics, out.lengths, cost_ratio=cost["cost_ratio"])
      sfx = "greedy" if float(temp) == 0.0 else f"T{float(temp):g}"
      row[f"alpha_{sfx}"] = summ["alpha"]
      row[f"tar_{sfx}"] = summ["tar"]
      row[f"tau_{sfx}"] = summ["tau"]
      row[f"pred_speedup_{sfx}"] = summ.get("predicted_speedup", float("nan"))
      if se.timing_reps > 0:
        if temp not in plain_time:
          plain_time[temp] = _timed(lambda: generate(
              teacher_params, t_cfg, prompts, max_new_tokens=int(se.max_new_tokens),
              sampling=sampling, rng=key).tokens, int(se.timing_reps))
        row[f"speedup_{sfx}"] = plain_time[temp] / _timed(lambda: run_spec().tokens,
                                                          int(se.timing_reps))
    rows.append(row)
  base = next((r for r in rows if r["draft"] == "scratch"), None)
  if base is not None:
    for r in rows:
      for k in list(r):
        if k.startswith(("speedup_", "pred_speedup_", "alpha_", "tau_")):
          r[f"gain_{k}"] = r[k] / base[k] - 1.0 if base[k] else float("nan")
  return rows


def validate(config):
  from effjax.train import loop
  loop.validate_config(config)
  for name in ("teacher", "student", "methods", "pretrain_steps", "seq_len",
               "batch_size", "data", "kd", "onpolicy", "seqkd", "spec_eval", "eval_batches"):
    if name not in config:
      raise ValueError(f"config.{name} is missing; see configs/distill/drafts.py")
  bad = [m for m in config.methods if m not in METHODS]
  if bad:
    raise ValueError(f"config.methods has unknown {bad}; choose from {METHODS}")
  t_cfg = teacher_lib.model_config(config.teacher, "config.teacher")
  s_cfg = teacher_lib.model_config(config.student, "config.student")
  if not isinstance(t_cfg, LMConfig) or not isinstance(s_cfg, LMConfig):
    raise ValueError("the drafts task needs lm/* teacher and student models")
  student_init.check_same_vocab(t_cfg, s_cfg)
  if config.seq_len > min(t_cfg.max_len, s_cfg.max_len):
    raise ValueError(f"config.seq_len={config.seq_len} exceeds a model's max_len")
  return t_cfg, s_cfg


def check(config):
  """Validates `config`; returns the draft's abstract params (no teacher is loaded)."""
  _, s_cfg = validate(config)
  return teacher_lib.abstract_params(s_cfg)


@tasks.register("distill_drafts", check=check)
def run(config, workdir: str) -> dict:
  """Pretrains the draft, trains every method, evaluates all drafts against the target."""
  t_cfg, s_cfg = validate(config)
  t_cfg, teacher_params = teacher_lib.load_teacher(config.teacher, "config.teacher")
  t0 = time.perf_counter()
  pre, _ = train_draft("pretrain", config, os.path.join(workdir, "pretrain"), t_cfg,
                       teacher_params, s_cfg, num_steps=int(config.pretrain_steps))
  timings = {"pretrain": time.perf_counter() - t0}
  drafts = {}
  for m in config.methods:
    t0 = time.perf_counter()
    drafts[m], _ = train_draft(m, config, os.path.join(workdir, m), t_cfg, teacher_params, s_cfg,
                               init_values=pre)
    timings[m] = time.perf_counter() - t0
  rows = evaluate_drafts(drafts, t_cfg, teacher_params, s_cfg, config, _eval_batches(config))
  out = {"rows": rows, "train_seconds": timings, "teacher": dict(config.teacher),
         "student": config.student.model}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "drafts_results.json"), "w") as f:
      json.dump(out, f, indent=1, default=str)
  return out
