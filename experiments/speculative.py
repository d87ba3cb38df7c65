r"""Speculative decoding on trained checkpoints: a table of speedups and a token-level view.

  python -m experiments.speculative --config=configs/speculative/stdlib.py --workdir=/tmp/effjax/spec

All logic lives in `effjax.speculative.experiment.run(config, workdir)`. The last stdout line is one
JSON object (the results file's path and the best measured speedups), for scripts.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. "
                                          "configs/speculative/stdlib.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the results JSON and the HTML view go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE")
  from effjax import launch_logging
  from effjax.speculative import experiment  # After flag parsing, so --help stays fast.
  launch_logging.setup(logging.WARNING)
  results = experiment.run(_CONFIG.value, _WORKDIR.value)
  best = {}
  for row in results["rows"]:
    key = f"{row['draft']}_T{row['T']:g}_b{row['batch']}"
    if row["speedup"] > best.get(key, {}).get("speedup", 0.0):
      best[key] = {"gamma": row["gamma"], "speedup": round(row["speedup"], 3)}
  print(json.dumps({"results": _WORKDIR.value + "/speculative_results.json", "best": best}))


if __name__ == "__main__":
  app.run(main)
