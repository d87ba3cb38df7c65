"""Choosing the Medusa tree size for this machine by timing Medusa decoding itself.

A tree of T tokens accepts more as T grows, but what its verification pass costs is a property of
the hardware: about one decode step for any T up to ~64 on a memory-bound accelerator, 1.0-2.4
steps for 4-16 tokens on a 2-core CPU, where each round also pays ~0.8 steps for the heads,
acceptance and cache compaction. A cost model of the pass alone picked trees too small here (6
tokens where 8 ran 16% faster), so `tune_tree` times the real decoding loop: for each candidate
size, the best tree of that size (`best_tree` on the heads' measured accuracies) decodes a few
calibration prompts, and the fastest wins. Compiling one tree size takes ~2 s on 2 CPU cores.

Calibrate on prompts other than the ones you report on, or the choice is fitted to them.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import jax
import numpy as np

from effjax.medusa.decode import decode_metrics, generate
from effjax.medusa.heads import HeadsConfig
from effjax.medusa.tree import MedusaTree, best_tree
from effjax.models.lm import LMConfig


def tune_tree(params, head_params, config: LMConfig, rank_accuracy, prompt_sets: Sequence,
              sizes: Sequence[int] = (4, 6, 8, 12, 16, 32), *, max_new_tokens: int = 64,
              repeats: int = 3, heads_config: Optional[HeadsConfig] = None
              ) -> tuple[MedusaTree, dict]:
  """The tree size whose Medusa greedy decoding of `prompt_sets` is fastest here.

  Args:
    params, head_params, config: the target and its heads (as for `effjax.medusa.generate`).
    rank_accuracy: [K, R] per-rank head accuracies for `best_tree` (e.g. `chain_rank_accuracy`).
    prompt_sets: list of [B, P] prompt arrays, decoded one after another (calibration prompts).
    sizes: candidate tree sizes, root included.
    max_new_tokens: tokens per row in each calibration run.
    repeats: timed passes over all sizes (round-robin, so the machine's drift hits each size alike).

  Returns:
    (tree, {"seconds": {size: median seconds}, "tau": {size: tokens per pass}, "size": chosen}).
  """
  if not sizes or min(sizes) < 2:
    raise ValueError(f"tune_tree needs tree sizes >= 2; got {list(sizes)}")
  if not prompt_sets:
    raise ValueError("tune_tree needs at least one calibration prompt set")
  trees = {int(s): best_tree(rank_accuracy, int(s)) for s in sorted(set(sizes))}

  def run(tree):
    return [generate(params, head_params, config, p, max_new_tokens=max_new_tokens, tree=tree,
                     heads_config=heads_config) for p in prompt_sets]

  taus = {}
  for size, tree in trees.items():  # Compile and warm every size first.
    outs = run(tree)
    jax.block_until_ready([o.tokens for o in outs])
    counts = np.concatenate([np.asarray(o.accept_counts) for o in outs])
    taus[size] = decode_metrics(outs[0].replace(accept_counts=counts))["tau"]
  times = {size: [] for size in trees}
  for _ in range(repeats):
    for size, tree in trees.items():
      start = time.perf_counter()
      jax.block_until_ready([o.tokens for o in run(tree)])
      times[size].append(time.perf_counter() - start)
  seconds = {size: statistics.median(ts) for size, ts in times.items()}
  best = min(seconds, key=seconds.get)
  return trees[best], {"seconds": seconds, "tau": taus, "size": best}
