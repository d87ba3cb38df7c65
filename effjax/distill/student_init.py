"""Students built from teachers: copy a chosen subset of the teacher's layers (DistilBERT).

Works for any effjax model whose blocks are named `layer_{i}` and whose config has `num_layers` and
`replace(...)`: the decoder LM (`effjax.models.lm`) and the BERT encoder (`effjax.models.bert`).
Everything outside the blocks (embeddings, final norm, head) is copied whole; block i of the student
is teacher block `layer_map[i]`.

DistilBERT (Sanh et al. 2019) keeps every other layer: a 12-layer teacher gives a 6-layer student
from layers (0, 2, 4, 6, 8, 10); a 6-layer MiniLM gives a 3-layer student from (0, 2, 4).

Also here: the vocabulary check that distillation needs (teacher and student distributions must be
over the same tokens) and an explicit mapping for when they are not.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_LAYER = re.compile(r"^layer_(\d+)$")


def every_other_layer(num_teacher_layers: int, align: str = "first") -> tuple[int, ...]:
  """Every other teacher layer (DistilBERT's map), ceil(L / 2) of them for align="first".

  Args:
    num_teacher_layers: L.
    align: "first" keeps layers 0, 2, 4, ...; "last" keeps ..., L-5, L-3, L-1, so the student ends
      with the teacher's last layer and starts in the teacher's output space (for L = 6: (1, 3, 5)
      instead of (0, 2, 4); the better start for matching pooled sentence embeddings).
  """
  if num_teacher_layers < 1:
    raise ValueError(f"a teacher needs at least one layer, got {num_teacher_layers}")
  if align == "first":
    return tuple(range(0, num_teacher_layers, 2))
  if align == "last":
    return tuple(range((num_teacher_layers - 1) % 2, num_teacher_layers, 2))
  raise ValueError(f"align={align!r}; use 'first' (layers 0, 2, ...) or 'last' (..., L-3, L-1)")


def check_layer_map(layer_map: Sequence[int], num_teacher_layers: int) -> tuple[int, ...]:
  """Validates a student-to-teacher layer map; returns it as a tuple of ints."""
  layer_map = tuple(int(i) for i in layer_map)
  if not layer_map:
    raise ValueError("layer_map is empty; a student needs at least one layer (e.g. "
                     f"every_other_layer({num_teacher_layers}))")
  bad = [i for i in layer_map if not 0 <= i < num_teacher_layers]
  if bad:
    raise ValueError(f"layer_map {list(layer_map)} names teacher layers {bad}, but the teacher has "
                     f"{num_teacher_layers} layers (valid indices 0..{num_teacher_layers - 1})")
  if len(set(layer_map)) != len(layer_map):
    raise ValueError(f"layer_map {list(layer_map)} repeats a teacher layer; each student layer "
                     "must start from a different teacher layer")
  return layer_map


def student_config_from_teacher(teacher_config, layer_map: Sequence[int]):
  """The teacher's config with `num_layers = len(layer_map)`."""
  layer_map = check_layer_map(layer_map, teacher_config.num_layers)
  return teacher_config.replace(num_layers=len(layer_map))


def _check_same_widths(teacher_config, student_config):
  """Every config field but num_layers must agree, or copied weights would not fit."""
  t = dataclasses.asdict(teacher_config)
  s = dataclasses.asdict(student_config)
  ignore = {"num_layers", "dtype", "attention_impl", "matmul_precision", "remat",
            "attention_kv_chunk", "max_len"}
  diff = {k: (t[k], s.get(k)) for k in t if k not in ignore and t[k] != s.get(k)}
  if diff:
    raise ValueError("student and teacher configs differ in "
                     + ", ".join(f"{k} (teacher {a}, student {b})" for k, (a, b) in diff.items())
                     + "; initialising from teacher layers needs equal widths: build the student "
                     "config with student_config_from_teacher(teacher_config, layer_map)")


def init_student_from_teacher(teacher_params: dict, teacher_config, layer_map: Sequence[int],
                              student_config=None) -> tuple[object, dict]:
  """Builds a student whose block i is a copy of teacher block `layer_map[i]`.

  Args:
    teacher_params: `{'params': ...}` (or the inner dict) of the teacher, unboxed.
    teacher_config: the teacher's config (LMConfig or BertConfig).
    layer_map: teacher layer index for each student layer, e.g. `every_other_layer(L)`.
    student_config: optional; must equal the teacher's apart from num_layers (and numerics), with
      num_layers == len(layer_map). Default: `student_config_from_teacher`.

  Returns:
    (student_config, student_params) with fresh copies of the arrays, so the teacher's buffers are
    never aliased by the student's (donated or updated) training state.
  """
  layer_map = check_layer_map(layer_map, teacher_config.num_layers)
  if student_config is None:
    student_config = student_config_from_teacher(teacher_config, layer_map)
  _check_same_widths(teacher_config, student_config)
  if student_config.num_layers != len(layer_map):
    raise ValueError(f"student_config.num_layers={student_config.num_layers} but layer_map has "
                     f"{len(layer_map)} entries; they must agree")
  wrapped = "params" in teacher_params
  tp = teacher_params["params"] if wrapped else teacher_params
  layer_keys = sorted((int(m.group(1)) for k in tp if (m := _LAYER.match(k))))
  if layer_keys != list(range(teacher_config.num_layers)):
    raise ValueError(f"teacher params hold layers {layer_keys}, but teacher_config.num_layers="
                     f"{teacher_config.num_layers}; are these the teacher's params?")
  copy = lambda tree: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)
  sp = {k: copy(v) for k, v in tp.items() if not _LAYER.match(k)}
  for i, j in enumerate(layer_map):
    sp[f"layer_{i}"] = copy(tp[f"layer_{j}"])
  return student_config, ({"params": sp} if wrapped else sp)


def check_same_vocab(teacher_config, student_config, vocab_map: Optional[np.ndarray] = None):
  """Raises unless teacher and student score the same tokens (or `vocab_map` bridges them).

  Configs that name their tokenizer (`tokenizer` field) must name the same one; otherwise the
  vocabulary sizes must agree.
  """
  t_name = getattr(teacher_config, "tokenizer", None)
  s_name = getattr(student_config, "tokenizer", None)
  if vocab_map is not None:
    vocab_map = np.asarray(vocab_map)
    if vocab_map.shape != (student_config.vocab_size,):
      raise ValueError(f"vocab_map has shape {vocab_map.shape}; it needs one teacher id per "
                       f"student id, shape ({student_config.vocab_size},)")
    if vocab_map.max(initial=-1) >= teacher_config.vocab_size or vocab_map.min(initial=0) < -1:
      raise ValueError(f"vocab_map ids must lie in [-1, {teacher_config.vocab_size}) (-1: the "
                       "teacher has no such token)")
    return
  if t_name != s_name:
    raise ValueError(f"teacher tokenizer {t_name!r} and student tokenizer {s_name!r} differ: their "
                     "distributions are over different tokens. Use the same tokenizer, or pass an "
                     "explicit vocab_map (student id -> teacher id)")
  if teacher_config.vocab_size != student_config.vocab_size:
    raise ValueError(f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
                     f"{student_config.vocab_size}: distillation compares distributions over the "
                     "same vocabulary. Give both the same vocab_size, or pass an explicit vocab_map "
                     "(student id -> teacher id)")


def map_teacher_logits(teacher_logits: jax.Array, vocab_map: jax.Array) -> jax.Array:
  """Teacher logits [..., V_t] -> [..., V_s] in the student's vocabulary.

  `vocab_map[i]` is the teacher id of student token i, or -1 when the teacher has none; those get
  logit -inf (probability 0; the divergences in `losses` handle the zero corners).
  """
  vocab_map = jnp.asarray(vocab_map, jnp.int32)
  gathered = jnp.take(teacher_logits, jnp.maximum(vocab_map, 0), axis=-1)  # [..., V_s]
  return jnp.where(vocab_map >= 0, gathered, -jnp.inf)
