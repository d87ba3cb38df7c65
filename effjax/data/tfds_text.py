"""Adapter for real TFDS text datasets (lm1b, tiny_shakespeare), read offline from a prepared data_dir.

The pipeline reads every corpus the same way: a random-access data source whose records hold the text
under one feature (`text_key`). This module opens such sources for TFDS datasets that someone prepared
beforehand, on a machine with network:

    tfds build lm1b --data_dir=DIR --file_format=array_record

(`array_record` because grain needs random access; TFDS's default tfrecord cannot be indexed.)

Why check the disk ourselves before calling TFDS: asked for a dataset it cannot find, TFDS either tries
to download it (retrying for minutes offline) or, with `download=False`, fails with an unrelated message
about file formats. We look for the prepared files first and fail in milliseconds with a message that
says which directory was searched and the command that fills it.

Field names come from the TFDS builders (`lm1b` and `tiny_shakespeare` both store a single `text`
feature); tests check them against `tfds.testing.mock_data`, never against downloaded data.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional, Sequence

import tensorflow_datasets as tfds

# Feature holding the text, per dataset.
TEXT_FIELDS = {"lm1b": "text", "tiny_shakespeare": "text"}
# lm1b ships only train/test; tiny_shakespeare has a real validation split.
EVAL_SPLITS = {"lm1b": "test", "tiny_shakespeare": "validation"}
TRAIN_SPLIT = "train"


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"prepare it on a machine with network access with `tfds build {name} "
          f"--data_dir={data_dir} --file_format=array_record` and copy {data_dir}/{name} here, "
          f"or set config.data.data_dir (or $EFFJAX_DATA_DIR) to the directory that holds it")


def find_prepared(name: str, data_dir: str) -> pathlib.Path:
  """The prepared variant directory of `name` in `data_dir`, or a ValueError saying how to make one.

  Looks only at the local filesystem (never the network): a variant directory is one that holds a
  `dataset_info.json`, at `<data_dir>/<name>/<version>` or `<data_dir>/<name>/<config>/<version>`.
  """
  base = pathlib.Path(data_dir) / name
  infos = sorted(base.glob("*/dataset_info.json")) + sorted(base.glob("*/*/dataset_info.json"))
  if not infos:
    raise ValueError(f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (no "
                     f"{name}/<version>/dataset_info.json there); " + _prepare_hint(name, data_dir))
  variants = [p.parent for p in infos]
  with_records = [v for v in variants if any(v.glob("*.array_record*"))]
  if not with_records:
    raise ValueError(f"TFDS dataset {name!r} in {str(variants[-1])!r} has no ArrayRecord files (it was "
                     "probably built in the default tfrecord format, which grain cannot index); "
                     "rebuild it: " + _prepare_hint(name, data_dir))
  return with_records[-1]


def open_split(name: str, split: str, data_dir: str, text_key: Optional[str] = None) -> Sequence[Any]:
  """Opens one split of a prepared TFDS text dataset as a random-access source, offline.

  Args:
    name: "lm1b" or "tiny_shakespeare" (any TFDS text dataset with a text feature works).
    split: TFDS split name, e.g. "train", or "test[:1000]".
    data_dir: the TFDS data dir holding the prepared dataset.
    text_key: the feature to read (default: `TEXT_FIELDS[name]`).

  Returns:
    A sequence of dicts; `source[i][text_key]` is the i-th text (bytes, or str under mock data).

  Raises:
    ValueError: the dataset is not prepared there, not in ArrayRecord format, or lacks `text_key`.
  """
  find_prepared(name, data_dir)
  return _open_data_source(name, split, data_dir, text_key)


def _open_data_source(name: str, split: str, data_dir: str, text_key: Optional[str]):
  """`tfds.data_source` with every network path off; checks that the text feature exists."""
  text_key = text_key or TEXT_FIELDS.get(name, "text")
  try:
    source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False,
                              try_gcs=False)
  except Exception as e:  # TFDS raises assorted types (AssertionError, NotImplementedError, ...).
    raise ValueError(f"could not open split {split!r} of TFDS dataset {name!r} in "
                     f"data_dir={data_dir!r}: {e}; " + _prepare_hint(name, data_dir)) from e
  features = _feature_names(source)
  if features is not None and text_key not in features:
    raise ValueError(f"TFDS dataset {name!r} has features {sorted(features)}, not {text_key!r}; set "
                     "config.data.text_key to the feature that holds the text")
  return source


def _feature_names(source) -> Optional[list[str]]:
  info = getattr(source, "dataset_info", None)
  features = getattr(info, "features", None)
  return list(features.keys()) if features is not None else None


def source_info(name: str, data_dir: str, text_key: Optional[str] = None) -> dict:
  """What a run reads from a TFDS dataset: name, version, directory, features and split sizes (JSON)."""
  variant = find_prepared(name, data_dir)
  info = _open_data_source(name, TRAIN_SPLIT, data_dir, text_key).dataset_info
  return {
      "name": name,
      "full_name": info.full_name,
      "version": str(info.version),
      "variant_dir": str(variant),
      "features": sorted(info.features.keys()),
      "text_key": text_key or TEXT_FIELDS.get(name, "text"),
      "splits": {s: {"docs": int(v.num_examples), "bytes": int(v.num_bytes)}
                 for s, v in sorted(info.splits.items())},
  }
