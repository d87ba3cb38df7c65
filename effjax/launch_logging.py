"""Log setup shared by the `experiments/*.py` launches: effjax at INFO, libraries' chatter dropped.

Orbax logs every save and restore at INFO and TFDS logs its (custom) builder configuration as a
warning on every open; in a training log those lines bury the ones a person reads. Errors, and every
other warning, still show.
"""

from __future__ import annotations

import logging

_NOISY_PATHS = ("/orbax/", "/tensorflow_datasets/")
_NOISY_WARNINGS = ("custom data configuration",)


class QuietLibraries(logging.Filter):
  """Keeps a record unless it is Orbax/TFDS INFO, or a known-harmless TFDS warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not any(p in record.pathname for p in _NOISY_PATHS):
      return True
    if record.levelno >= logging.ERROR:
      return True
    return record.levelno >= logging.WARNING and not any(
        w in record.getMessage() for w in _NOISY_WARNINGS)


def setup(effjax_level: int = logging.INFO) -> None:
  """Call once in an experiment's `main`, after absl has parsed flags."""
  from absl import logging as absl_logging
  logging.getLogger("effjax").setLevel(effjax_level)
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
