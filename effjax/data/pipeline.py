"""grain pipelines: shuffled, packed, batched byte-level LM batches with a checkpointable iterator.

Training pipeline (per process):

    source (TFDS ArrayRecord, random access)
      -> _DocumentGroups                     this process's documents (shard_index::shard_count), a
                                             new seeded order every epoch, forever; tokenized as
                                             BOS, UTF-8 bytes, EOS; 16 documents per element
      -> _PackIterator                       concat-and-chunk into rows of seq_len + 1 tokens
      -> _WindowShuffleIterator              rows shuffled within windows, so a batch does not hold
                                             one long file's consecutive rows
      -> batch(batch_size) -> to_model_batch

Batches are numpy dicts (T = seq_len):
  inputs      [B, T] int32    tokens fed to the model (PAD_ID=256 in padding)
  targets     [B, T] int32    the next token of each input
  segment_ids [B, T] int32    document number within the row, from 1; 0 = padding
  positions   [B, T] int32    0 at each segment start (a document continued from the previous row
                              restarts at 0 too: its earlier part is not visible, and RoPE only sees
                              relative positions)
  mask        [B, T] float32  1 where the target is the next token of the same document; 0 for padding
                              and for the EOS -> next-BOS pair across a document boundary

Rows are cut as non-overlapping windows of T + 1 tokens, so the pair straddling two rows is not
trained (1 target in T + 1): the price of rows that are independent of each other.

Checkpointing: the iterator is a `grain.DatasetIterator` whose state is small JSON (indices and
offsets, never data), so the Orbax handler `grain.checkpoint.CheckpointSave/CheckpointRestore` stores it
per process; see `iterator_state` for the exact trainer recipe. The state embeds a fingerprint of the
pipeline (corpus hash, seq_len, batch size, seed, shard), and restoring into a different pipeline is an
error rather than silently different data.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from effjax.data import config as config_lib
from effjax.data import tokenizer

# Documents per element of the document stage (see _DocumentGroups).
_GROUP_DOCS = 16
# One read-ahead thread: it overlaps record decoding with packing (and with the train step, which
# releases the GIL). More threads were slower on 2 shared cores: thread hand-offs cost more than reads.
_READ_OPTIONS = dict(num_threads=1, prefetch_buffer_size=8)


def _text_of(record, text_key: str):
  return record[text_key] if isinstance(record, Mapping) else record


class _DocumentGroups(grain.MapDataset):
  """Element g: a list of up to `group` tokenized documents of this shard, in a seeded per-epoch order.

  Sharding, the per-epoch shuffle, repetition and tokenization in one random-access stage. Why not
  grain's `source[shard::count].shuffle(seed).repeat().map(...)`: grain 0.2.18 spends ~70 us of
  bookkeeping per element in that chain, plus an index shuffle that costs ~0.2 ms per element on a few
  hundred documents (~8 ms on ten). Short documents (lm1b sentences, ~130 bytes) made that the step
  time; one element per `group` documents and one numpy permutation per epoch make it negligible.
  Groups never straddle epochs, so element g always means the same documents.
  """

  def __init__(self, source: Sequence[Any], *, text_key: str, shard_index: int, shard_count: int,
               max_docs: Optional[int], seed: Optional[int], group: int, epochs: Optional[int]):
    super().__init__()
    total = len(source) if max_docs is None else min(len(source), max_docs)
    self._source, self._text_key = source, text_key
    self._shard_index, self._shard_count = shard_index, shard_count
    self._n = len(range(shard_index, total, shard_count))  # Documents in this shard.
    self._seed, self._group, self._epochs = seed, group, epochs
    self._groups_per_epoch = -(-self._n // group)
    self._perms: dict[int, np.ndarray] = {}  # The last two epochs: read-ahead may straddle one.

  @property
  def num_docs(self) -> int:
    return self._n

  def __len__(self) -> int:
    return sys.maxsize if self._epochs is None else self._groups_per_epoch * self._epochs

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:  # 4 bytes per document, computed once per epoch.
      perm = np.random.default_rng([self._seed, 0, epoch]).permutation(self._n).astype(np.int32)
      self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1} | {epoch: perm}
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, g = divmod(int(index), self._groups_per_epoch)
    local = np.arange(g * self._group, min((g + 1) * self._group, self._n))
    if self._seed is not None:
      local = self._perm(epoch)[local]
    ids = self._shard_index + self._shard_count * local
    return [tokenizer.document_ids(_text_of(self._source[int(i)], self._text_key)) for i in ids]


class _PackIterator(grain.DatasetIterator):
  """Concatenates token documents and cuts the stream into rows of `row_len`, with segments.

  The parent yields groups (lists) of documents. State: the parent's state before the current group,
  the document index in it and the token offset where the next row begins; restoring re-reads one
  group, nothing else. We own this instead of using grain's ConcatThenSplit packer, whose state does not
  survive a JSON round trip in grain 0.2.18 (a tuple comes back as a list and a document is silently
  skipped).
  """

  def __init__(self, parent: grain.DatasetIterator, *, row_len: int, fingerprint: dict):
    super().__init__(parent)
    self._row_len = row_len
    self._fingerprint = fingerprint
    self._arange = np.arange(row_len, dtype=np.int32)
    self._group: list = []
    self._group_state = None  # Parent state before `self._group` was read.
    self._doc = 0  # Index in `self._group` of the document being cut.
    self._offset = 0  # Tokens of that document already emitted.
    self._exhausted = False

  def _pull_group(self) -> bool:
    self._group_state = self._parent.get_state()
    try:
      self._group = next(self._parent)
    except StopIteration:
      self._group, self._exhausted = [], True
      return False
    self._doc = self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    n = self._row_len
    tokens = np.full(n, tokenizer.PAD_ID, np.int32)  # [T + 1]
    segment_ids = np.zeros(n, np.int32)  # [T + 1]
    positions = np.zeros(n, np.int32)  # [T + 1]
    filled = segment = 0
    while filled < n:
      if self._doc >= len(self._group):
        if self._exhausted or not self._pull_group():
          break
        continue  # Re-check: an empty group is skipped.
      doc = self._group[self._doc]
      take = min(n - filled, len(doc) - self._offset)
      segment += 1
      tokens[filled:filled + take] = doc[self._offset:self._offset + take]
      segment_ids[filled:filled + take] = segment
      positions[filled:filled + take] = self._arange[:take]
      filled += take
      self._offset += take
      if self._offset >= len(doc):
        self._doc, self._offset = self._doc + 1, 0
    if filled == 0:
      raise StopIteration
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict[str, Any]:
    partial = self._doc < len(self._group)
    return {
        "pipeline": self._fingerprint,
        "parent": self._group_state if partial else self._parent.get_state(),
        "doc": int(self._doc) if partial else 0,
        "offset": int(self._offset) if partial else 0,
        "partial": bool(partial),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, Mapping) or "pipeline" not in state:
      raise ValueError(f"not an effjax data-iterator state ({type(state).__name__}); restore states "
                       "written by effjax.data.pipeline.iterator_state for this same pipeline")
    if state["pipeline"] != self._fingerprint:
      diff = {k: (state["pipeline"].get(k), v) for k, v in self._fingerprint.items()
              if state["pipeline"].get(k) != v}
      raise ValueError(f"data-iterator state was saved by a different pipeline; differing "
                       f"(saved, current): {diff}. Restore with the data config, seq_len, batch size, "
                       "seed and shard the run started with, or start the data from scratch")
    self._parent.set_state(state["parent"])
    self._group, self._doc, self._offset, self._exhausted = [], 0, 0, False
    if state["partial"]:
      if not self._pull_group() or state["doc"] >= len(self._group):
        raise ValueError("data-iterator state points past the end of the data; the corpus changed")
      self._group_state = state["parent"]
      self._doc, self._offset = int(state["doc"]), int(state["offset"])


class _PackIterDataset(grain.IterDataset):
  """IterDataset wrapper of `_PackIterator` (rows of `row_len` tokens)."""

  def __init__(self, parent: grain.IterDataset, *, row_len: int, fingerprint: dict):
    super().__init__(parent)
    self._row_len = row_len
    self._fingerprint = fingerprint

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), row_len=self._row_len,
                         fingerprint=self._fingerprint)


class _WindowShuffleIterator(grain.DatasetIterator):
  """Emits the parent's elements in a seeded random order within consecutive windows of `window` items.

  Same contract as grain's WindowShuffleIterDataset (state: the parent's state at the window start and
  the position in it; restoring refills that window), but permutes with one numpy call per window: grain
  0.2.18 calls its index shuffle once per element, 0.2-0.4 ms each for windows of a few hundred, which
  alone made its pipeline ~10x slower than this one (benchmarks/data_pipeline.py).
  """

  def __init__(self, parent: grain.DatasetIterator, *, window: int, seed: int):
    super().__init__(parent)
    self._window, self._seed = window, seed
    self._buffer: list = []
    self._window_index = 0
    self._pos = 0  # Items of the current window already emitted.
    self._window_state = self._parent.get_state()

  def _fill(self) -> None:
    self._window_state = self._parent.get_state()
    items = []
    for _ in range(self._window):
      try:
        items.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self._seed, 1, self._window_index]).permutation(len(items))
    self._buffer = [items[i] for i in order]
    self._pos = 0

  def __next__(self):
    if self._pos >= len(self._buffer):
      if self._buffer:
        self._window_index += 1
      self._fill()
      if not self._buffer:
        raise StopIteration
    item = self._buffer[self._pos]
    self._pos += 1
    return item

  def get_state(self) -> dict[str, Any]:
    if self._pos >= len(self._buffer):  # Between windows: the next one starts at the parent's state.
      return {"parent": self._parent.get_state(),
              "window_index": self._window_index + (1 if self._buffer else 0), "pos": 0}
    return {"parent": self._window_state, "window_index": self._window_index, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._window_index = int(state["window_index"])
    self._buffer, self._pos = [], 0
    if state["pos"] > 0:
      self._fill()
      self._pos = int(state["pos"])


class _WindowShuffleIterDataset(grain.IterDataset):
  """IterDataset wrapper of `_WindowShuffleIterator`."""

  def __init__(self, parent: grain.IterDataset, *, window: int, seed: int):
    super().__init__(parent)
    self._window, self._seed = window, seed

  def __iter__(self) -> _WindowShuffleIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), window=self._window, seed=self._seed)


def to_model_batch(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[B, T + 1] packed rows -> the documented [B, T] model batch (inputs, targets, segment_ids, ...)."""
  tokens, seg, pos = rows["tokens"], rows["segment_ids"], rows["positions"]  # [B, T + 1] each
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)  # [B, T]
  return {
      "inputs": np.ascontiguousarray(tokens[:, :-1]),
      "targets": np.ascontiguousarray(tokens[:, 1:]),
      "segment_ids": np.ascontiguousarray(seg[:, :-1]),
      "positions": np.ascontiguousarray(pos[:, :-1]),
      "mask": same_doc.astype(np.float32),
  }


def _check_shapes(seq_len: int, batch_size: int, shard_index: int, shard_count: int) -> None:
  for name, v, lo in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                      ("shard_count", shard_count, 1), ("shard_index", shard_index, 0)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
  if shard_index >= shard_count:
    raise ValueError(f"shard_index {shard_index} must be < shard_count {shard_count}; pass "
                     "jax.process_index() and jax.process_count()")


def _document_groups(source: Sequence[Any], *, text_key: str, shard_index: int, shard_count: int,
                     max_docs: Optional[int], seed: Optional[int], epochs: Optional[int],
                     what: str) -> grain.IterDataset:
  docs = _DocumentGroups(source, text_key=text_key, shard_index=shard_index,
                         shard_count=shard_count, max_docs=max_docs, seed=seed,
                         group=_GROUP_DOCS, epochs=epochs)
  if docs.num_docs == 0:
    raise ValueError(f"{what}: shard {shard_index} of {shard_count} has no documents "
                     f"({len(source)} in the split); use fewer shards or more data (max_docs)")
  return docs.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))


def make_train_dataset(source: Sequence[Any], *, seq_len: int, batch_size: int, seed: int,
                       text_key: str = "text", shard_index: int = 0, shard_count: int = 1,
                       shuffle_docs: bool = True, shuffle_window: int = 0,
                       max_docs: Optional[int] = None,
                       fingerprint: Optional[dict] = None) -> grain.IterDataset:
  """The infinite training IterDataset over any random-access source of text records.

  `train_iterator` is this plus opening the configured corpus; tests call it on a Python list.

  Args:
    source: random-access sequence of records (dicts with `text_key`, or plain strings/bytes).
    seq_len: T; rows hold T + 1 tokens (inputs and shifted targets).
    batch_size: rows per batch (per process).
    seed: document-order and row-window shuffle seed (an int in [0, 2**32)).
    text_key: the record field holding the text.
    shard_index, shard_count: this process's share of documents (`jax.process_index/count()`).
    shuffle_docs: shuffle documents per epoch (off only for hand-checked tests).
    shuffle_window: shuffle packed rows within windows of this many rows (0: off).
    max_docs: use only the first `max_docs` documents of the source.
    fingerprint: extra JSON-able facts (e.g. the corpus hash) stored in the state, checked on restore.

  Returns:
    An IterDataset of model batches (see the module doc); `iter()` it for a checkpointable iterator.
  """
  _check_shapes(seq_len, batch_size, shard_index, shard_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed!r}")
  fp = dict(fingerprint or {}, seq_len=int(seq_len), batch_size=int(batch_size), seed=int(seed),
            shard_index=int(shard_index), shard_count=int(shard_count),
            shuffle_docs=bool(shuffle_docs), shuffle_window=int(shuffle_window),
            max_docs=None if max_docs is None else int(max_docs), text_key=text_key)
  fp = json.loads(json.dumps(fp))  # Exactly what a JSON round trip of the state gives back.
  ds = _document_groups(source, text_key=text_key, shard_index=shard_index,
                        shard_count=shard_count, max_docs=max_docs,
                        seed=seed if shuffle_docs else None, epochs=None, what="training data")
  ds = _PackIterDataset(ds, row_len=seq_len + 1, fingerprint=fp)
  if shuffle_window > 1:
    ds = _WindowShuffleIterDataset(ds, window=shuffle_window, seed=seed)
  return ds.batch(batch_size, drop_remainder=True).map(to_model_batch)


def open_source(data_cfg, split: str) -> tuple[Sequence[Any], str]:
  """Opens `split` ("train" or "eval") of the configured corpus, building the stdlib one if needed.

  Returns:
    (random-access source, corpus id for fingerprints: the stdlib content sha256, or the TFDS
    dataset's full name and split size; not its directory, so a moved data_dir still resumes).
  """
  config_lib.validate_data_config(data_cfg)
  data_dir = config_lib.resolve_data_dir(data_cfg.data_dir)
  if data_cfg.name == config_lib.STDLIB:
    from effjax.data import stdlib_builder  # Lazy: TFDS import is slow and tests may not need it.
    builder, manifest = stdlib_builder.prepare(data_dir, val_fraction=data_cfg.val_fraction,
                                               max_docs=data_cfg.max_docs)
    tfds_split = "train" if split == "train" else "validation"
    if tfds_split not in builder.info.splits:
      raise ValueError(f"the stdlib corpus has no {tfds_split!r} documents with val_fraction="
                       f"{data_cfg.val_fraction}; raise val_fraction (default 0.05) to evaluate")
    return builder.as_data_source(tfds_split), manifest["sha256"]
  from effjax.data import tfds_text
  tfds_split = tfds_text.TRAIN_SPLIT if split == "train" else tfds_text.EVAL_SPLITS[data_cfg.name]
  source = tfds_text.open_split(data_cfg.name, tfds_split, data_dir, data_cfg.text_key)
  info = getattr(source, "dataset_info", None)
  full_name = info.full_name if info is not None else data_cfg.name
  return source, f"{full_name}:{tfds_split}:{len(source)}"


def train_iterator(data_cfg, *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable, infinite iterator of training batches from the configured corpus.

  Args:
    data_cfg: a `default_data_config()`-style ConfigDict.
    seq_len: T of the [B, T] batches.
    batch_size: B per process.
    seed: shuffle seed; the same seed gives the same batches.
    shard_index, shard_count: pass `jax.process_index(), jax.process_count()` on multi-host runs.

  Returns:
    A `grain.DatasetIterator` of numpy batch dicts; `get_state()`/`set_state()` (or
    `iterator_state`/`restore_iterator`) resume it exactly.
  """
  source, corpus_id = open_source(data_cfg, "train")
  fp = {"name": data_cfg.name, "corpus": corpus_id}
  ds = make_train_dataset(source, seq_len=seq_len, batch_size=batch_size, seed=seed,
                          text_key=data_cfg.text_key, shard_index=shard_index,
                          shard_count=shard_count, shuffle_window=data_cfg.get("shuffle_window", 0),
                          max_docs=data_cfg.max_docs, fingerprint=fp)
  return iter(ds)


def make_eval_batches(source: Sequence[Any], *, seq_len: int, batch_size: int,
                      max_batches: Optional[int], text_key: str = "text", shard_index: int = 0,
                      shard_count: int = 1, max_docs: Optional[int] = None) -> list[dict]:
  """One unshuffled pass over `source`, packed like training; the last batch is padded to B rows.

  Padding rows and tails have segment 0 and mask 0, so summing `mask`-weighted losses over the list
  evaluates every counted target exactly once. Stops after `max_batches` (None: the whole split).
  """
  _check_shapes(seq_len, batch_size, shard_index, shard_count)
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be None (whole split) or >= 1, got {max_batches!r}")
  ds = _document_groups(source, text_key=text_key, shard_index=shard_index,
                        shard_count=shard_count, max_docs=max_docs, seed=None, epochs=1,
                        what="evaluation data")
  ds = _PackIterDataset(ds, row_len=seq_len + 1, fingerprint={})
  ds = ds.batch(batch_size, drop_remainder=False)
  out = []
  for rows in ds:
    b = rows["tokens"].shape[0]
    if b < batch_size:  # Pad the final batch with empty rows: fixed shapes, no recompiles.
      pad = {"tokens": tokenizer.PAD_ID, "segment_ids": 0, "positions": 0}
      rows = {k: np.concatenate([v, np.full((batch_size - b, v.shape[1]), pad[k], v.dtype)])
              for k, v in rows.items()}
    out.append(to_model_batch(rows))
    if max_batches is not None and len(out) >= max_batches:
      break
  return out


def eval_batches(data_cfg, *, seq_len: int, batch_size: int, max_batches: Optional[int],
                 shard_index: int = 0, shard_count: int = 1) -> list[dict]:
  """A fixed, deterministic list of validation batches (the stdlib validation split, lm1b's test
  split, tiny_shakespeare's validation split); see `make_eval_batches`."""
  source, _ = open_source(data_cfg, "eval")
  return make_eval_batches(source, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                           text_key=data_cfg.text_key, shard_index=shard_index,
                           shard_count=shard_count, max_docs=data_cfg.max_docs)


def corpus_info(data_cfg) -> dict:
  """What this config reads, as JSON: the stdlib manifest (sorted files, split sizes, sha256), or the
  TFDS dataset's name, version, directory and split sizes. Log it (or save it) at the start of a run."""
  config_lib.validate_data_config(data_cfg)
  data_dir = config_lib.resolve_data_dir(data_cfg.data_dir)
  if data_cfg.name == config_lib.STDLIB:
    from effjax.data import stdlib_builder
    _, manifest = stdlib_builder.prepare(data_dir, val_fraction=data_cfg.val_fraction,
                                         max_docs=data_cfg.max_docs)
    return manifest
  from effjax.data import tfds_text
  return tfds_text.source_info(data_cfg.name, data_dir, data_cfg.text_key)


def describe(info: dict) -> str:
  """One log line from `corpus_info`: which corpus, its size, and what pins it (hash or version)."""
  if info.get("format", "").startswith("effjax-stdlib"):
    from effjax.data import stdlib_corpus
    return stdlib_corpus.describe(info)
  sizes = ", ".join(f"{k} {v['docs']} docs" for k, v in info.get("splits", {}).items())
  return f"TFDS {info.get('full_name', info.get('name'))} at {info.get('variant_dir')}: {sizes}"


def iterator_state(it: grain.DatasetIterator) -> dict:
  """The iterator's position as plain JSON (dicts, ints, strings): a few hundred bytes, no data.

  Trainer recipe (Orbax, multi-host safe: grain writes one file per process):

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(train_state),
          data=grain.checkpoint.CheckpointSave(it)))
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(it)))   # restores `it` in place

  Single-process alternative: `ocp.args.JsonSave(iterator_state(it))` and
  `restore_iterator(it, mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  ["data"])`. (`JsonSave` is written by process 0 only, so multi-host runs must use the grain args.)
  """
  state = it.get_state()
  try:
    return json.loads(json.dumps(state))
  except TypeError as e:
    raise ValueError(f"iterator state is not JSON-able ({e}); is `it` from effjax.data.pipeline?") \
        from e


def restore_iterator(it: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
  """Moves `it` (a fresh iterator of the same pipeline) to `state` from `iterator_state`, in place."""
  if not isinstance(state, Mapping):
    raise ValueError(f"iterator state must be the dict from iterator_state(), got {type(state)}")
  try:
    it.set_state(dict(state))
  except (KeyError, TypeError) as e:
    raise ValueError(f"iterator state does not match this pipeline ({e!r}); restore into an iterator "
                     "built with the same data config, seq_len, batch size, seed and shard") from e
