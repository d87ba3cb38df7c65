r"""Trains one experiment config: `python -m experiments.train --config=FILE[:ARG] --workdir=DIR`.

The config's `task` field picks the trainer (`effjax.train.tasks`; "lm" for configs/lm/*). Running
the same command again resumes from the newest checkpoint in DIR (data position included); a DIR
holding checkpoints of another model is an error naming the mismatched parameter.

Multi-process (see docs/multihost.md): on a TPU pod or a SLURM / Open MPI GPU cluster pass
`--distributed` and JAX discovers the coordinator; elsewhere also give `--coordinator_address`,
`--num_processes` and `--process_id` (on CPU add `--cpu_collectives=gloo`).
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/lm/stdlib.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, config.json, metrics.jsonl, events.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detected on TPU pods, SLURM, "
    "Kubernetes) before anything touches the devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (with coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with coordinator).")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                                     "Cross-process collectives for CPU devices.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE")
  import jax  # After flag parsing, so --help stays fast.

  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()

  from effjax import launch_logging
  from effjax.train import tasks
  launch_logging.setup()
  config = _CONFIG.value
  if "task" not in config:
    raise app.UsageError(f"{flags.FLAGS['config'].config_filename} has no `task` field; set "
                         f"config.task to one of {tasks.names()}")
  result = tasks.get(config.task).run(config, _WORKDIR.value)
  if jax.process_index() == 0:
    # The last stdout line is machine-readable: scripts and tests parse it.
    summary = {"step": result.step, **result.train_metrics, **result.eval_metrics}
    print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
  app.run(main)
