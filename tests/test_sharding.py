"""Sharded == unsharded: init, loss, gradients and one AdamW step of lm/tiny on a (data=2, fsdp=2,
tensor=2) mesh of 8 fake CPU devices match one device.

The 8-device half runs in a subprocess (this file run as a script), since
`--xla_force_host_platform_device_count` must be set before JAX starts and must not leak into the
pytest process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_mesh_errors_name_the_fix():
  from effjax import sharding
  with pytest.raises(ValueError, match="mesh_shape"):
    sharding.make_mesh((2, 2, 2))  # The pytest process has one CPU device.
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((-1, -1, 1))
  assert sharding.make_mesh((-1, 1, 1)).shape == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["devices"] == 8
  # The parameters really are split: wq [D, N, H] over fsdp x tensor, one eighth... per device pair.
  assert r["wq_spec"] == ["fsdp", "tensor", None]
  assert r["wq_shard_shape"] == [32, 2, 16]
  assert r["mu_wq_shard_shape"] == [32, 2, 16]  # Adam moments sharded like their parameter.
  assert r["batch_spec"] == [["data", "fsdp"]]
  assert r["init_max_abs_diff"] == 0.0  # Sharded init draws the very same numbers.
  np.testing.assert_allclose(r["loss_sharded"], r["loss_single"], rtol=2e-6)
  assert r["grad_max_rel_diff"] < 1e-4, r
  assert r["grad_norm_single"] > 0.1  # Gradients are not trivially zero.
  # Adam's first step is about lr * sign(g): where |g| is near zero, a 1e-7 change in g (another
  # summation order) moves that parameter by a visible fraction of lr. So: tiny on average, and
  # never more than 20% of lr (1e-2) anywhere.
  assert r["step_param_mean_abs_diff"] < 1e-6, r
  assert r["step_param_max_abs_diff"] < 2e-3, r
  np.testing.assert_allclose(r["step_loss_sharded"], r["step_loss_single"], rtol=2e-6)


def _child():
  """Runs in the 8-device subprocess; prints one JSON line of measurements."""
  import jax
  import ml_collections
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec

  from effjax import sharding
  from effjax.models import registry
  from effjax.train import lm_task, loop, optim
  from effjax.train.state import StateFactory

  cfg = registry.get("lm/tiny", matmul_precision="highest")
  init_fn, loss_fn = lm_task.make_init_fn(cfg), lm_task.make_loss_fn(cfg)
  rng = np.random.default_rng(0)
  b, t = 8, 32
  tokens = rng.integers(0, 259, (b, t + 1)).astype(np.int32)
  segs = np.where(np.arange(t)[None] < rng.integers(8, t, (b, 1)), 1, 2).astype(np.int32)
  second_start = np.argmax(segs == 2, axis=1)[:, None]  # [B, 1]
  positions = np.where(segs == 1, np.arange(t), np.arange(t) - second_start)  # [B, T]
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segs,
                "positions": positions.astype(np.int32), "mask": np.ones((b, t), np.float32)}
  optim_cfg = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, weight_decay=0.1,
                                             clip_norm=1.0, b1=0.9, b2=0.95))
  rules = sharding.DEFAULT_RULES
  out = {"devices": len(jax.devices())}
  results = {}
  for name, shape, devices in (("single", (1, 1, 1), jax.devices()[:1]),
                               ("sharded", (2, 2, 2), jax.devices())):
    mesh = sharding.make_mesh(shape, devices)
    tx, schedule = optim.make_optimizer(optim_cfg, 10)
    factory = StateFactory(init_fn, tx, mesh, rules)
    state = factory.init(jax.random.PRNGKey(0))
    b_shard = loop.batch_sharding(mesh, rules)
    batch = loop.to_global(host_batch, b_shard)
    train_step, _ = loop.make_step_fns(loss_fn, tx, schedule)
    repl = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
      (loss, _), grads = grad_fn(state.params, batch, None)
      init_params = jax.device_get(state.params)
      step = jax.jit(train_step, out_shardings=(factory.shardings, repl))
      new_state, metrics = step(state, batch, {})
    results[name] = dict(loss=float(loss), grads=jax.device_get(grads), init=init_params,
                         new=jax.device_get(new_state.params), step_loss=float(metrics["loss"]))
    if name == "sharded":
      wq = state.params["params"]["layer_0"]["attn"]["wq"]
      out["wq_spec"] = list(wq.sharding.spec)
      out["wq_shard_shape"] = list(wq.addressable_shards[0].data.shape)
      mu = new_state.opt_state[1][0].mu["params"]["layer_0"]["attn"]["wq"]
      out["mu_wq_shard_shape"] = list(mu.addressable_shards[0].data.shape)
      out["batch_spec"] = [list(a) if isinstance(a, tuple) else a
                           for a in batch["inputs"].sharding.spec]
  s, m = results["single"], results["sharded"]
  leaves = lambda k, r: [np.asarray(x) for x in jax.tree.leaves(r[k])]
  out["loss_single"], out["loss_sharded"] = s["loss"], m["loss"]
  out["step_loss_single"], out["step_loss_sharded"] = s["step_loss"], m["step_loss"]
  out["init_max_abs_diff"] = max(float(np.abs(a - c).max())
                                 for a, c in zip(leaves("init", s), leaves("init", m)))
  out["grad_max_rel_diff"] = max(float(np.abs(a - c).max() / (np.abs(a).max() + 1e-12))
                                 for a, c in zip(leaves("grads", s), leaves("grads", m)))
  out["grad_norm_single"] = float(np.sqrt(sum((a ** 2).sum() for a in leaves("grads", s))))
  diffs = np.concatenate([np.abs(a - c).ravel()
                          for a, c in zip(leaves("new", s), leaves("new", m))])
  out["step_param_max_abs_diff"] = float(diffs.max())
  out["step_param_mean_abs_diff"] = float(diffs.mean())
  print(json.dumps(out))  # The last stdout line: the parent parses it.


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _child()
