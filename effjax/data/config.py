"""The data config: one `ml_collections.ConfigDict` that picks the corpus and where it lives.

Experiment configs embed `default_data_config()` as `config.data` and override fields; the pipeline
(`effjax.data.pipeline`) takes that sub-config. The same fields switch the run from the embedded
CPython-stdlib corpus (built offline on any machine) to a real TFDS text dataset prepared in `data_dir`.
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections

STDLIB = "stdlib"
TFDS_TEXT_DATASETS = ("lm1b", "tiny_shakespeare")
NAMES = (STDLIB,) + TFDS_TEXT_DATASETS
DATA_DIR_ENV = "EFFJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/effjax/tfds"


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the default data config: the stdlib corpus under the default data dir.

  Fields:
    name: "stdlib" (the CPython standard-library source found on this machine), "lm1b" or
      "tiny_shakespeare" (TFDS datasets that must already be prepared in `data_dir`).
    data_dir: TFDS data dir. None means `$EFFJAX_DATA_DIR`, else `~/.cache/effjax/tfds`.
    val_fraction: stdlib only: fraction of documents (by path hash) held out for validation. The TFDS
      datasets bring their own splits.
    max_docs: cap on documents per split (None: all), for tiny runs and tests.
    text_key: the feature holding the text ("text" for every supported dataset).
    shuffle_window: packed rows are shuffled within windows of this many rows, so one batch does not
      hold consecutive windows of one long document (0 disables; restoring replays at most one window).
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = STDLIB
  cfg.data_dir = None
  cfg.val_fraction = 0.05
  cfg.max_docs = None
  cfg.text_key = "text"
  cfg.shuffle_window = 256
  return cfg


def validate_data_config(cfg) -> None:
  """Raises ValueError naming the bad field and its allowed values; returns None if `cfg` is usable."""
  missing = [k for k in ("name", "data_dir", "val_fraction", "max_docs", "text_key")
             if k not in cfg]
  if missing:
    raise ValueError(f"data config lacks fields {missing}; start from "
                     "effjax.data.config.default_data_config() and override fields")
  if cfg.name not in NAMES:
    raise ValueError(f"unknown data config name {cfg.name!r}; choose one of {list(NAMES)}")
  if cfg.data_dir is not None and not isinstance(cfg.data_dir, (str, os.PathLike)):
    raise ValueError(f"data_dir must be a path string or None (default dir), got {cfg.data_dir!r}")
  vf = cfg.val_fraction
  if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
    raise ValueError(f"val_fraction must be a number in [0, 1), got {vf!r}")
  md = cfg.max_docs
  if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
    raise ValueError(f"max_docs must be None (all documents) or a positive int, got {md!r}")
  if not isinstance(cfg.text_key, str) or not cfg.text_key:
    raise ValueError(f"text_key must be a non-empty feature name, got {cfg.text_key!r}")
  if cfg.name == STDLIB and cfg.text_key != "text":
    raise ValueError(f"the stdlib corpus stores its documents under 'text', got text_key="
                     f"{cfg.text_key!r}; leave text_key at its default")
  sw = cfg.get("shuffle_window", 0)
  if isinstance(sw, bool) or not isinstance(sw, int) or sw < 0:
    raise ValueError(f"shuffle_window must be a non-negative int (0 disables), got {sw!r}")


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """The absolute TFDS data dir: `data_dir`, else `$EFFJAX_DATA_DIR`, else `~/.cache/effjax/tfds`."""
  path = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(path)))
