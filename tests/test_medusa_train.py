"""Medusa training: loss weights and targets, identity-initialised heads, Medusa-1 freezing the
backbone, a short run that learns, and the experiment config end to end (:tiny)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.medusa import HeadsConfig, apply_heads, init_heads
from effjax.medusa import train as mtrain
from effjax.models import registry
from effjax.models.lm import LM, init_params

CFG = registry.get("lm/tiny")


@pytest.fixture(scope="module")
def lm_params():
  return init_params(CFG, jax.random.PRNGKey(0))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_weights_and_weighted_sum():
  np.testing.assert_allclose(mtrain.loss_weights(4), [1.0, 0.8, 0.64, 0.512])
  np.testing.assert_allclose(mtrain.loss_weights(3, decay=0.5), [1.0, 0.5, 0.25])
  with pytest.raises(ValueError):
    mtrain.loss_weights(0)
  rng = np.random.default_rng(0)
  b, t, k, v = 2, 9, 3, 11
  logits = rng.normal(size=(b, t, k, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t)).astype(np.int32)
  loss, metrics = mtrain.medusa_loss(jnp.asarray(logits), jnp.asarray(tokens))
  ces = []
  for h in range(k):  # head h at position i predicts tokens[i + 2 + h]
    lp = _log_softmax(logits[:, :t - 2 - h, h])
    ces.append(-np.take_along_axis(lp, tokens[:, 2 + h:, None], -1).mean())
  np.testing.assert_allclose(metrics["head_ce"], ces, rtol=1e-5)
  np.testing.assert_allclose(loss, np.dot(0.8 ** np.arange(k), ces), rtol=1e-5)


def test_chain_rank_terms_condition_on_earlier_heads_being_right():
  # One row, 7 tokens, 2 heads over 5 tokens. Head 0 is scored at positions 0-4, head 1 at 0-3.
  tokens = np.array([[0, 1, 2, 3, 4, 0, 1]], np.int32)
  logits = np.zeros((1, 7, 2, 5), np.float32)
  right0 = [True, True, False, False, True]  # head 0 at position i vs tokens[i + 2]
  right1 = [True, False, True, True]  # head 1 at position i vs tokens[i + 3]
  for i, ok in enumerate(right0):
    logits[0, i, 0, tokens[0, i + 2] if ok else (tokens[0, i + 2] + 1) % 5] = 5.0
  for i, ok in enumerate(right1):
    logits[0, i, 1, tokens[0, i + 3] if ok else (tokens[0, i + 3] + 1) % 5] = 5.0
  hist, count = mtrain.chain_rank_terms(jnp.asarray(logits), jnp.asarray(tokens))
  # Head 0 has no earlier head: all 5 positions. Head 1 only where head 0 was right (0 and 1).
  np.testing.assert_array_equal(count, [5, 2])
  np.testing.assert_allclose(np.asarray(hist)[:, 0], [3 / 5, 1 / 2])
  _, marginal, _ = mtrain.head_terms(jnp.asarray(logits), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(marginal)[:, 0], [3 / 5, 3 / 4])
  # A wrong token here sits at rank 1 (one logit above it): counted in the rank-1 column.
  np.testing.assert_allclose(np.asarray(hist)[:, 1], [2 / 5, 1 / 2])


def test_evaluate_heads_start_scores_only_later_positions(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=3)
  heads = init_heads(hc, lm_params, CFG, jax.random.PRNGKey(1))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
  for start in (0, 4):
    acc = mtrain.evaluate_heads(lm_params, heads, CFG, hc, [tokens], start=start)
    # Head 0 is scored at positions start..T-3 of each row; later heads where the earlier were right.
    assert acc["chain_count"][0] == 2 * (12 - 2 - start)
    assert all(a >= b for a, b in zip(acc["chain_count"], acc["chain_count"][1:]))
    np.testing.assert_allclose(acc["chain_rank_accuracy"][0], acc["rank_accuracy"][0])


def test_head_targets_are_two_plus_k_ahead():
  rng = np.random.default_rng(1)
  b, t, k, v = 3, 16, 3, 40
  tokens = rng.integers(0, v, (b, t))
  right = np.zeros((b, t, k, v), np.float32)
  shifted = np.zeros((b, t, k, v), np.float32)
  for h in range(k):
    right[:, :t - 2 - h, h] = np.eye(v)[tokens[:, 2 + h:]] * 10
    shifted[:, :t - 1 - h, h] = np.eye(v)[tokens[:, 1 + h:]] * 10  # off by one: LM-head target
  _, m_right = mtrain.medusa_loss(jnp.asarray(right), jnp.asarray(tokens))
  _, m_shift = mtrain.medusa_loss(jnp.asarray(shifted), jnp.asarray(tokens))
  np.testing.assert_allclose(m_right["head_top1"], 1.0)
  assert np.all(np.asarray(m_shift["head_top1"]) < 0.2)
  # Masking the last token removes exactly the targets that point at it.
  mask = np.ones((b, t), bool)
  mask[:, -1] = False
  ce, hist, count = mtrain.head_terms(jnp.asarray(right), jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_array_equal(count, [b * (t - 3 - h) for h in range(k)])


def test_fresh_heads_start_as_the_lm_head(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=3, num_layers=2)
  hp = init_heads(hc, lm_params, CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  out = LM(CFG).apply(lm_params, tokens)
  head_logits = apply_heads(hp, hc, out.hidden_states)  # [B, T, K, V]
  for k in range(3):
    np.testing.assert_allclose(head_logits[:, :, k], out.logits, rtol=1e-5, atol=1e-5)


def _periodic_batches(batch, seq_len, seed, period=5, vocab=256):
  rng = np.random.default_rng(seed)
  pattern = rng.choice(vocab, period, replace=False)
  while True:
    phase = rng.integers(0, period, batch)
    idx = (phase[:, None] + np.arange(seq_len)[None]) % period
    yield pattern[idx].astype(np.int32)


def test_medusa1_step_leaves_backbone_unchanged(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=2)
  params = {"lm": lm_params, "heads": init_heads(hc, lm_params, CFG)}
  tokens = jnp.asarray(next(_periodic_batches(4, 16, 0)))
  for joint in (False, True):
    tx = mtrain.make_optimizer(mtrain.default_optim(), 10, params, joint=joint)
    step = mtrain.make_step(CFG, hc, tx, joint=joint)
    opt_state = tx.init(params)
    new, opt_state, metrics = step(params, opt_state, tokens, None)
    new, _, _ = step(new, opt_state, tokens, None)  # step 0 has lr 0 (warmup)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new["lm"], params["lm"])
    moved = jax.tree.map(lambda a, b: not bool(jnp.array_equal(a, b)), new["heads"],
                         params["heads"])
    assert all(jax.tree.leaves(moved))
    if joint:  # Control: Medusa-2's joint stage does train the backbone.
      assert not any(jax.tree.leaves(same)) and "lm_loss" in metrics
    else:
      assert all(jax.tree.leaves(same))


def test_short_medusa1_run_learns(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=2)
  data = _periodic_batches(8, 24, 1)
  evals = [next(data) for _ in range(2)]  # same pattern, other phases
  optim = mtrain.default_optim()
  optim.lr, optim.warmup_steps = 1e-2, 2
  before = mtrain.evaluate_heads(lm_params, init_heads(hc, lm_params, CFG), CFG, hc, evals)
  lm_after, hp, history = mtrain.train(lm_params, CFG, hc, data, steps=40, optim=optim,
                                       log_every=20)
  after = mtrain.evaluate_heads(lm_after, hp, CFG, hc, evals)
  assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"]
  assert min(after["head_top1"]) > 0.9 > max(before["head_top1"])
  assert np.asarray(after["rank_accuracy"]).shape == (2, mtrain.RANKS_TRACKED)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, lm_after, lm_params))


def test_train_bad_mode(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=2)
  with pytest.raises(ValueError, match="mode"):
    mtrain.train(lm_params, CFG, hc, iter([]), mode="medusa3")
  with pytest.raises(ValueError, match="Medusa-2 setting"):
    mtrain.train(lm_params, CFG, hc, iter([]), heads_warmup_steps=3)


def test_self_distill_data_continues_prompts(lm_params):
  stream = np.arange(500, dtype=np.int32) % 200
  seqs = mtrain.self_distill_data(lm_params, CFG, stream, num_seqs=3, prompt_len=6, seq_len=14,
                                  chunk=4)
  assert seqs.shape == (3, 14)
  for row in seqs:  # each prompt is a contiguous crop of the stream
    assert np.array_equal(row[1:6] - row[:5], np.ones(5)) or 199 in row[:6]


@pytest.mark.parametrize("name", ["medusa1", "medusa2"])
def test_configs_parse(name):
  import importlib
  mod = importlib.import_module(f"configs.medusa.{name}")
  for arg in (None, "tiny", "corpus"):
    c = mod.get_config(arg)
    assert c.mode == name and c.num_steps > c.heads_warmup_steps >= 0
    # Medusa-1 defaults to self-distillation; Medusa-2's joint LM loss needs real text.
    assert c.data.source == ("corpus" if arg == "corpus" or name == "medusa2" else "self_distill")
  with pytest.raises(ValueError, match="unknown variant"):
    mod.get_config("huge")


@pytest.mark.slow
def test_medusa2_tiny_experiment(tmp_path):
  from configs.medusa import medusa2
  from effjax.medusa import experiment
  config = medusa2.get_config("tiny")
  info = experiment.run(config, str(tmp_path))
  assert info["mode"] == "medusa2" and len(info["head_top1"]) == 4
  assert all(0.0 <= a <= b <= 1.0 for a, b in zip(info["head_top1"], info["head_top5"]))
  assert {len(v) + 1 for v in info["best_trees"].values()} == set(experiment.TREE_SIZES)
  assert info["data_source"] == "corpus" and len(info["corpus_head_top1"]) == 4
  heads, saved = experiment.load_heads(str(tmp_path), registry.get("lm/tiny"))
  assert saved["head_top1"] == info["head_top1"]
  assert (tmp_path / "joint").is_dir() and (tmp_path / "medusa_backbone").is_dir()
  with pytest.raises(ValueError, match="trained for a backbone"):
    experiment.load_heads(str(tmp_path), registry.get("lm/small"))
