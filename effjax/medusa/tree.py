"""Candidate trees for Medusa: a choices list -> fixed buffers, and a builder from head accuracies.

A tree is a list of *choices*: each choice is a path of top-k ranks, one per head, read from the root.
`(0,)` is head 0's best token, `(0, 1)` is head 1's second-best token placed after it, and so on. The
root (index 0) is the token the LM head itself chose; every other node is one choice. The buffers:

* `depths` [T]: 0 for the root, len(choice) otherwise; RoPE position = prefix length + depth.
* `ranks` [T]: the top-k rank each node takes from head depth-1 (0 for the root).
* `parents` [T]: parent node index (-1 for the root).
* `attn_mask` [T, T]: node i sees node j iff j is i or one of its ancestors (the root included).
* `retrieve` [L, depth + 1]: node indices of each root-to-leaf path, padded with -1.

T = len(choices) + 1 is the tree *size* (tokens per verification pass); sizes here count the root, so
Medusa's 63-choice default tree has size 64.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Iterable, Sequence

import numpy as np

# Medusa's `mc_sim_7b_63` (FasterDecoding/Medusa, medusa/model/medusa_choices.py): 63 choices over
# 4 heads and top-10 ranks, tuned on Vicuna-7B. A reasonable default before accuracies are measured.
MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2),
    (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4),
    (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8),
    (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0),
    (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0))
DEFAULT_CHOICES = MC_SIM_7B_63


def validate_choices(choices: Iterable[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
  """Checks a choices list and returns it canonical: tuples sorted by (depth, ranks).

  Raises:
    ValueError: when the list is empty, a choice is empty or has a negative rank, a choice repeats,
      or the list is not prefix-closed (a choice whose parent path is missing could never be reached).
  """
  canon = []
  for c in choices:
    try:
      c = tuple(int(r) for r in c)
    except TypeError as e:
      raise ValueError(f"choice {c!r} is not a sequence of ranks; write e.g. (0, 1)") from e
    if not c:
      raise ValueError("an empty choice () names the root, which is implicit; remove it")
    if min(c) < 0:
      raise ValueError(f"choice {c} has a negative rank; ranks index each head's top-k from 0")
    canon.append(c)
  if not canon:
    raise ValueError("the choices list is empty; give at least one path such as [(0,)]")
  present = set(canon)
  if len(present) != len(canon):
    dups = sorted({c for c in canon if canon.count(c) > 1})
    raise ValueError(f"choices repeat {dups}; each path may appear once")
  for c in canon:
    if len(c) > 1 and c[:-1] not in present:
      raise ValueError(f"choices are not prefix-closed: {c} is listed but its parent {c[:-1]} is "
                       "not; add the parent path (every prefix of a choice must be a choice)")
  return tuple(sorted(canon, key=lambda c: (len(c), c)))


@dataclasses.dataclass(frozen=True)
class MedusaTree:
  """A validated candidate tree; hashable (by its choices), so it can be a static jit argument.

  Build it with `MedusaTree.from_choices(choices)` or `best_tree(...)`.
  """

  choices: tuple[tuple[int, ...], ...]

  @classmethod
  def from_choices(cls, choices: Iterable[Sequence[int]] = DEFAULT_CHOICES) -> "MedusaTree":
    return cls(validate_choices(choices))

  def __post_init__(self):
    if self.choices != validate_choices(self.choices):
      raise ValueError("MedusaTree choices must be canonical; use MedusaTree.from_choices(...)")

  @property
  def size(self) -> int:
    """Tokens per verification pass, the root included."""
    return len(self.choices) + 1

  @property
  def depth(self) -> int:
    """Longest path: the number of heads the tree reads."""
    return max(len(c) for c in self.choices)

  @property
  def top_k(self) -> int:
    """How many ranks per head the tree reads."""
    return max(max(c) for c in self.choices) + 1

  @functools.cached_property
  def depths(self) -> np.ndarray:
    return np.array([0] + [len(c) for c in self.choices], np.int32)  # [T]

  @functools.cached_property
  def ranks(self) -> np.ndarray:
    return np.array([0] + [c[-1] for c in self.choices], np.int32)  # [T]

  @functools.cached_property
  def parents(self) -> np.ndarray:
    index = {c: i + 1 for i, c in enumerate(self.choices)}
    return np.array([-1] + [index.get(c[:-1], 0) for c in self.choices], np.int32)  # [T]

  @functools.cached_property
  def attn_mask(self) -> np.ndarray:
    t = self.size
    mask = np.eye(t, dtype=bool)  # [T, T]
    for i in range(1, t):
      j = self.parents[i]
      while j >= 0:
        mask[i, j] = True
        j = self.parents[j]
    return mask

  @functools.cached_property
  def retrieve(self) -> np.ndarray:
    """[L, depth + 1] node indices of every root-to-leaf path (leaf order), -1 padded."""
    has_child = np.zeros(self.size, bool)
    has_child[self.parents[1:]] = True
    leaves = [i for i in range(1, self.size) if not has_child[i]]
    out = np.full((len(leaves), self.depth + 1), -1, np.int32)
    for row, leaf in enumerate(leaves):
      path, j = [], leaf
      while j >= 0:
        path.append(j)
        j = self.parents[j]
      out[row, :len(path)] = path[::-1]
    return out

  def expected_accept_length(self, rank_accuracy: np.ndarray) -> float:
    """Expected accepted candidates per pass under independent heads (bonus token not counted).

    Siblings hold different tokens, so at most one node per depth is right and the accepted length
    is the number of right nodes: its expectation is the sum of each node's path probability.

    Args:
      rank_accuracy: [K, R] probability that head k's rank-r token is the true one.
    """
    acc = _check_accuracy(rank_accuracy)
    if self.depth > acc.shape[0] or self.top_k > acc.shape[1]:
      raise ValueError(f"tree reads {self.depth} heads x top-{self.top_k} but accuracies cover "
                       f"{acc.shape[0]} x {acc.shape[1]}")
    total = 0.0
    for c in self.choices:
      total += float(np.prod([acc[d, r] for d, r in enumerate(c)]))
    return total


def _check_accuracy(rank_accuracy) -> np.ndarray:
  acc = np.asarray(rank_accuracy, np.float64)
  if acc.ndim != 2 or acc.size == 0:
    raise ValueError(f"rank_accuracy must be [num_heads, top_k]; got shape {acc.shape}")
  if np.any(acc < 0) or np.any(acc > 1) or np.any(acc.sum(axis=1) > 1 + 1e-6):
    raise ValueError("rank_accuracy[k, r] must be probabilities (each head's row sums to <= 1); "
                     "pass per-rank accuracy, not cumulative top-k accuracy (see "
                     "rank_accuracy_from_topk)")
  return acc


def rank_accuracy_from_topk(topk_accuracy) -> np.ndarray:
  """[K, R] cumulative top-(r+1) accuracies -> [K, R] per-rank accuracies (first differences)."""
  topk = np.asarray(topk_accuracy, np.float64)
  return np.clip(np.diff(topk, axis=-1, prepend=0.0), 0.0, 1.0)


def best_tree(rank_accuracy, size: int, max_depth: int | None = None) -> MedusaTree:
  """The tree of `size` tokens (root included) with the largest expected accepted length.

  A node's value is the product of its path's per-rank accuracies, never above its parent's, so
  taking the best frontier node `size - 1` times (a priority queue over children of chosen nodes)
  yields the optimal prefix-closed set under the independence assumption Medusa also makes.

  Args:
    rank_accuracy: [K, R] measured probability that head k's rank-r token is right
      (`effjax.medusa.train.evaluate_heads` reports it).
    size: tokens per pass, root included (e.g. 16, 32, 64).
    max_depth: cap on the depth (default: all K heads).

  Returns:
    A `MedusaTree` with `size - 1` choices.
  """
  acc = _check_accuracy(rank_accuracy)
  if size < 2:
    raise ValueError(f"tree size {size} leaves no candidate besides the root; use size >= 2")
  k_heads, r_max = acc.shape
  max_depth = k_heads if max_depth is None else min(max_depth, k_heads)
  heap = [(-acc[0, r], (r,)) for r in range(r_max)]
  heapq.heapify(heap)
  chosen = []
  while heap and len(chosen) < size - 1:
    neg, c = heapq.heappop(heap)
    chosen.append(c)
    if len(c) < max_depth:
      for r in range(r_max):
        heapq.heappush(heap, (neg * acc[len(c), r], c + (r,)))
  if len(chosen) < size - 1:
    raise ValueError(f"only {len(chosen)} distinct paths exist with {k_heads} heads x top-{r_max} "
                     f"(max depth {max_depth}); ask for size <= {len(chosen) + 1}")
  return MedusaTree.from_choices(chosen)


def default_tree(size: int = 64) -> MedusaTree:
  """The first `size - 1` choices of Medusa's default tree (prefix-closed by construction)."""
  if not 2 <= size <= len(DEFAULT_CHOICES) + 1:
    raise ValueError(f"default tree sizes run from 2 to {len(DEFAULT_CHOICES) + 1}; got {size}")
  return MedusaTree.from_choices(DEFAULT_CHOICES[:size - 1])
