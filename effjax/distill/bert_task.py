"""DistilBERT with a real teacher: all-MiniLM-L6-v2 -> a 3-layer student from every other layer.

The student matches the teacher's sentence embeddings (cosine), its final token states (cosine)
and, optionally, the in-batch similarity matrix, on unlabelled real text (WordNet glosses and
examples held out from the evaluation). Teacher and student are then scored on the held-out
WordNet reverse-dictionary retrieval task (`effjax.eval.wordnet_retrieval`).

Config fields (besides those of `effjax.train.loop.fit`): task ("distill_bert"), teacher
(model, checkpoint), student (model, overrides, init: "teacher_layers" | "scratch", layer_map),
text (max_texts, max_len, val_texts), loss (emb_cos, hidden_cos, hidden_mse, sim_mse),
batch_size, eval_task (num_items, seed, batch_size).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.distill import losses
from effjax.distill import student_init
from effjax.distill import teacher as teacher_lib
from effjax.models.bert import BertConfig, BertEncoder
from effjax.train import tasks

log = logging.getLogger(__name__)


def make_encoder(cfg: BertConfig, params, tokenizer, batch_size: int = 128
                 ) -> Callable[[Sequence[str]], np.ndarray]:
  """texts -> [N, D] normalised sentence embeddings (jitted; batches padded to multiples of 16)."""
  fwd = jax.jit(lambda p, ids, m: BertEncoder(cfg).apply(p, ids, m).embedding)

  def encode(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
    out = np.zeros((len(texts), cfg.d_model), np.float32)
    for i in range(0, len(texts), batch_size):
      idx = order[i:i + batch_size]
      ids, mask = tokenizer.encode_batch([texts[j] for j in idx])
      out[idx] = np.asarray(fwd(params, ids, mask))
    return out

  return encode


class TextBatches:
  """Endless length-bucketed batches of tokenized text, resumable by batch count.

  Texts are shuffled per epoch, then sorted by length within windows of 32 batches, so a batch
  pads little (WordNet glosses are 9 tokens at the median, 36 at the 99th percentile). Batches
  are padded to a multiple of 8 tokens: a handful of shapes, so a handful of compilations.
  """

  def __init__(self, ids: Sequence[Sequence[int]], batch_size: int, seed: int, pad_id: int = 0):
    if len(ids) < batch_size:
      raise ValueError(f"{len(ids)} texts cannot fill a batch of {batch_size}; lower batch_size "
                       "or raise text.max_texts")
    self._ids, self._bs, self._seed, self._pad = list(ids), batch_size, seed, pad_id
    self._lens = np.array([len(x) for x in self._ids])
    self._per_epoch = len(self._ids) // batch_size
    self._epoch_cache: dict[int, list[np.ndarray]] = {}
    self.position = 0

  def _epoch(self, e: int) -> list[np.ndarray]:
    if e not in self._epoch_cache:
      rng = np.random.default_rng([self._seed, e])
      perm = rng.permutation(len(self._ids))[:self._per_epoch * self._bs]
      window = 32 * self._bs
      batches = []
      for w in range(0, len(perm), window):
        chunk = perm[w:w + window]
        chunk = chunk[np.argsort(self._lens[chunk], kind="stable")]
        group = [chunk[i:i + self._bs] for i in range(0, len(chunk), self._bs)]
        batches.extend(group[j] for j in rng.permutation(len(group)))
      self._epoch_cache = {e: batches}
    return self._epoch_cache[e]

  def batch(self, index: np.ndarray) -> dict:
    width = int(-(-self._lens[index].max() // 8) * 8)
    ids = np.full((len(index), width), self._pad, np.int32)
    mask = np.zeros((len(index), width), np.int32)
    for r, i in enumerate(index):
      ids[r, :self._lens[i]] = self._ids[i]
      mask[r, :self._lens[i]] = 1
    return {"ids": ids, "mask": mask}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    e, b = divmod(self.position, self._per_epoch)
    self.position += 1
    return self.batch(self._epoch(e)[b])

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def make_loss_fn(teacher_cfg: BertConfig, student_cfg: BertConfig, weights) -> Callable:
  """`(params, batch, rng, teacher) -> (loss, metrics)` for `fit` (teacher passed frozen)."""
  t_model, s_model = BertEncoder(teacher_cfg), BertEncoder(student_cfg)
  w = {k: float(weights.get(k, 0.0)) for k in ("emb_cos", "hidden_cos", "hidden_mse", "sim_mse")}
  if not any(w.values()):
    raise ValueError("config.loss gives every term weight 0; set e.g. loss.emb_cos=1.0")

  def loss_fn(params, batch, rng, teacher):
    del rng  # No dropout.
    t = t_model.apply(jax.lax.stop_gradient(teacher), batch["ids"], batch["mask"])
    s = s_model.apply(params, batch["ids"], batch["mask"])
    terms = {
        # Both embeddings are unit vectors, so 1 - dot is the cosine distance.
        "emb_cos": losses.hidden_cosine_loss(t.embedding, s.embedding),
        "hidden_cos": losses.hidden_cosine_loss(t.hidden_states, s.hidden_states, batch["mask"]),
        "hidden_mse": losses.hidden_mse_loss(t.hidden_states, s.hidden_states, batch["mask"]),
    }
    sim_t = t.embedding @ t.embedding.T  # [B, B]
    sim_s = s.embedding @ s.embedding.T  # [B, B]
    terms["sim_mse"] = jnp.mean((jax.lax.stop_gradient(sim_t) - sim_s) ** 2)
    loss = sum(w[k] * terms[k] for k in w if w[k])
    return loss, {**terms, "tokens": batch["mask"].sum().astype(jnp.float32)}

  return loss_fn


def validate(config):
  """Checks the fields this task reads; returns (teacher spec, student spec)."""
  from effjax.train import loop
  loop.validate_config(config)
  for name in ("teacher", "student", "text", "loss", "batch_size", "eval_task"):
    if name not in config:
      raise ValueError(f"config.{name} is missing; see configs/distill/minilm_l3.py")
  t_cfg = teacher_lib.model_config(config.teacher, "config.teacher")
  s_cfg = teacher_lib.model_config(config.student, "config.student")
  if not isinstance(t_cfg, BertConfig) or not isinstance(s_cfg, BertConfig):
    raise ValueError("the distill_bert task needs bert/* teacher and student models; got "
                     f"{config.teacher.model!r} and {config.student.model!r}")
  student_init.check_same_vocab(t_cfg, s_cfg)
  if config.student.init not in ("teacher_layers", "scratch"):
    raise ValueError(f"config.student.init={config.student.init!r}; use 'teacher_layers' or "
                     "'scratch'")
  if config.student.init == "teacher_layers":
    layer_map = _layer_map(config, t_cfg)
    if len(layer_map) != s_cfg.num_layers:
      raise ValueError(f"config.student.layer_map {list(layer_map)} has {len(layer_map)} entries "
                       f"but the student has {s_cfg.num_layers} layers")
  return t_cfg, s_cfg


def _layer_map(config, t_cfg) -> tuple[int, ...]:
  lm = config.student.get("layer_map", None)
  lm = student_init.every_other_layer(t_cfg.num_layers) if lm is None else tuple(lm)
  return student_init.check_layer_map(lm, t_cfg.num_layers)


def check(config):
  """Validates `config`; returns the student's abstract params (no weights are loaded)."""
  _, s_cfg = validate(config)
  return teacher_lib.abstract_params(s_cfg)


def _texts(config, tokenizer):
  """(training ids, validation ids, evaluation task) from WordNet."""
  from effjax.eval import wordnet_retrieval as wr
  task = wr.build_task(config.eval_task.num_items, seed=config.eval_task.seed)
  texts = wr.training_texts(task, max_texts=config.text.max_texts + config.text.val_texts)
  enc = [tokenizer.encode(t) for t in texts]
  return enc[config.text.val_texts:], enc[:config.text.val_texts], task


def _tokenizer(config, t_cfg, max_len: int):
  """The teacher's WordPiece tokenizer, truncating at `max_len` tokens."""
  from effjax.interop import hf_bert
  src = str(config.teacher.checkpoint)
  path = (os.path.join(src[3:], "tokenizer.json") if src.startswith("hf:")
          else hf_bert.minilm_dir() / "tokenizer.json")
  tok = hf_bert.WordPieceTokenizer(path, max_len=max_len)
  # Random smoke-test teachers with a small vocabulary: MiniLM's ids clipped into theirs.
  tok.clip_to = t_cfg.vocab_size if t_cfg.vocab_size < tok.vocab_size else None
  return tok


@tasks.register("distill_bert", check=check)
def run(config, workdir: str) -> dict:
  """Distils, then scores teacher and student; writes `workdir/distill_results.json`."""
  from effjax.train import loop
  t_cfg, s_cfg = validate(config)
  t_cfg, teacher_params = teacher_lib.load_teacher(config.teacher, "config.teacher")
  tokenizer = _tokenizer(config, t_cfg, config.text.max_len)
  train_ids, val_ids, task = _texts(config, tokenizer)
  clip = tokenizer.clip_to
  if clip:
    train_ids = [[min(i, clip - 1) for i in x] for x in train_ids]
    val_ids = [[min(i, clip - 1) for i in x] for x in val_ids]

  if config.student.init == "teacher_layers":
    s_cfg, s_values = student_init.init_student_from_teacher(
        teacher_params, t_cfg, _layer_map(config, t_cfg), s_cfg)
    init_fn = lambda rng: teacher_lib.rebox_like(s_cfg, s_values)
  else:
    init_fn = lambda rng: teacher_lib.init_boxed(s_cfg, rng)

  batches = TextBatches(train_ids, config.batch_size, config.seed, tokenizer.pad_id)
  val = TextBatches(val_ids, config.batch_size, config.seed + 1, tokenizer.pad_id)
  evals = [next(val) for _ in range(max(len(val_ids) // config.batch_size, 0))]
  data = loop.Data(train=batches, get_state=batches.get_state, set_state=batches.set_state,
                   eval=evals)
  t0 = time.perf_counter()
  result = loop.fit(config, workdir, init_fn=init_fn,
                    loss_fn=make_loss_fn(t_cfg, s_cfg, config.loss), data=data,
                    frozen={"teacher": teacher_params})
  train_s = time.perf_counter() - t0
  student_params = jax.device_get(result.state.params)

  scores = {}
  if config.eval_task.num_items > 0:
    from effjax.eval import wordnet_retrieval as wr
    bs = config.eval_task.batch_size
    eval_tok = _ClipTokenizer(_tokenizer(config, t_cfg, min(t_cfg.max_len, 256)), clip)
    encode = lambda cfg, p: make_encoder(cfg, p, eval_tok, bs)
    scores["teacher"] = wr.evaluate(encode(t_cfg, teacher_params), task)
    scores["student"] = wr.evaluate(encode(s_cfg, student_params), task)
    if config.eval_task.get("score_student_init", False) and config.student.init == \
        "teacher_layers":
      _, init_values = student_init.init_student_from_teacher(
          teacher_params, t_cfg, _layer_map(config, t_cfg), s_cfg)
      scores["student_init"] = wr.evaluate(encode(s_cfg, init_values), task)
    scores["kept"] = {k: scores["student"][k] / max(scores["teacher"][k], 1e-12)
                      for k in scores["teacher"]}
  out = {"steps": result.step, "train_seconds": train_s, "train_metrics": result.train_metrics,
         "eval_metrics": result.eval_metrics, "retrieval": scores,
         "teacher_layers": t_cfg.num_layers, "student_layers": s_cfg.num_layers,
         "num_items": config.eval_task.num_items}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "distill_results.json"), "w") as f:
      json.dump(out, f, indent=1)
  return out


class _ClipTokenizer:
  """Clips ids into a smaller random teacher's vocabulary (smoke tests only)."""

  def __init__(self, tok, clip: Optional[int]):
    self._tok, self._clip = tok, clip

  def encode_batch(self, texts):
    ids, mask = self._tok.encode_batch(texts)
    return (np.minimum(ids, self._clip - 1) if self._clip else ids), mask
