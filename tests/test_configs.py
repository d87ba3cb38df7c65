"""Every experiment config file parses and builds, for `get_config()` and each variant its docstring
documents; configs of a registered training task also run one real training step.

Generic on purpose: a new `configs/<area>/<name>.py` is covered as soon as it exists. Variants are
found in the docstring as `--config=configs/<area>/<name>.py:<arg>` (see configs/__init__.py).
"""

import glob
import importlib.util
import math
import os
import re

import jax
import ml_collections
import pytest

from effjax.models import registry
from effjax.train import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"),
                                                recursive=True)
    if os.path.basename(p) != "__init__.py")


def _load(relpath):
  spec = importlib.util.spec_from_file_location(
      "config_" + re.sub(r"\W", "_", relpath), os.path.join(ROOT, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _documented_args(relpath):
  doc = _load(relpath).__doc__ or ""
  return sorted(set(re.findall(re.escape(relpath) + r":([\w.,=/+-]+)", doc)))


CASES = [(path, None) for path in CONFIG_FILES] + [
    (path, arg) for path in CONFIG_FILES for arg in _documented_args(path)]
IDS = [f"{p}:{a}" if a else p for p, a in CASES]


def _get(path, arg):
  module = _load(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  assert isinstance(config, ml_collections.ConfigDict), (
      f"{path}: get_config must return a ConfigDict")
  return config


def _task(config):
  name = config.get("task", None)
  return tasks.get(name) if name in tasks.names() else None


def test_there_are_configs():
  assert "configs/lm/stdlib.py" in CONFIG_FILES
  assert {"tiny", "draft"} <= set(_documented_args("configs/lm/stdlib.py"))


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_docstring_states_command_hardware_runtime_result(path):
  doc = _load(path).__doc__ or ""
  assert re.search(r"python -m experiments\.\w+ .*--config=" + re.escape(path), doc), (
      f"{path}: the docstring must give the exact command (python -m experiments.X "
      f"--config={path} ...)")
  for word in ("hardware", "runtime", "result"):
    assert word in doc.lower(), f"{path}: the docstring must state the {word}"


@pytest.mark.parametrize("path, arg", CASES, ids=IDS)
def test_config_parses_locks_and_serializes(path, arg):
  config = _get(path, arg)
  config.lock()
  with pytest.raises(AttributeError):
    config.surely_not_a_field_name = 1  # Locked: unknown fields are errors, not silent additions.
  assert config.to_json_best_effort()


@pytest.mark.parametrize("path, arg", CASES, ids=IDS)
def test_config_builds(path, arg):
  """The task's own check (abstract model shapes) where the task is registered; else the model."""
  config = _get(path, arg)
  task = _task(config)
  if task is not None and task.check is not None:
    abstract = task.check(config)
    assert jax.tree.leaves(abstract), f"{path}:{arg} builds a model without parameters"
  elif isinstance(config.get("model", None), str) and config.model in registry.names():
    overrides = dict(config.get("model_overrides", None) or {})
    assert registry.get(config.model, **overrides) is not None


# Configs of experiments that are not `experiments.train` tasks: the test that runs each one for real
# (at its `:tiny` size), so no config goes untrained by the suite.
TRAINED_ELSEWHERE = {
    "configs/distill/drafts.py": "tests/test_distill_configs.py::test_one_step_of_drafts_config",
    "configs/distill/minilm_l3.py": "tests/test_distill_configs.py::test_one_step_of_minilm_config",
    "configs/medusa/medusa1.py": "tests/test_study.py::test_resume_skips_the_finished_step_and_completes",
    "configs/medusa/medusa2.py": "tests/test_medusa_train.py::test_medusa2_tiny_experiment",
    "configs/speculative/stdlib.py": "tests/test_speculative_decode.py::test_experiment_tiny_config_runs",
    "configs/study/stdlib.py": "tests/test_study.py::test_resume_skips_the_finished_step_and_completes",
}


def _has_one_step(path, arg):
  task = _task(_get(path, arg))
  return task is not None and task.one_step is not None


STEP_CASES = [case for case in CASES if _has_one_step(*case)]
STEP_IDS = [f"{p}:{a}" if a else p for p, a in STEP_CASES]


def test_every_config_is_trained_by_some_test():
  """A config without a `one_step` task must name the test that runs it, and that test must exist."""
  stepped = {path for path, _ in STEP_CASES}
  for path in CONFIG_FILES:
    if path in stepped:
      continue
    assert path in TRAINED_ELSEWHERE, (
        f"{path}: its task registers no `one_step` in effjax.train.tasks; register one or add the "
        "test that trains it to TRAINED_ELSEWHERE")
    test_file, test_name = TRAINED_ELSEWHERE[path].split("::")
    with open(os.path.join(ROOT, test_file)) as f:
      assert re.search(rf"^def {test_name}\(", f.read(), re.M), f"{TRAINED_ELSEWHERE[path]} is gone"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One corpus directory for all configs (the stdlib corpus builds in seconds, once)."""
  return os.environ.get("EFFJAX_DATA_DIR") or str(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
@pytest.mark.parametrize("path, arg", STEP_CASES, ids=STEP_IDS)
def test_one_real_training_step(path, arg, tmp_path, monkeypatch, data_dir):
  """One optimizer step of the config as written (model, data, optimizer), plus one evaluation
  batch and a checkpoint, through its task's `one_step`."""
  config = _get(path, arg)
  task = _task(config)
  monkeypatch.setenv("EFFJAX_DATA_DIR", data_dir)
  result = task.one_step(config, str(tmp_path / "workdir"))
  assert result.step == 1
  assert math.isfinite(result.train_metrics["loss"]) and result.train_metrics["loss"] > 0
  assert os.path.isdir(tmp_path / "workdir" / "checkpoints" / "1")
