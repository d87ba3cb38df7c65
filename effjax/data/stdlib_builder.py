"""A local TFDS builder for the stdlib corpus: ArrayRecord files plus a manifest, built offline.

Why TFDS at all for a corpus we could read straight from disk: the pipeline then has one input path for
every dataset (a random-access `tfds` data source read by grain), whether it is this corpus or a real
TFDS text dataset such as lm1b. The build takes about a second, needs no TensorFlow and no network
(`GeneratorBasedBuilder` writing `file_format="array_record"`), and is read back with
`builder.as_data_source(split)`.

Layout: `<data_dir>/effjax_stdlib/<config>/1.0.0/` holds the ArrayRecord shards, TFDS's
`dataset_info.json`, and our `manifest.json` (sorted file list, per-split sizes, sha256 over the
content). `<config>` encodes `val_fraction` and `max_docs`, e.g. `val5pct_all` or `val5pct_max20`.
When the stdlib on this machine no longer matches the saved manifest (another Python version, a patched
file) the variant is deleted and rebuilt, so the data on disk always equals what the manifest says.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Iterator, Optional, Sequence

import tensorflow_datasets as tfds
from etils import epath

from effjax.data import config as config_lib
from effjax.data import stdlib_corpus

NAME = "effjax_stdlib"
MANIFEST_FILE = "manifest.json"


def config_name(val_fraction: float, max_docs: Optional[int]) -> str:
  """TFDS config name for a (val_fraction, max_docs) choice, e.g. "val5pct_all", "val2p5pct_max20"."""
  pct = f"{val_fraction * 100:g}".replace(".", "p").replace("-", "m")
  return f"val{pct}pct_" + ("all" if max_docs is None else f"max{int(max_docs)}")


class EffjaxStdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The stdlib corpus as a TFDS dataset: features `text` (the file's source) and `path` (relative).

  Records keep manifest order (sorted paths; shuffling is the pipeline's job, seeded per epoch).
  Construct through `prepare()`, which also writes and checks the manifest. Not registered with TFDS's
  global registry, so `tfds.builder("effjax_stdlib")` does not find it; `prepare()` is the entry point.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Sorted stdlib *.py files, document-level split by path hash."}

  def __init__(self, *, documents: Sequence[stdlib_corpus.Document], **kwargs):
    self._documents = list(documents)
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves this through the `importlib_resources` backport, which it only installs on
    # Python < 3.9; the answer is simply this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="CPython standard-library source files (see effjax.data.stdlib_corpus).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    present = {d.split for d in self._documents}
    return {s: self._generate_examples(s) for s in stdlib_corpus.SPLITS if s in present}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    for d in self._documents:
      if d.split == split:
        yield d.path, {"text": d.text, "path": d.path}


@contextlib.contextmanager
def _build_lock(data_dir: str):
  """An exclusive file lock, so two processes sharing a data_dir do not build the same variant twice."""
  os.makedirs(data_dir, exist_ok=True)
  try:
    import fcntl  # POSIX only; elsewhere builds are simply not serialized.
  except ImportError:
    yield
    return
  with open(os.path.join(data_dir, f".{NAME}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: pathlib.Path) -> Optional[dict]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _write_json_atomic(path: pathlib.Path, obj: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)


def prepare(data_dir: Optional[str] = None, *, val_fraction: float = 0.05,
            max_docs: Optional[int] = None,
            root: Optional[os.PathLike] = None) -> tuple[EffjaxStdlib, dict]:
  """Builds the stdlib dataset in `data_dir` unless an identical build is already there.

  Reads the corpus (about 11 MB, a fraction of a second when cached by the OS), compares its sha256 with
  the saved manifest, and rebuilds the variant when they differ or the build is incomplete.

  Args:
    data_dir: TFDS data dir (None: `$EFFJAX_DATA_DIR`, else `~/.cache/effjax/tfds`).
    val_fraction: fraction of documents held out for validation, by path hash.
    max_docs: at most this many documents per split (None: all).
    root: corpus directory (default: this interpreter's stdlib); tests point it at a few files.

  Returns:
    (builder, manifest); read with `builder.as_data_source("train" | "validation")`.
  """
  data_dir = config_lib.resolve_data_dir(data_dir)
  documents, manifest = stdlib_corpus.load_corpus(root, val_fraction, max_docs)
  kwargs = dict(documents=documents, data_dir=data_dir, file_format="array_record",
                config=tfds.core.BuilderConfig(name=config_name(val_fraction, max_docs),
                                               version=EffjaxStdlib.VERSION))
  with _build_lock(data_dir):
    builder = EffjaxStdlib(**kwargs)
    variant = pathlib.Path(builder.data_dir)
    saved = _read_json(variant / MANIFEST_FILE)
    if builder.is_prepared() and saved is not None and saved.get("sha256") == manifest["sha256"]:
      return builder, saved
    if variant.exists():
      # A different corpus (or a half-written build) lives here; never serve data the manifest denies.
      shutil.rmtree(variant)
    builder = EffjaxStdlib(**kwargs)  # Fresh instance: the old one cached the stale dataset_info.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    _write_json_atomic(variant / MANIFEST_FILE, manifest)
  return builder, manifest


def manifest_path(builder: EffjaxStdlib) -> pathlib.Path:
  """Where `prepare()` saved the manifest of this build."""
  return pathlib.Path(builder.data_dir) / MANIFEST_FILE
