r"""The main job: `python -m experiments.study --config=configs/study/stdlib.py --workdir=DIR`.

Runs (or resumes) target training, draft distillation, Medusa heads, the decoding benchmark and the
report, printing the table and where the report was written. See configs/study/stdlib.py.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config, e.g. configs/study/stdlib.py[:tiny].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every step's artifacts and the report go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.FIELD=VALUE")
  from effjax import launch_logging
  from effjax.study import pipeline
  from effjax.study import report
  launch_logging.setup()
  results = pipeline.run_study(_CONFIG.value, _WORKDIR.value)
  print()
  print(report.terminal_table(results["decoding"]))
  if results.get("token_view_text"):
    print("\nSpeculative rounds (batch row 0; green accepted, red struck rejected, blue target):")
    print(results["token_view_text"])
  print(f"\nreport: {results['paths']['html']}\nfigures: {results['paths']['json']}")


if __name__ == "__main__":
  app.run(main)
