r"""Trains Medusa heads: `python -m experiments.train_medusa --config=FILE[:ARG] --workdir=DIR`.

All logic lives in `effjax.medusa.experiment.run`; this file only parses flags. See
configs/medusa/medusa1.py for the commands, hardware, runtime and results.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Medusa config file, e.g. configs/medusa/medusa1.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the trained heads.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE")
  from effjax import launch_logging
  from effjax.medusa import experiment
  launch_logging.setup()
  info = experiment.run(_CONFIG.value, _WORKDIR.value)
  summary = {k: info[k] for k in ("mode", "head_top1", "head_top5", "head_ce")}
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
