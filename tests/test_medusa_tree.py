"""Medusa tree buffers (hand-made trees), choices validation and the best-tree builder."""

import itertools

import numpy as np
import pytest

from effjax.medusa.tree import (DEFAULT_CHOICES, MedusaTree, best_tree, default_tree,
                                rank_accuracy_from_topk, validate_choices)

# Root 0; (0,)=1 (1,)=2 (0,0)=3 (0,1)=4 (1,0)=5 (0,0,0)=6, after sorting by (depth, ranks).
HAND = [(0, 0, 0), (1,), (0, 1), (0,), (1, 0), (0, 0)]


def test_hand_tree_buffers():
  tree = MedusaTree.from_choices(HAND)
  assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
  assert (tree.size, tree.depth, tree.top_k) == (7, 3, 2)
  np.testing.assert_array_equal(tree.depths, [0, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(tree.ranks, [0, 0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(tree.parents, [-1, 0, 0, 1, 1, 2, 3])
  expected = np.array([
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0],
      [1, 1, 0, 0, 1, 0, 0],
      [1, 0, 1, 0, 0, 1, 0],
      [1, 1, 0, 1, 0, 0, 1]], bool)
  np.testing.assert_array_equal(tree.attn_mask, expected)
  # Leaves 4 (0,1), 5 (1,0), 6 (0,0,0), in node order.
  np.testing.assert_array_equal(tree.retrieve, [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]])


def test_chain_tree_is_causal():
  tree = MedusaTree.from_choices([(0,), (0, 0), (0, 0, 0)])
  np.testing.assert_array_equal(tree.attn_mask, np.tril(np.ones((4, 4), bool)))
  np.testing.assert_array_equal(tree.retrieve, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(tree.depths, [0, 1, 2, 3])


def test_default_tree_sizes():
  assert len(DEFAULT_CHOICES) == 63
  for size in (16, 32, 64):
    tree = default_tree(size)
    assert tree.size == size
    # Every node appears on some path, and each path is a chain of parents.
    assert set(tree.retrieve[tree.retrieve >= 0].tolist()) == set(range(size))
    for path in tree.retrieve:
      path = path[path >= 0]
      assert all(tree.parents[c] == p for p, c in zip(path[:-1], path[1:]))


@pytest.mark.parametrize("choices, match", [
    ([(0,), (0, 1, 0)], "not prefix-closed"),
    ([(1, 0)], "not prefix-closed"),
    ([(0,), (0,)], "repeat"),
    ([], "empty"),
    ([()], "root"),
    ([(0,), (-1,)], "negative"),
])
def test_bad_choices(choices, match):
  with pytest.raises(ValueError, match=match):
    validate_choices(choices)


def test_expected_accept_length_by_hand():
  acc = np.array([[0.5, 0.2], [0.4, 0.1], [0.3, 0.0]])
  tree = MedusaTree.from_choices(HAND)
  # (0,) .5 + (1,) .2 + (0,0) .2 + (0,1) .05 + (1,0) .08 + (0,0,0) .06
  assert tree.expected_accept_length(acc) == pytest.approx(1.09)


def _all_trees(k_heads, ranks, n):
  paths = [p for d in range(1, k_heads + 1) for p in itertools.product(range(ranks), repeat=d)]
  for subset in itertools.combinations(paths, n):
    s = set(subset)
    if all(len(c) == 1 or c[:-1] in s for c in subset):
      yield subset


@pytest.mark.parametrize("n", [1, 3, 5])
def test_best_tree_is_optimal(n):
  acc = np.array([[0.55, 0.25, 0.1], [0.35, 0.3, 0.05]])
  tree = best_tree(acc, size=n + 1)
  assert tree.size == n + 1
  brute = max(MedusaTree.from_choices(s).expected_accept_length(acc)
              for s in _all_trees(2, 3, n))
  assert tree.expected_accept_length(acc) == pytest.approx(brute)


def test_best_tree_prefers_accurate_heads():
  # Head 0 is nearly always right at rank 0: a 4-token tree should be the rank-0 chain.
  acc = np.array([[0.95, 0.03], [0.9, 0.05], [0.9, 0.05]])
  assert best_tree(acc, 4).choices == ((0,), (0, 0), (0, 0, 0))
  assert best_tree(acc, 3, max_depth=1).choices == ((0,), (1,))


def test_best_tree_bad_input():
  with pytest.raises(ValueError, match="cumulative"):
    best_tree(np.array([[0.6, 0.8]]), 3)  # top-k accuracies, not per-rank
  with pytest.raises(ValueError, match="distinct paths"):
    best_tree(np.array([[0.5, 0.2]]), 5)
  np.testing.assert_allclose(rank_accuracy_from_topk([[0.6, 0.8, 0.85]]), [[0.6, 0.2, 0.05]])
