"""Data pipeline: stdlib corpus and manifest, offline TFDS builder, grain packing, resume, sharding,
TFDS adapter field names (mock data only) and fast offline errors. CPU only, offline, ~10 s."""

import json
import os
import pathlib
import shutil
import time

import numpy as np
import pytest

from effjax.data import config as config_lib
from effjax.data import pipeline
from effjax.data import stdlib_corpus
from effjax.data import tokenizer

BOS, EOS, PAD = tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID

# A fake stdlib: what the scanner must keep, skip, and how it must order paths.
TINY_TREE = {
    "zeta.py": "z = 1\n",
    "alpha.py": "print('alpha')\n",
    "pkg/__init__.py": "",
    "pkg/mod.py": "def f():\n  return 'héllo'\n",
    "pkg/tests/test_mod.py": "assert True\n",
    "test/test_x.py": "x = 1\n",
    "site-packages/thirdparty.py": "y = 2\n",
    "idlelib/editor.py": "e = 3\n",
    "lib2to3/fixer.py": "f = 4\n",
    "notes.txt": "not python\n",
    ".hidden/h.py": "h = 5\n",
}
TINY_KEPT = ["alpha.py", "bad_latin1.py", "pkg/__init__.py", "pkg/mod.py", "zeta.py"]


def _write_tree(root: pathlib.Path) -> pathlib.Path:
  for rel, text in TINY_TREE.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  (root / "bad_latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # Not UTF-8.
  return root


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection fails the test: the builder and the adapter must stay offline."""
  import socket

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiny_root(tmp_path):
  return _write_tree(tmp_path / "stdlib")


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory):
  """The real stdlib corpus, 8 documents per split, built once into a temporary data dir."""
  cfg = config_lib.default_data_config()
  cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg.max_docs = 8
  cfg.shuffle_window = 16
  return cfg


def _rows(batch):
  """[B, T] batch -> [B, T + 1] packed rows (inputs plus the last target)."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _stream(batches):
  return np.concatenate([r for b in batches for r in _rows(b)])


def _documents_in(stream):
  """Complete BOS..EOS documents of a token stream, decoded (a leading partial one is dropped)."""
  docs, start = [], None
  for i, t in enumerate(stream.tolist()):
    if t == BOS:
      start = i
    elif t == EOS and start is not None:
      docs.append(bytes(stream[start + 1:i].astype(np.uint8)).decode("utf-8"))
      start = None
  return docs


def _text(record):
  t = record["text"] if isinstance(record, dict) else record
  return t.decode("utf-8") if isinstance(t, bytes) else t


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- corpus and manifest

def test_list_files_sorted_and_skips_non_corpus_dirs(tiny_root):
  assert stdlib_corpus.list_files(tiny_root) == TINY_KEPT


def test_manifest_sorted_hash_stable_and_content_sensitive(tiny_root, tmp_path):
  docs, m = stdlib_corpus.load_corpus(tiny_root, val_fraction=0.5)
  _, m2 = stdlib_corpus.load_corpus(tiny_root, val_fraction=0.5)
  paths = [f["path"] for f in m["files"]]
  assert paths == sorted(paths) == [d.path for d in docs]
  assert paths == [p for p in TINY_KEPT if p != "bad_latin1.py"]
  assert m["skipped_non_utf8"] == ["bad_latin1.py"]
  assert m["sha256"] == m2["sha256"] and json.loads(json.dumps(m)) == m
  assert sum(s["docs"] for s in m["splits"].values()) == len(docs)
  assert m["splits"]["train"]["bytes"] == sum(
      len((tiny_root / d.path).read_bytes()) for d in docs if d.split == "train")
  # The hash pins the content: one changed byte changes it; a copy elsewhere does not.
  copy = shutil.copytree(tiny_root, tmp_path / "copy")
  assert stdlib_corpus.load_corpus(copy, val_fraction=0.5)[1]["sha256"] == m["sha256"]
  (copy / "zeta.py").write_text("z = 2\n")
  assert stdlib_corpus.load_corpus(copy, val_fraction=0.5)[1]["sha256"] != m["sha256"]


def test_split_is_document_level_and_deterministic():
  files = stdlib_corpus.list_files()
  assert files == sorted(files) and len(files) > 100
  assert not any(set(f.split("/")[:-1]) & stdlib_corpus.SKIP_DIRS for f in files)
  splits = [stdlib_corpus.split_of(f, 0.05) for f in files]
  assert splits == [stdlib_corpus.split_of(f, 0.05) for f in files]
  frac = splits.count("validation") / len(files)
  assert 0.01 < frac < 0.12, frac  # ~5% by path hash, not by position
  # Raising val_fraction only moves documents train -> validation (the hash is per path).
  wider = [stdlib_corpus.split_of(f, 0.2) for f in files]
  assert all(w == "validation" for s, w in zip(splits, wider) if s == "validation")
  assert wider.count("validation") > splits.count("validation")


# ----------------------------------------------------------------------------- TFDS builder

def test_builder_builds_offline_reuses_and_rebuilds_on_new_hash(tiny_root, tmp_path, no_network):
  from effjax.data import stdlib_builder
  data_dir = str(tmp_path / "tfds")
  builder, manifest = stdlib_builder.prepare(data_dir, val_fraction=0.5, root=tiny_root)
  saved = json.loads(stdlib_builder.manifest_path(builder).read_text())
  assert saved == manifest
  for split in ("train", "validation"):
    src = builder.as_data_source(split)
    recs = [src[i] for i in range(len(src))]
    want = [f["path"] for f in manifest["files"] if f["split"] == split]
    assert [r["path"].decode() for r in recs] == want  # manifest order, no TFDS shuffling
    for r in recs:
      assert r["text"] == (tiny_root / r["path"].decode()).read_bytes()
  info_file = pathlib.Path(builder.data_dir) / "dataset_info.json"
  stamp = info_file.stat().st_mtime_ns
  _, again = stdlib_builder.prepare(data_dir, val_fraction=0.5, root=tiny_root)
  assert again == manifest and info_file.stat().st_mtime_ns == stamp  # reused, not rebuilt
  # Another corpus under the same config (think: another Python) is rebuilt, never served stale.
  (tiny_root / "alpha.py").write_text("print('changed')\n")
  b2, m2 = stdlib_builder.prepare(data_dir, val_fraction=0.5, root=tiny_root)
  assert m2["sha256"] != manifest["sha256"]
  assert json.loads(stdlib_builder.manifest_path(b2).read_text())["sha256"] == m2["sha256"]
  split = next(f["split"] for f in m2["files"] if f["path"] == "alpha.py")
  src = b2.as_data_source(split)
  assert b"print('changed')\n" in [src[i]["text"] for i in range(len(src))]


def test_stdlib_build_matches_manifest_and_corpus_info(stdlib_cfg):
  info = pipeline.corpus_info(stdlib_cfg)
  assert info["splits"]["train"]["docs"] == 8 and info["splits"]["validation"]["docs"] == 8
  train = {f["path"] for f in info["files"] if f["split"] == "train"}
  val = {f["path"] for f in info["files"] if f["split"] == "validation"}
  assert len(train) == len(val) == 8 and not train & val
  root = pathlib.Path(info["root"])
  src, corpus_id = pipeline.open_source(stdlib_cfg, "train")
  assert corpus_id == info["sha256"]
  assert {src[i]["path"].decode() for i in range(len(src))} == train
  assert src[0]["text"] == (root / src[0]["path"].decode()).read_bytes()
  assert info["sha256"][:16] in pipeline.describe(info)
  # Validation batches: the validation documents once, in manifest order; the same list every call.
  ev = pipeline.eval_batches(stdlib_cfg, seq_len=128, batch_size=4, max_batches=None)
  val_src, _ = pipeline.open_source(stdlib_cfg, "eval")
  want = np.concatenate([tokenizer.document_ids(val_src[i]["text"]) for i in range(len(val_src))])
  stream = _stream(ev)
  np.testing.assert_array_equal(stream[:len(want)], want)
  assert (stream[len(want):] == PAD).all() and len(stream) - len(want) < 4 * 129
  _assert_batches_equal(ev[:3], pipeline.eval_batches(stdlib_cfg, seq_len=128, batch_size=4,
                                                      max_batches=3))


# ----------------------------------------------------------------------------- packing

def test_packing_hand_checked():
  docs = [{"text": "ab"}, {"text": "cdef"}, {"text": "g"}]
  # Stream: [BOS a b EOS] [BOS c d e f EOS] [BOS g EOS] [BOS a b EOS] ... cut into rows of 6.
  it = iter(pipeline.make_train_dataset(docs, seq_len=5, batch_size=2, seed=0, shuffle_docs=False))
  a, b, c, d, e, f, g = (ord(ch) for ch in "abcdefg")
  b1, b2 = next(it), next(it)
  np.testing.assert_array_equal(b1["inputs"], [[BOS, a, b, EOS, BOS], [d, e, f, EOS, BOS]])
  np.testing.assert_array_equal(b1["targets"], [[a, b, EOS, BOS, c], [e, f, EOS, BOS, g]])
  np.testing.assert_array_equal(b1["segment_ids"], [[1, 1, 1, 1, 2], [1, 1, 1, 1, 2]])
  np.testing.assert_array_equal(b1["positions"], [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0]])
  np.testing.assert_array_equal(b1["mask"], [[1, 1, 1, 0, 1], [1, 1, 1, 0, 1]])
  # Row 3 starts with the EOS left over from "g"; the epoch wraps to "ab" without a gap.
  np.testing.assert_array_equal(b2["inputs"], [[EOS, BOS, a, b, EOS], [c, d, e, f, EOS]])
  np.testing.assert_array_equal(b2["segment_ids"], [[1, 2, 2, 2, 2], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(b2["positions"], [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(b2["mask"], [[0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
  for batch in (b1, b2):
    assert {k: v.dtype for k, v in batch.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "mask": np.float32}


def test_eval_batches_one_ordered_pass_with_padding():
  docs = ["ab", "cdef", "g"]
  ev = pipeline.make_eval_batches(docs, seq_len=5, batch_size=2, max_batches=None)
  want = np.concatenate([tokenizer.document_ids(t) for t in docs])  # 13 tokens: 3 rows of 6
  assert len(ev) == 2
  stream = _stream(ev)
  np.testing.assert_array_equal(stream[:len(want)], want)
  assert (stream[len(want):] == PAD).all()
  last = ev[-1]
  np.testing.assert_array_equal(last["segment_ids"], [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
  assert last["mask"].sum() == 0
  # Counted targets: the 3 + 5 + 2 next-token pairs inside documents, minus the two that straddle
  # rows (c->d, g->EOS): rows are independent windows.
  assert sum(b["mask"].sum() for b in ev) == (4 - 1) + (6 - 1) + (3 - 1) - 2
  _assert_batches_equal(ev[:1], pipeline.make_eval_batches(docs, seq_len=5, batch_size=2,
                                                           max_batches=1))


def test_stdlib_batches_shapes_and_one_epoch_is_a_permutation(stdlib_cfg):
  cfg = stdlib_cfg.copy_and_resolve_references()
  cfg.shuffle_window = 0  # So the row order is the stream order and documents can be re-read.
  src, _ = pipeline.open_source(cfg, "train")
  texts = sorted(_text(src[i]) for i in range(len(src)))
  epoch_tokens = sum(len(t.encode("utf-8")) + 2 for t in texts)
  it = pipeline.train_iterator(cfg, seq_len=64, batch_size=4, seed=5)
  batches = [next(it) for _ in range(2 * epoch_tokens // (4 * 65) + 4)]  # two epochs and a bit
  for b in batches[:50]:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((4, 64), np.int32), "targets": ((4, 64), np.int32),
        "segment_ids": ((4, 64), np.int32), "positions": ((4, 64), np.int32),
        "mask": ((4, 64), np.float32)}
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    starts = b["inputs"] == BOS
    assert (b["positions"][starts] == 0).all()
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    np.testing.assert_array_equal(b["positions"][:, 1:][same], b["positions"][:, :-1][same] + 1)
    assert (b["positions"][:, 1:][~same] == 0).all()
  docs = _documents_in(_stream(batches))
  assert len(docs) >= 16
  assert sorted(docs[:8]) == texts and sorted(docs[8:16]) == texts  # each epoch: every doc once
  assert docs[:8] != docs[8:16]  # reshuffled per epoch


# ----------------------------------------------------------------------------- determinism and resume

def test_same_seed_same_batches_other_seed_differs(stdlib_cfg):
  take = lambda seed: [next(it) for it in [pipeline.train_iterator(
      stdlib_cfg, seq_len=32, batch_size=2, seed=seed)] for _ in range(6)]
  a, b, c = take(0), take(0), take(1)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_resume_at_every_step_with_window_shuffle_and_epoch_wrap():
  # 37 documents: several read groups per epoch (pipeline._GROUP_DOCS), a short last group.
  docs = [f"doc{i}:" + "x" * (i * 3 % 17) for i in range(37)]
  assert pipeline._GROUP_DOCS < len(docs) < 3 * pipeline._GROUP_DOCS
  make = lambda: iter(pipeline.make_train_dataset(docs, seq_len=16, batch_size=2, seed=7,
                                                  shuffle_window=5))
  ref_it = make()
  ref, states = [], []
  for _ in range(140):  # ~2.5 epochs: partial documents, group, window and epoch boundaries.
    states.append(json.loads(json.dumps(pipeline.iterator_state(ref_it))))
    ref.append(next(ref_it))
  for n in range(0, 136):
    it = make()
    pipeline.restore_iterator(it, states[n])
    _assert_batches_equal([next(it) for _ in range(4)], ref[n:n + 4])


def test_resume_mid_epoch_through_orbax(stdlib_cfg, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  make = lambda: pipeline.train_iterator(stdlib_cfg, seq_len=64, batch_size=4, seed=3)
  it = make()
  for _ in range(9):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(12)]
  fresh = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal([next(fresh) for _ in range(12)], expected)
  # A state from another pipeline is refused with the differing fields, not silently reinterpreted.
  other = pipeline.train_iterator(stdlib_cfg, seq_len=64, batch_size=8, seed=3)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.restore_iterator(other, pipeline.iterator_state(it))


def test_shards_are_disjoint_and_cover_the_corpus():
  docs = [f"document number {i}" for i in range(13)]
  seen = []
  for shard in range(3):
    it = iter(pipeline.make_train_dataset(docs, seq_len=16, batch_size=2, seed=0,
                                          shard_index=shard, shard_count=3))
    got = _documents_in(_stream([next(it) for _ in range(20)]))
    epoch = set(got[:len(docs[shard::3])])
    assert epoch == set(got)  # only this shard's documents, every epoch
    seen.append(epoch)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  assert set.union(*seen) == set(docs)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_train_dataset(docs, seq_len=16, batch_size=2, seed=0, shard_index=3,
                                shard_count=3)


# ----------------------------------------------------------------------------- TFDS datasets

@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_tfds_adapter_reads_the_field_mock_data_has(name, tmp_path):
  import tensorflow_datasets as tfds
  from effjax.data import tfds_text
  # Looks prepared on disk; mock_data then serves random records shaped like the real dataset.
  variant = tmp_path / name / "1.0.0"
  variant.mkdir(parents=True)
  (variant / "dataset_info.json").write_text("{}")
  (variant / f"{name}-train.array_record-00000-of-00001").write_bytes(b"")
  cfg = config_lib.default_data_config()
  cfg.name, cfg.data_dir = name, str(tmp_path)
  cfg.shuffle_window = 0  # Consecutive rows, so documents can be read back from one batch.
  with tfds.testing.mock_data(num_examples=6):
    src = tfds_text.open_split(name, "train", str(tmp_path))
    assert list(src[0].keys()) == [tfds_text.TEXT_FIELDS[name]]
    batch = next(pipeline.train_iterator(cfg, seq_len=32, batch_size=2, seed=0))
    texts = [_text(src[i]) for i in range(len(src))]
    assert all(d in texts for d in _documents_in(_rows(batch).ravel()))
    assert batch["mask"].sum() > 0
    info = pipeline.corpus_info(cfg)
    assert info["features"] == [tfds_text.TEXT_FIELDS[name]] and name in pipeline.describe(info)
    with pytest.raises(ValueError, match="text_key"):
      tfds_text.open_split(name, "train", str(tmp_path), text_key="content")


def test_missing_tfds_dataset_fails_fast_offline_with_instructions(tmp_path, no_network):
  cfg = config_lib.default_data_config()
  cfg.name, cfg.data_dir = "lm1b", str(tmp_path / "empty")
  t0 = time.monotonic()
  with pytest.raises(ValueError) as err:
    pipeline.train_iterator(cfg, seq_len=32, batch_size=2, seed=0)
  assert time.monotonic() - t0 < 10
  msg = str(err.value)
  assert cfg.data_dir in msg and "tfds build lm1b" in msg and "array_record" in msg
  # Prepared in TFDS's default tfrecord format: also refused, with the rebuild command.
  variant = tmp_path / "tf" / "lm1b" / "1.1.0"
  variant.mkdir(parents=True)
  (variant / "dataset_info.json").write_text("{}")
  (variant / "lm1b-train.tfrecord-00000-of-00001").write_bytes(b"")
  cfg.data_dir = str(tmp_path / "tf")
  with pytest.raises(ValueError, match="tfrecord"):
    pipeline.eval_batches(cfg, seq_len=32, batch_size=2, max_batches=1)


# ----------------------------------------------------------------------------- config

def test_config_validation_and_data_dir(monkeypatch):
  cfg = config_lib.default_data_config()
  config_lib.validate_data_config(cfg)
  for field, value, match in [("name", "c4", "stdlib"), ("val_fraction", 1.0, "val_fraction"),
                              ("max_docs", 0, "max_docs"), ("text_key", "", "text_key")]:
    bad = cfg.copy_and_resolve_references()
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=match):
      config_lib.validate_data_config(bad)
  monkeypatch.setenv(config_lib.DATA_DIR_ENV, "/data/tfds")
  assert config_lib.resolve_data_dir(None) == "/data/tfds"
  assert config_lib.resolve_data_dir("/x/y") == "/x/y"
  monkeypatch.delenv(config_lib.DATA_DIR_ENV)
  assert config_lib.resolve_data_dir(None) == os.path.expanduser("~/.cache/effjax/tfds")
