"""One process of the 2-process test (tests/test_multihost.py): `python tests/helpers_multihost.py
PORT PROCESS_ID WORKDIR`.

Joins a `jax.distributed` job on localhost with gloo CPU collectives (2 fake devices per process, a
(data=2, fsdp=1, tensor=2) mesh over both), trains lm/tiny for 4 steps with `fit`, restores the
step-4 checkpoint into a fresh state and compares it with the live one, then resumes to step 6.
Prints one JSON line of facts for the parent to check.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, SEQ = 8, 16


def global_batch(i: int):
  """Global batch i of the stand-in stream (a pure function of i; learnable unigram of 16 ids)."""
  import numpy as np
  x = np.random.default_rng(i).integers(0, 16, (GLOBAL_BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:],
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (GLOBAL_BATCH, 1)),
          "segment_ids": np.ones((GLOBAL_BATCH, SEQ), np.int32),
          "mask": np.ones((GLOBAL_BATCH, SEQ), np.float32)}


class Stream:
  """This process's rows of the global stream, with a checkpointable position."""

  def __init__(self, process_index: int, process_count: int):
    self.i, self.pi, self.pc = 0, process_index, process_count

  def __next__(self):
    batch = global_batch(self.i)
    self.i += 1
    n = GLOBAL_BATCH // self.pc
    return {k: v[self.pi * n:(self.pi + 1) * n] for k, v in batch.items()}


def config(num_steps: int, mesh_shape=(2, 1, 2)):
  import ml_collections
  from effjax import sharding
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, seed=0, eval_every=0, log_every=1, checkpoint_every=2,
      keep_checkpoints=2, progress_bar=False, async_checkpoints=True,
      optim=dict(lr=3e-3, warmup_steps=1, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95),
      sharding=dict(mesh_shape=mesh_shape, rules=sharding.DEFAULT_RULES)))


def checksums(params):
  """Per-leaf float64 sums over this process's addressable shards (every shard counted once)."""
  import jax
  import numpy as np
  out = []
  for leaf in jax.tree.leaves(params):
    seen, total = set(), 0.0
    for shard in leaf.addressable_shards:
      key = str(shard.index)
      if key not in seen:
        seen.add(key)
        total += float(np.asarray(shard.data, np.float64).sum())
    out.append(total)
  return out


def run(workdir: str, stream: "Stream", num_steps: int, mesh_shape=(2, 1, 2)):
  from effjax.models import registry
  from effjax.train import lm_task, loop
  cfg = registry.get("lm/tiny", matmul_precision="highest")
  data = loop.Data(train=stream, get_state=lambda: {"i": stream.i},
                   set_state=lambda s: setattr(stream, "i", s["i"]))
  return loop.fit(config(num_steps, mesh_shape), workdir, init_fn=lm_task.make_init_fn(cfg),
                  loss_fn=lm_task.make_loss_fn(cfg), data=data)


def main(port: int, process_id: int, workdir: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  import numpy as np
  from effjax.train import checkpoint as ckpt_lib

  stream = Stream(jax.process_index(), jax.process_count())
  first = run(workdir, stream, num_steps=4)
  live = checksums(first.state.params)

  # Restore step 4 into a fresh state on both processes and compare with what is in memory.
  from effjax.models import registry
  from effjax.train import lm_task, loop, optim
  from effjax.train.state import StateFactory
  cfg = registry.get("lm/tiny", matmul_precision="highest")
  c = config(4)
  mesh, rules = loop.make_mesh_and_rules(c)
  tx, _ = optim.make_optimizer(c.optim, c.num_steps)
  factory = StateFactory(lm_task.make_init_fn(cfg), tx, mesh, rules)
  manager = ckpt_lib.make_manager(workdir, keep=2)
  step, restored, data_state = ckpt_lib.restore_latest(manager, factory.abstract)
  manager.close()
  same = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
             for x, y in zip(jax.tree.leaves(first.state.params), jax.tree.leaves(restored.params))
             for a, b in zip(x.addressable_shards, y.addressable_shards))

  resumed_stream = Stream(jax.process_index(), jax.process_count())
  second = run(workdir, resumed_stream, num_steps=6)
  print(json.dumps({
      "process": jax.process_index(), "processes": jax.process_count(),
      "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
      "loss4": first.train_metrics["loss"], "loss6": second.train_metrics["loss"],
      "checksums4": live, "checksums6": checksums(second.state.params),
      "restored_step": int(step), "restored_equal": bool(same), "data_state": data_state,
      "stream_after": resumed_stream.i,
  }), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
