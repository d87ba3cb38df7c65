"""Checkpoints: Orbax `CheckpointManager` over the train state and the data iterator state.

Layout of `WORKDIR/checkpoints/<step>/`: `state/` (params, optimizer state, step, rng; sharded
arrays, written by every process) and `data/process_<i>-of-<n>.json` (each process's input-pipeline
position, so a resumed run sees exactly the batches an uninterrupted one would).

Restoring is strict: a checkpoint whose parameters differ in shape from what the config builds is an
error naming the parameter, never a silent re-initialization. A checkpoint that cannot be read
(a torn write, a deleted file) is moved aside to `WORKDIR/corrupt_checkpoints/` with a warning and
the previous one is used.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from effjax.train.optim import path_str

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir does not fit the model/optimizer the config builds."""


class _DataStateHandler(ocp.CheckpointHandler):
  """Saves one JSON file per process: that process's data-iterator state (JSON value or bytes)."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    state = args.state
    if isinstance(state, (bytes, bytearray)):
      record = {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    else:
      record = {"kind": "json", "value": state}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _data_file()).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> Any:
    path = directory / _data_file()
    if not path.exists():
      raise FileNotFoundError(
          f"{path} is missing: the checkpoint was written by a different number of processes "
          f"({sorted(p.name for p in directory.iterdir())}); resume with the same process count")
    record = json.loads(path.read_text())
    if record["kind"] == "bytes":
      return base64.b64decode(record["value"])
    return record["value"]

  def metadata(self, directory: epath.Path) -> Optional[Any]:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _data_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager in `WORKDIR/checkpoints` keeping the last `keep` steps."""
  if keep < 1:
    raise ValueError(f"config.keep_checkpoints={keep} must be >= 1")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _DataStateHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_state=None) -> None:
  """Saves the state (async: returns once arrays are copied to host) and the data state."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = DataStateSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items))


_RESUME_HINT = ("start from an empty --workdir, or restore the config that wrote it "
                "(see config.json in the workdir)")


def check_compatible(saved_meta, abstract, where: str, hint: str = _RESUME_HINT) -> None:
  """Raises CheckpointMismatchError naming the first entry whose shape/dtype/presence differs."""
  saved = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved_meta)}
  wanted = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
  # Parameters first: "layer_0/mlp/down is (192, 64), the config builds (256, 64)" says more than
  # the optimizer moment that follows from it.
  order = lambda name: (not name.startswith("params"), name)
  for name in sorted(wanted, key=order):
    want = wanted[name]
    if name not in saved:
      missing = [n for n in wanted if n not in saved]
      raise CheckpointMismatchError(
          f"{where} has no entry {name!r} (and {len(missing) - 1} more) that the config "
          f"builds; {hint}")
    got = saved[name]
    got_shape = tuple(getattr(got, "shape", ()) or ())
    if got_shape != tuple(want.shape):
      raise CheckpointMismatchError(
          f"{where}: parameter {name!r} has shape {got_shape} in the checkpoint but the config "
          f"builds {tuple(want.shape)}; {hint}")
    got_dtype = getattr(got, "dtype", None)
    if got_dtype is not None and np.dtype(got_dtype) != np.dtype(want.dtype):
      raise CheckpointMismatchError(
          f"{where}: parameter {name!r} has dtype {np.dtype(got_dtype)} in the checkpoint but the "
          f"config builds {np.dtype(want.dtype)}; {hint}")
  extra = sorted(set(saved) - set(wanted), key=order)
  if extra:
    raise CheckpointMismatchError(
        f"{where} holds {extra[0]!r} (and {len(extra) - 1} more) that the config does not build; "
        f"{hint}")


def _set_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
  """Moves an unreadable step out of the manager's directory (process 0), then reloads."""
  src = manager.directory / str(step)
  dst_dir = manager.directory.parent / "corrupt_checkpoints"
  if jax.process_index() == 0:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{step}-{int(time.time())}"
    shutil.move(os.fspath(src), os.fspath(dst))
    log.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s and falling back to "
                "the previous checkpoint", step, manager.directory, reason, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"effjax_set_aside_{step}")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state, with_data: bool = True):
  """Restores the newest readable checkpoint.

  Args:
    manager: from `make_manager`.
    abstract_state: ShapeDtypeStruct pytree (with shardings) of the TrainState to restore into.
    with_data: also restore the data-iterator state.

  Returns:
    (step, state, data_state) or None when the workdir holds no checkpoint.

  Raises:
    CheckpointMismatchError: the checkpoint was written for another model or optimizer.
    RuntimeError: checkpoints exist but none is readable.
  """
  tried = []
  for step in sorted(manager.all_steps(), reverse=True):
    where = f"checkpoint step {step} in {manager.directory}"
    try:
      meta = manager.item_metadata(step)["state"]
      meta_tree = getattr(meta, "tree", meta)
    except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable.
      tried.append(step)
      _set_aside(manager, step, f"{type(e).__name__}: {e}")
      continue
    if meta_tree is None:
      tried.append(step)
      _set_aside(manager, step, "no metadata")
      continue
    check_compatible(meta_tree, abstract_state, where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    data_dir = manager.directory / str(step) / "data"
    has_data = with_data and data_dir.exists()
    if has_data:
      if not (data_dir / _data_file()).exists():
        written = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".json"))
        raise CheckpointMismatchError(
            f"{where} holds the data positions {written} of another process count than this "
            f"run's {jax.process_count()}; resume with the process count that wrote it")
      items["data"] = DataStateRestore()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      tried.append(step)
      _set_aside(manager, step, f"{type(e).__name__}: {e}")
      continue
    return step, restored["state"], restored["data"] if has_data else None
  if tried:
    raise RuntimeError(f"no checkpoint in {manager.directory} could be read (tried steps {tried}, "
                       f"now in corrupt_checkpoints/); delete the workdir to start over")
  return None


def load_params(workdir: str, abstract_params, step: Optional[int] = None):
  """Reads only the parameters of another run (a distillation teacher, a Medusa backbone).

  Args:
    workdir: the other run's workdir.
    abstract_params: ShapeDtypeStruct pytree of its params; leaves with a `sharding` are restored
      sharded that way, the others onto the first device.
    step: which step (default: the latest).

  Raises:
    FileNotFoundError: no checkpoint in `workdir`.
    CheckpointMismatchError: the checkpoint's params differ from `abstract_params`.
  """
  manager = make_manager(workdir, keep=1_000_000, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train that run first")
  meta = manager.item_metadata(step)["state"]
  manager.close()
  meta_tree = getattr(meta, "tree", meta)
  check_compatible(meta_tree["params"], abstract_params, f"checkpoint step {step} in {workdir}",
                   hint="build the model with the config that run used (its config.json)")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=getattr(a, "sharding", None) or device),
      abstract_params)}
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))  # Only params: the optimizer state stays on disk.
  return restored["params"]
