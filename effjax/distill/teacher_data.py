"""Sequence-level distillation data: a synthetic corpus the teacher writes, stored as a TFDS dataset.

Sequence-level KD (Kim & Rush 2016) trains the student with plain cross-entropy on the teacher's
own samples instead of the human corpus: the student learns the teacher's mode, which is what a
speculative draft must predict. Prompts are the openings of corpus windows; the teacher continues
each with `effjax.generate.generate` (one jitted program per batch).

Storage: a local `GeneratorBasedBuilder` writing ArrayRecord files (no TensorFlow, no network), one
record per sequence with features `tokens` (int32 [L], prompt then continuation) and `prompt_len`.
Read it back with `open_source(data_dir)` (a random-access TFDS data source, grain-compatible) and
batch it with `batches(...)`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

NAME = "effjax_teacher_sequences"
_META = "generation.json"


def _builder_class():
  """Imported lazily: TFDS is slow to import and only this path needs it."""
  import tensorflow_datasets as tfds
  from etils import epath

  class TeacherSequences(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Teacher-generated token sequences (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prompt + teacher continuation, byte-level token ids."}

    def __init__(self, *, sequences=(), prompt_lens=(), **kwargs):
      self._sequences, self._prompt_lens = list(sequences), list(prompt_lens)
      super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)  # TFDS's own lookup needs a backport on Python >= 3.9.

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description="Sequences sampled from a distillation teacher.",
          features=tfds.features.FeaturesDict({
              "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
              "prompt_len": tfds.features.Scalar(dtype=np.int32)}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (seq, p) in enumerate(zip(self._sequences, self._prompt_lens)):
        yield i, {"tokens": np.asarray(seq, np.int32), "prompt_len": np.int32(p)}

  return TeacherSequences


def generate_sequences(teacher_params, teacher_cfg, prompts: np.ndarray, *, gen_len: int,
                       temperature: float = 1.0, batch_size: int = 32, seed: int = 0,
                       eos_id: Optional[int] = None) -> list[np.ndarray]:
  """Continues each prompt [N, P] with `gen_len` teacher tokens; returns N arrays prompt + output.

  Rows that stop at `eos_id` keep the EOS and are shorter.
  """
  from effjax.generate.engine import generate
  from effjax.generate.sampling import SamplingParams
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] == 0:
    raise ValueError(f"prompts must be [num_sequences, prompt_len] token ids; got {prompts.shape}")
  sampling = SamplingParams(temperature=float(temperature))
  out = []
  for i in range(0, len(prompts), batch_size):
    block = prompts[i:i + batch_size]
    res = generate(teacher_params, teacher_cfg, block, max_new_tokens=gen_len, sampling=sampling,
                   rng=jax.random.key(seed * 1_000_003 + i), eos_id=eos_id)
    toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    out.extend(np.concatenate([block[r], toks[r, :lens[r]]]) for r in range(len(block)))
  return out


def write_dataset(data_dir: os.PathLike, sequences: Sequence[np.ndarray],
                  prompt_lens: Sequence[int], metadata: Optional[dict] = None):
  """Writes the sequences as TFDS dataset `effjax_teacher_sequences` under `data_dir`.

  An existing build in `data_dir` is replaced (the teacher or its settings may have changed);
  `metadata` (teacher, sampling) is saved beside it as generation.json.
  """
  if len(sequences) != len(prompt_lens) or not len(sequences):
    raise ValueError(f"need one prompt_len per sequence and at least one sequence; got "
                     f"{len(sequences)} sequences and {len(prompt_lens)} prompt lengths")
  import shutil
  import tensorflow_datasets as tfds
  data_dir = pathlib.Path(data_dir)
  cls = _builder_class()
  builder = cls(sequences=sequences, prompt_lens=prompt_lens, data_dir=str(data_dir),
                file_format="array_record")
  if pathlib.Path(builder.data_dir).exists():
    shutil.rmtree(builder.data_dir)
    builder = cls(sequences=sequences, prompt_lens=prompt_lens, data_dir=str(data_dir),
                  file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  with open(pathlib.Path(builder.data_dir) / _META, "w") as f:
    json.dump({"num_sequences": len(sequences), **(metadata or {})}, f, indent=1, default=str)
  return builder


def open_source(data_dir: os.PathLike):
  """The written dataset's train split as a random-access source (records are feature dicts)."""
  cls = _builder_class()
  builder = cls(data_dir=str(data_dir), file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(f"no teacher-generated dataset in {data_dir}; build it with "
                            "effjax.distill.teacher_data.write_dataset (the drafts experiment "
                            "does this before sequence-level KD)")
  return builder.as_data_source("train")


def metadata(data_dir: os.PathLike) -> dict:
  cls = _builder_class()
  builder = cls(data_dir=str(data_dir), file_format="array_record")
  path = pathlib.Path(builder.data_dir) / _META
  return json.loads(path.read_text()) if path.exists() else {}


class SequenceBatches:
  """Endless shuffled batches from a teacher-sequence source, for `fit`.

  Each row is one sequence right-padded to `seq_len + 1`, giving `inputs`/`targets` [B, seq_len],
  `mask` (1 on real targets; with `continuation_only`, only on the teacher's tokens),
  `positions` and `segment_ids` (1 real, 0 pad), the fields the LM task's batches have.
  """

  def __init__(self, source, *, seq_len: int, batch_size: int, seed: int, pad_id: int,
               continuation_only: bool = False):
    if len(source) < batch_size:
      raise ValueError(f"{len(source)} sequences cannot fill a batch of {batch_size}")
    self._src, self._t, self._bs, self._seed, self._pad = source, seq_len, batch_size, seed, pad_id
    self._cont = continuation_only
    self.position = 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    per_epoch = len(self._src) // self._bs
    e, b = divmod(self.position, per_epoch)
    self.position += 1
    order = np.random.default_rng([self._seed, e]).permutation(len(self._src))
    rows = [self._src[int(i)] for i in order[b * self._bs:(b + 1) * self._bs]]
    return self.collate(rows)

  def collate(self, rows) -> dict:
    t = self._t
    buf = np.full((len(rows), t + 1), self._pad, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for r, rec in enumerate(rows):
      seq = np.asarray(rec["tokens"])[:t + 1]
      buf[r, :len(seq)] = seq
      start = max(int(rec["prompt_len"]) - 1, 0) if self._cont else 0
      mask[r, start:len(seq) - 1] = 1
    seg = (np.arange(t)[None, :] < np.array([min(len(np.asarray(rec["tokens"])), t + 1)
                                             for rec in rows])[:, None]).astype(np.int32)
    return {"inputs": buf[:, :-1], "targets": buf[:, 1:], "mask": mask,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (len(rows), t)).copy(),
            "segment_ids": seg}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])
