"""Training tasks by name: `config.task` picks what `python -m experiments.train` runs.

A task is a `run(config, workdir)` (it builds init_fn, loss_fn and data, then calls
`effjax.train.loop.fit`), plus optionally
  * `check(config)`: validates the config and builds the model abstractly (`jax.eval_shape`), so
    tests check every config file without training;
  * `one_step(config, workdir) -> FitResult`: exactly one real optimizer step of that config (and
    one evaluation and checkpoint), which tests/test_configs.py runs for every config of the task.

Add a task by decorating its module's `run` and listing the module in `_ensure_loaded`:

    @tasks.register("distill", check=check, one_step=one_step)
    def run(config, workdir): ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

_TASKS: dict[str, "Task"] = {}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  run: Callable[[Any, str], Any]
  check: Optional[Callable[[Any], Any]] = None
  one_step: Optional[Callable[[Any, str], Any]] = None


def register(name: str, check: Optional[Callable[[Any], Any]] = None,
             one_step: Optional[Callable[[Any, str], Any]] = None):
  """Decorator registering `run(config, workdir)` as task `name` (see the module docstring)."""
  def wrap(run):
    if name in _TASKS:
      raise ValueError(f"training task {name!r} is registered twice")
    _TASKS[name] = Task(name=name, run=run, check=check, one_step=one_step)
    return run
  return wrap


def get(name: str) -> Task:
  _ensure_loaded()
  if name not in _TASKS:
    raise ValueError(f"config.task={name!r} is not a known training task; known: {sorted(_TASKS)}")
  return _TASKS[name]


def names() -> list[str]:
  _ensure_loaded()
  return sorted(_TASKS)


def _ensure_loaded():
  # Importing a task module runs its @register decorator.
  from effjax.train import lm_task  # noqa: F401
