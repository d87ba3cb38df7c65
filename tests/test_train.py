"""The trainer: schedule, frozen parameters, checkpoints (resume, corruption, mismatch), run
records, full-size shapes, and the real command surviving SIGKILL with bit-identical parameters."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from effjax import sharding
from effjax.models import registry
from effjax.train import checkpoint as ckpt_lib
from effjax.train import lm_task, loop, optim
from effjax.train.state import StateFactory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH = 16, 4


def _config(**kw):
  fields = dict(
      num_steps=12, seed=0, eval_every=6, log_every=3, checkpoint_every=4, keep_checkpoints=3,
      progress_bar=False, async_checkpoints=True,
      optim=dict(lr=3e-3, warmup_steps=2, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95),
      sharding=dict(mesh_shape=(-1, 1, 1), rules=sharding.DEFAULT_RULES))
  return ml_collections.ConfigDict({**fields, **kw})


class _Stream:
  """A stand-in checkpointable data iterator: batch i is a pure function of i."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    # 16 of the 264 ids: a unigram the model learns within a few steps.
    x = np.random.default_rng(self.i).integers(0, 16, (BATCH, SEQ + 1)).astype(np.int32)
    self.i += 1
    return {"inputs": x[:, :-1], "targets": x[:, 1:],
            "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "mask": np.ones((BATCH, SEQ), np.float32)}

  def data(self, eval_batches=1):
    evals = [next(_Stream()) for _ in range(eval_batches)]
    return loop.Data(train=self, get_state=lambda: {"i": self.i},
                     set_state=lambda s: setattr(self, "i", s["i"]), eval=evals)


def _fit(workdir, model_cfg=None, config=None, **kw):
  model_cfg = model_cfg or registry.get("lm/tiny")
  return loop.fit(config or _config(), str(workdir), init_fn=lm_task.make_init_fn(model_cfg),
                  loss_fn=lm_task.make_loss_fn(model_cfg), data=_Stream().data(), **kw)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One uninterrupted 12-step run of lm/tiny on the stand-in stream."""
  workdir = tmp_path_factory.mktemp("run")
  result = _fit(workdir)
  return workdir, result


def test_lr_schedule_warmup_then_cosine_to_final_fraction():
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=10, weight_decay=0.0, clip_norm=1.0,
                                       b1=0.9, b2=0.95, final_lr_fraction=0.1))
  sched = optim.lr_schedule(cfg, 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 1e-2 * (0.1 + 0.9 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 1e-3, rtol=1e-6)
  with pytest.raises(ValueError, match="lacks"):
    optim.lr_schedule(ml_collections.ConfigDict(dict(lr=1.0)), 10)


def test_metrics_jsonl_config_json_and_tensorboard(finished_run):
  workdir, result = finished_run
  assert result.step == 12
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
  assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
  np.testing.assert_allclose([r["bpb"] for r in train_rows],
                             [r["loss"] / math.log(2) for r in train_rows], rtol=1e-6)
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5  # It learns.
  val_rows = [r for r in rows if "val_loss" in r]
  assert [r["step"] for r in val_rows] == [6, 12]
  assert json.load(open(workdir / "config.json"))["optim"]["lr"] == 3e-3
  events = os.listdir(workdir / "tensorboard")
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]


# Orbax's failed read of the torn checkpoint leaves a callback for an asyncio loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_and_ends_identical(finished_run, tmp_path, caplog):
  workdir, result = finished_run
  copy = tmp_path / "copy"
  subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True)
  # Tear the newest checkpoint's array data, as a crash mid-copy or a bad disk would.
  data_dir = copy / "checkpoints" / "12" / "state"
  for dirpath, _, files in os.walk(data_dir):
    for f in files:
      if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        with open(os.path.join(dirpath, f), "wb") as fh:
          fh.write(b"garbage")
  with caplog.at_level(logging.WARNING):
    resumed = _fit(copy)
  assert "step 12" in caplog.text and "unreadable" in caplog.text
  assert os.listdir(copy / "corrupt_checkpoints")[0].startswith("12-")
  rows = [json.loads(line) for line in open(copy / "metrics.jsonl")]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [3, 6, 9, 12]  # Rows past step 8 were dropped, then rewritten once.
  for a, b in zip(_leaves(result.state.params), _leaves(resumed.state.params)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_shape_is_an_error_naming_the_parameter(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / "copy"
  subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True)
  wider = registry.get("lm/tiny", mlp_dim=256)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"layer_0/mlp/down.*\(192, 64\)"):
    _fit(copy, model_cfg=wider)
  assert sorted(os.listdir(copy / "checkpoints")) == ["12", "4", "8"]  # Nothing re-initialized.


def test_trainable_filter_and_frozen_kwargs(tmp_path):
  """Medusa/distillation shape: a frozen pytree reaches the loss; filtered params never move."""
  cfg = registry.get("lm/tiny")
  base_loss = lm_task.make_loss_fn(cfg)
  seen = {}

  def loss_fn(params, batch, rng, teacher_scale):
    seen["teacher"] = teacher_scale.shape
    loss, metrics = base_loss(params, batch, rng)
    return loss * teacher_scale.sum(), metrics

  only_layer_1 = lambda path, _: "layer_1" in optim.path_str(path)
  config = _config(num_steps=2, eval_every=0)
  result = loop.fit(config, str(tmp_path), init_fn=lm_task.make_init_fn(cfg), loss_fn=loss_fn,
                    data=_Stream().data(), frozen={"teacher_scale": jnp.ones((3,)) / 3},
                    trainable_filter=only_layer_1)
  assert seen["teacher"] == (3,)
  init = jax.jit(lambda rng: nn.unbox(lm_task.make_init_fn(cfg)(rng)))  # jit: same bits as fit's.
  fresh = init(jax.random.split(jax.random.PRNGKey(0))[0])
  flat_new = {optim.path_str(p): x for p, x in
              jax.tree_util.tree_leaves_with_path(result.state.params)}
  flat_old = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(fresh)}
  for name, new in flat_new.items():
    same = np.array_equal(np.asarray(new), np.asarray(flat_old[name]))
    assert same == ("layer_1" not in name), name


def test_lm_loss_ignores_masked_targets_and_reports_bpb(finished_run):
  cfg = registry.get("lm/tiny")
  params = finished_run[1].state.params  # Trained weights (and no init to compile).
  batch = next(_Stream())
  batch["mask"][:, SEQ // 2:] = 0.0
  loss_fn = jax.jit(lm_task.make_loss_fn(cfg))
  loss, metrics = loss_fn(params, batch, None)
  changed = dict(batch, targets=batch["targets"].copy())
  changed["targets"][:, SEQ // 2:] = 7
  loss2, _ = loss_fn(params, changed, None)
  assert float(loss) == float(loss2)
  assert float(metrics["tokens"]) == BATCH * SEQ // 2
  np.testing.assert_allclose(float(metrics["bpb"]), float(loss) / math.log(2), rtol=1e-6)
  changed["targets"][:, 0] = 7  # An unmasked change does move the loss.
  assert float(loss_fn(params, changed, None)[0]) != float(loss)


def test_bad_config_fields_are_named():
  with pytest.raises(ValueError, match="config.num_steps"):
    loop.validate_config(_config(num_steps=2.5))
  with pytest.raises(ValueError, match="config.log_every"):
    loop.validate_config(_config(log_every=0))
  from configs.lm import stdlib
  config = stdlib.get_config("tiny")
  config.model_overrides.d_modle = 32
  with pytest.raises(ValueError, match="model_overrides.d_modle"):
    lm_task.validate(config)
  config = stdlib.get_config("tiny")
  config.model_overrides = ml_collections.ConfigDict({"num_layers": "2"})  # Untyped, from code.
  with pytest.raises(ValueError, match="model_overrides.num_layers"):
    lm_task.validate(config)
  config = stdlib.get_config("tiny")
  config.model_overrides.d_model = 32  # A typed placeholder: set, it overrides the variant.
  assert lm_task.validate(config).d_model == 32
  config = stdlib.get_config("tiny")
  config.model = "lm/nope"
  with pytest.raises(ValueError, match="config.model='lm/nope'"):
    lm_task.validate(config)


@pytest.mark.parametrize("override, field", [("--config.num_stepz=3", "num_stepz"),
                                             ("--config.num_steps=abc", "num_steps"),
                                             ("--config.optim.lr=fast", "optim.lr"),
                                             ("--config.model_overrides.d_model=wide", "d_model")])
def test_command_line_unknown_or_mistyped_field_is_named(override, field, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/lm/stdlib.py:tiny",
       f"--workdir={tmp_path}", override], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert field.split(".")[-1] in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("name, billions", [("lm/llama3_8b", 8.03), ("lm/llama3_2_1b", 1.24)])
def test_full_size_train_state_eval_shape(name, billions):
  """The trainer's state for full-size models, traced abstractly (no memory) on CPU."""
  cfg = registry.get(name)
  config = _config(num_steps=1000)
  abstract = jax.eval_shape(lm_task.make_init_fn(cfg), jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(config.optim, config.num_steps, nn.unbox(abstract))
  factory = StateFactory(lm_task.make_init_fn(cfg), tx, sharding.make_mesh((1, 1, 1)),
                         sharding.DEFAULT_RULES)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract.params))
  assert n_params == cfg.num_params()
  np.testing.assert_allclose(n_params / 1e9, billions, rtol=0.01)
  moments = [x for x in jax.tree.leaves(factory.abstract.opt_state) if x.ndim > 0]
  assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_params  # Adam mu and nu.
  wq = factory.abstract_boxed_params["params"]["layer_0"]["attn"]["wq"]
  assert wq.names == ("embed", "heads", "head_dim")  # Logical axes for the sharding rules.


def _train_cmd(workdir):
  return [sys.executable, "-m", "experiments.train", "--config=configs/lm/stdlib.py:tiny",
          f"--workdir={workdir}", "--config.progress_bar=False"]


def _env(tmp_path):
  # The three runs compile the same programs: a persistent compilation cache (private to this test)
  # saves two thirds of the compile time, and a cached executable computes the same bits.
  return dict(os.environ, JAX_PLATFORMS="cpu", EFFJAX_DATA_DIR=str(tmp_path / "data"),
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _final_params(workdir):
  cfg = registry.get("lm/tiny")
  abstract = nn.unbox(jax.eval_shape(lm_task.make_init_fn(cfg), jax.random.PRNGKey(0)))
  return ckpt_lib.load_params(str(workdir), abstract)


@pytest.mark.slow
def test_sigkill_then_same_command_gives_identical_params(tmp_path):
  """The real command, SIGKILLed after a checkpoint and rerun, equals an uninterrupted run."""
  env = _env(tmp_path)
  ref = subprocess.run(_train_cmd(tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  summary = json.loads(ref.stdout.strip().splitlines()[-1])
  assert summary["step"] == 60 and math.isfinite(summary["val_bpb"])

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = workdir / "checkpoints" / "10"
  deadline = time.time() + 240
  while not (first / "_CHECKPOINT_METADATA").exists() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  assert max(steps) < 60

  again = subprocess.run(_train_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stderr
  for a, b in zip(_leaves(_final_params(tmp_path / "ref")), _leaves(_final_params(workdir))):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  ref_rows = [json.loads(line) for line in open(tmp_path / "ref" / "metrics.jsonl")]
  strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
  assert strip(rows) == strip(ref_rows)  # Same losses, logged once each.
