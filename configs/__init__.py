"""Experiment configs: one file per experiment, `get_config(arg=None) -> ml_collections.ConfigDict`.

Conventions (checked for every file by tests/test_configs.py):
  * The module docstring gives the exact command, the hardware, the runtime and the result reached.
  * Variants come from the arg, and each variant the file supports appears in its docstring as
    `--config=configs/<area>/<name>.py:<arg>`; the tests build `get_config()` and every such arg.
  * `config.task` names a training task of `effjax.train.tasks` (e.g. "lm"); the tests run one real
    training step of every config whose task registers a `one_step`.
"""
