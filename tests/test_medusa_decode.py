"""Medusa decoding: tree attention == sequential forwards, cache compaction, greedy == plain greedy,
typical acceptance edge cases, and clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.generate import SamplingParams
from effjax.generate.engine import generate as plain_generate
from effjax.medusa import (HeadsConfig, MedusaTree, TypicalParams, compact_cache, decode_metrics,
                           default_tree, generate, init_heads, typical_accept)
from effjax.models import registry
from effjax.models.lm import LM, KVCache, init_cache, init_params

CFG = registry.get("lm/tiny", matmul_precision="highest")
TREE = default_tree(16)  # depth 3, top-4 ranks
PROMPTS = np.array([[257, 10, 20, 30, 40, 50, 60], [257, 7, 8, 0, 0, 0, 0]], np.int32)
PROMPT_LENGTHS = np.array([7, 3], np.int32)


@pytest.fixture(scope="module")
def lm_params():
  return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def heads(lm_params):
  hc = HeadsConfig.for_lm(CFG, num_heads=3)
  return hc, init_heads(hc, lm_params, CFG)


# "auto" on CPU: the C++ decode-attention kernel reads the tree as bitmasks; "xla": the dense
# [B, T, S] expansion of MaskSpec.tree_mask.
@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_tree_pass_matches_sequential_forward(lm_params, attention_impl):
  tree = MedusaTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)])
  rng = np.random.default_rng(0)
  b, p, t = 2, 9, tree.size
  prefix = rng.integers(0, 256, (b, p)).astype(np.int32)
  prefix_len = np.array([9, 5], np.int32)
  tree_tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
  model = LM(CFG.replace(attention_impl=attention_impl))
  cache = init_cache(CFG, b, 32)
  out = model.apply(lm_params, jnp.asarray(prefix), cache=cache)
  cache = out.cache.with_lengths(jnp.asarray(prefix_len))
  positions = prefix_len[:, None] + tree.depths[None]
  mask = jnp.broadcast_to(jnp.asarray(tree.attn_mask), (b, t, t))
  tree_out = model.apply(lm_params, jnp.asarray(tree_tokens), jnp.asarray(positions), cache,
                         new_token_mask=mask)
  np.testing.assert_array_equal(tree_out.cache.lengths, prefix_len + t)
  # Reference: for every node, a plain causal forward over prefix + the node's root path.
  seqs, where = [], []
  for r in range(b):
    for i in range(t):
      path, j = [], i
      while j >= 0:
        path.append(j)
        j = tree.parents[j]
      seq = np.concatenate([prefix[r, :prefix_len[r]], tree_tokens[r, path[::-1]]])
      where.append(len(seq) - 1)
      seqs.append(np.pad(seq, (0, p + tree.depth + 1 - len(seq))))
  full = model.apply(lm_params, jnp.asarray(np.stack(seqs)))
  ref = np.asarray(full.logits)[np.arange(len(seqs)), where].reshape(b, t, -1)
  np.testing.assert_allclose(np.asarray(tree_out.logits), ref, rtol=1e-5, atol=1e-5)


def test_compact_cache_moves_path_slots():
  b, s, kv_heads = 2, 12, 2
  # Row r, kv head j, slot i holds 100 * j + 12 * r + i, in the cache's [B*K, S, H] layout.
  vals = (np.arange(b * s, dtype=np.float32).reshape(b, 1, s, 1)
          + 100 * np.arange(kv_heads, dtype=np.float32).reshape(1, kv_heads, 1, 1)
          ) * np.ones((1, 1, 1, 3), np.float32)
  vals = vals.reshape(b * kv_heads, s, 3)
  cache = KVCache(k=(jnp.asarray(vals),), v=(jnp.asarray(-vals),), lengths=jnp.array([7, 9]))
  old = jnp.array([2, 3])
  path = jnp.array([[0, 2, 5, -1], [0, 1, 3, 4]])  # row 0 keeps nodes 0, 2, 5; row 1 nodes 0, 1
  out = compact_cache(cache, old, path, jnp.array([3, 2]))
  np.testing.assert_array_equal(out.lengths, [5, 5])
  k = np.asarray(out.row_view(out.k[0]))[..., 0]  # [B, S, K]
  np.testing.assert_array_equal(k[0, :5, 0], [0, 1, 2, 4, 7])  # slots 2, 4, 7 -> 2, 3, 4
  np.testing.assert_array_equal(k[0, :5, 1], [100, 101, 102, 104, 107])  # every kv head moves
  np.testing.assert_array_equal(k[1, :5, 0], [12, 13, 14, 15, 16])  # already contiguous
  np.testing.assert_array_equal(np.asarray(out.row_view(out.v[0]))[0, :5, 0, 0],
                                [0, -1, -2, -4, -7])


def _random_heads(lm_params, hc, seed):
  leaves, treedef = jax.tree.flatten(init_heads(hc, lm_params, CFG))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * 0.2
                                      for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("kind", ["copy_lm_head", "random"])
def test_greedy_matches_plain_greedy(lm_params, heads, kind):
  hc, hp = heads
  if kind == "random":
    hp = _random_heads(lm_params, hc, 1)
  ref = plain_generate(lm_params, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40)
  out = generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40, tree=TREE,
                 heads_config=hc)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(out.lengths, [40, 40])
  m = decode_metrics(out)
  counts = np.asarray(out.accept_counts)
  # Every pass emits accepted + 1 tokens; the last one may be cut at max_new_tokens.
  emitted = 1 + (counts * (np.arange(TREE.depth + 1) + 1)).sum(axis=1)
  assert np.all(emitted >= 40) and np.all(emitted < 40 + TREE.depth + 1)
  np.testing.assert_array_equal(out.num_passes, counts.sum(axis=1) + 1)
  if kind == "copy_lm_head":
    # Fresh heads echo the LM's next token; a random tiny LM repeats itself, so many are accepted.
    assert m["tau"] > 2.0 and m["target_passes_per_token"] < 0.5
    acc = m["per_position_acceptance"]
    assert acc[0] >= acc[1] >= acc[2] > 0
    assert m["tau"] == pytest.approx(1 + sum(acc))


def test_greedy_stops_at_eos_like_plain(lm_params, heads):
  hc, hp = heads
  ref = plain_generate(lm_params, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40)
  eos = int(np.asarray(ref.tokens)[0, 20])  # a token row 0 produces mid-way
  ref = plain_generate(lm_params, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40, eos_id=eos,
                       pad_id=0)
  out = generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40, tree=TREE,
                 heads_config=hc, eos_id=eos, pad_id=0)
  assert bool(out.finished[0]) and int(out.lengths[0]) <= 21
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_array_equal(out.finished, ref.finished)


def test_typical_accept_edge_cases():
  v = 50
  tokens = jnp.arange(v)
  uniform = jnp.full((v, v), 1.0 / v)
  assert bool(jnp.all(typical_accept(uniform, tokens, TypicalParams())))
  onehot = jax.nn.one_hot(jnp.full((v,), 7), v)
  np.testing.assert_array_equal(typical_accept(onehot, tokens, TypicalParams()), tokens == 7)
  # A peaked distribution: p = 0.05 passes only when epsilon and delta*exp(-H) are both below it.
  p = jnp.array([[0.9, 0.05, 0.05]])
  assert bool(typical_accept(p, jnp.array([1]), TypicalParams(epsilon=0.04, delta=0.3))[0])
  assert not bool(typical_accept(p, jnp.array([1]), TypicalParams(epsilon=0.09, delta=0.3))[0])


def test_typical_uniform_target_accepts_every_candidate():
  # All-zero weights: every logit is 0, so the target is uniform and every path is typical.
  params = jax.tree.map(jnp.zeros_like, init_params(CFG, jax.random.PRNGKey(0)))
  hc = HeadsConfig.for_lm(CFG, num_heads=3)
  hp = init_heads(hc, params, CFG)
  out = generate(params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=17, tree=TREE,
                 heads_config=hc, sampling=SamplingParams(temperature=1.0))
  counts = np.asarray(out.accept_counts)
  assert counts[:, :-1].sum() == 0 and np.all(counts[:, -1] == 4)  # 1 + 4 passes x 4 tokens
  assert decode_metrics(out)["tau"] == TREE.depth + 1


def test_typical_one_hot_target_is_greedy(lm_params, heads):
  hc, hp = heads
  ref = plain_generate(lm_params, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40)
  # At a tiny temperature p is one-hot: typical acceptance must reduce to greedy verification.
  out = generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40, tree=TREE,
                 heads_config=hc, sampling=SamplingParams(temperature=1e-6),
                 rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert decode_metrics(out)["tau"] > 1.5


def test_bad_input_messages(lm_params, heads):
  hc, hp = heads
  with pytest.raises(ValueError, match="cannot take them"):
    generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=40, tree=TREE,
             heads_config=hc, cache_len=60)  # 7 + 40 + 16 > 60
  other = registry.get("lm/draft")  # width 128: heads of lm/tiny (width 64) do not fit
  with pytest.raises(ValueError, match="trained for a backbone with d_model=64"):
    generate(init_params(other, jax.random.PRNGKey(0)), hp, other, PROMPTS, PROMPT_LENGTHS,
             max_new_tokens=8)
  with pytest.raises(ValueError, match="only 3 heads"):
    generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=8,
             tree=default_tree(64))  # depth 4
  with pytest.raises(ValueError, match="config asks for 4"):
    generate(lm_params, hp, CFG, PROMPTS, PROMPT_LENGTHS, max_new_tokens=8,
             heads_config=hc.replace(num_heads=4))
