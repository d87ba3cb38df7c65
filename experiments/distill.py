r"""Distillation experiments: speculative-decoding drafts and DistilBERT from MiniLM.

  python -m experiments.distill --config=configs/distill/minilm_l3.py --workdir=/tmp/effjax/minilm_l3
  python -m experiments.distill --config=configs/distill/drafts.py --workdir=/tmp/effjax/drafts

`config.task` picks the experiment ("distill_bert" or "distill_drafts"); all logic lives in
`effjax.distill`, so the same runs are callable from Python (`effjax.distill.bert_task.run`,
`effjax.distill.draft_task.run`). Results are printed as JSON and written to the workdir.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.")
flags.mark_flags_as_required(["config", "workdir"])

RUNNERS = ("distill_bert", "distill_drafts")


def run(config, workdir: str):
  """Runs the experiment `config.task` names; returns its results dict."""
  if config.task == "distill_bert":
    from effjax.distill import bert_task
    return bert_task.run(config, workdir)
  if config.task == "distill_drafts":
    from effjax.distill import draft_task
    return draft_task.run(config, workdir)
  raise ValueError(f"config.task={config.task!r} is not a distillation experiment; use one of "
                   f"{RUNNERS} (or experiments.train for other tasks)")


def main(argv):
  del argv
  from effjax import launch_logging
  launch_logging.setup()
  result = run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
