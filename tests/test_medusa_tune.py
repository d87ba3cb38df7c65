"""`tune_tree`: times every candidate size round-robin and keeps the fastest (with a fake decoder)."""

import time

import numpy as np
import pytest

from effjax.medusa import tune
from effjax.medusa.decode import MedusaOutput


def _fake_generate(delays):
  def generate(params, head_params, config, prompts, *, max_new_tokens, tree, heads_config):
    time.sleep(delays[tree.size])
    counts = np.zeros((len(prompts), tree.depth + 1), np.int32)
    counts[:, tree.depth] = 2  # Every pass accepted the whole depth: tau = depth + 1.
    return MedusaOutput(tokens=np.zeros((len(prompts), max_new_tokens), np.int32),
                        lengths=np.full(len(prompts), max_new_tokens), finished=np.zeros(1, bool),
                        num_passes=np.full(len(prompts), 3), accept_counts=counts)
  return generate


def test_tune_tree_keeps_the_fastest_size(monkeypatch):
  acc = np.array([[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]])
  monkeypatch.setattr(tune, "generate", _fake_generate({3: 0.05, 4: 0.002, 6: 0.06}))
  tree, table = tune.tune_tree(None, None, None, acc, [np.zeros((1, 4), np.int32)] * 2,
                               sizes=(3, 4, 6), repeats=3)
  assert tree.size == table["size"] == 4
  assert set(table["seconds"]) == {3, 4, 6} and min(table["seconds"], key=table["seconds"].get) == 4
  assert table["tau"][4] == tree.depth + 1


def test_tune_tree_bad_input():
  acc = np.array([[0.9, 0.05]])
  with pytest.raises(ValueError, match="sizes >= 2"):
    tune.tune_tree(None, None, None, acc, [np.zeros((1, 4))], sizes=(1, 2))
  with pytest.raises(ValueError, match="calibration prompt set"):
    tune.tune_tree(None, None, None, acc, [], sizes=(2,))
