"""Two processes on localhost (`jax.distributed`, gloo CPU collectives) train, checkpoint, restore
and resume together, and agree with one process fed the same global batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers_multihost as helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_process_train_checkpoint_restore(tmp_path):
  portpicker = pytest.importorskip("portpicker")
  port = portpicker.pick_unused_port()
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers_multihost.py"),
                             str(port), str(i), str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-4000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:  # Bounded: never leave a process waiting on its peer.
      if p.poll() is None:
        p.kill()
        p.wait()
  a, b = outs
  assert (a["process"], b["process"]) == (0, 1)
  assert a["processes"] == 2 and a["devices"] == 4 and a["local_devices"] == 2
  # Both processes hold full replicas (data axis spans them): all-reduced grads keep them equal.
  assert a["checksums6"] == b["checksums6"]
  assert a["loss6"] == b["loss6"] and a["loss6"] < a["loss4"]
  assert a["restored_step"] == b["restored_step"] == 4
  assert a["restored_equal"] and b["restored_equal"]
  assert a["data_state"] == b["data_state"] == {"i": 4}
  assert a["stream_after"] == b["stream_after"] == 6  # Resumed the data stream at batch 4.
  files = sorted(os.listdir(workdir / "checkpoints" / "6" / "data"))
  assert [f for f in files if f.endswith(".json")] == ["process_0-of-2.json",
                                                       "process_1-of-2.json"]
  lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # Process 0 alone writes.

  # Resuming that 2-process run from 1 process cannot place the data positions: a clear error.
  from effjax.train.checkpoint import CheckpointMismatchError
  with pytest.raises(CheckpointMismatchError, match="process count"):
    helper.run(str(workdir), helper.Stream(0, 1), num_steps=8, mesh_shape=(-1, 1, 1))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]  # Nothing set aside.

  # One process, one device, the same global batches: the same training.
  ref_dir = str(tmp_path / "single")
  first = helper.run(ref_dir, helper.Stream(0, 1), num_steps=4, mesh_shape=(-1, 1, 1))
  second = helper.run(ref_dir, helper.Stream(0, 1), num_steps=6, mesh_shape=(-1, 1, 1))
  np.testing.assert_allclose(a["loss4"], first.train_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(a["loss6"], second.train_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(a["checksums6"], helper.checksums(second.state.params),
                             rtol=1e-4, atol=1e-3)
