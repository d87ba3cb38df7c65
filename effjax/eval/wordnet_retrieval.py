"""WordNet reverse-dictionary retrieval: find a word from its definition among thousands.

A held-out sentence-embedding task built from data nobody here wrote: Princeton WordNet 3.0
(Debian package `wordnet-base`, files /usr/share/wordnet/data.*). Each item is a noun synset; the
query is its definition ("a protective cloth covering for an injured eye") and the correct document
is its first lemma ("eyepatch") among the first lemmas of all N items. Scores: top-1 accuracy,
recall@10 and mean reciprocal rank, by cosine similarity of the encoder's sentence embeddings.

Why this task: it is real, human-written text; it needs semantics rather than string overlap
(items whose definition contains their own lemma are dropped); thousands of candidates make it
sensitive to small quality losses (a 3-layer student cannot hide behind an easy task); and it needs
no network (one apt package).

Held out: `training_texts` returns text from every other synset, minus any synset sharing a lemma
with an evaluation item, so distillation never sees an evaluation query or answer.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Callable, Optional, Sequence

import numpy as np

WORDNET_DIR = pathlib.Path(os.environ.get("EFFJAX_WORDNET_DIR", "/usr/share/wordnet"))
APT_PACKAGE = "wordnet-base"
_POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


@dataclasses.dataclass(frozen=True)
class Synset:
  offset: str
  pos: str
  lemmas: tuple[str, ...]  # underscores replaced by spaces, adjective markers "(a)" stripped
  definition: str
  examples: tuple[str, ...]


def wordnet_available(root: os.PathLike = WORDNET_DIR) -> bool:
  return (pathlib.Path(root) / "data.noun").exists()


def _require(root: pathlib.Path) -> None:
  if not wordnet_available(root):
    raise FileNotFoundError(
        f"WordNet data files not found in {root}; install them with `apt-get install -y "
        f"{APT_PACKAGE}` (or point EFFJAX_WORDNET_DIR at a directory holding data.noun etc.)")


def parse_data_line(line: str, pos: str) -> Optional[Synset]:
  """One line of a WordNet data.* file -> Synset (None for the licence header)."""
  if line.startswith("  ") or "|" not in line:
    return None
  head, gloss = line.split("|", 1)
  fields = head.split()
  w_cnt = int(fields[3], 16)
  words = fields[4:4 + 2 * w_cnt:2]
  lemmas = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words)
  parts = [p.strip() for p in gloss.strip().split(";")]
  definition = "; ".join(p for p in parts if not p.startswith('"')).strip()
  examples = tuple(p.strip('"').strip() for p in parts if p.startswith('"'))
  return Synset(offset=fields[0], pos=pos, lemmas=lemmas, definition=definition,
                examples=examples)


def load_synsets(pos: Sequence[str] = ("n",), root: os.PathLike = WORDNET_DIR) -> list[Synset]:
  """All synsets of the given parts of speech ('n', 'v', 'a', 'r'), in file order."""
  root = pathlib.Path(root)
  _require(root)
  out = []
  for p in pos:
    if p not in _POS_FILES:
      raise ValueError(f"unknown part of speech {p!r}; choose from {sorted(_POS_FILES)}")
    with open(root / _POS_FILES[p], encoding="utf-8", errors="replace") as f:
      for line in f:
        s = parse_data_line(line, p)
        if s is not None:
          out.append(s)
  return out


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  queries: tuple[str, ...]    # definitions
  documents: tuple[str, ...]  # lemmas; documents[i] answers queries[i]
  held_out_lemmas: frozenset
  held_out_offsets: frozenset


def _usable(s: Synset) -> bool:
  lemma = s.lemmas[0]
  words = s.definition.split()
  return (len(words) >= 3 and lemma.replace(" ", "").replace("-", "").isalpha()
          and lemma.lower() not in s.definition.lower())


def build_task(num_items: int = 2000, seed: int = 0,
               root: os.PathLike = WORDNET_DIR) -> RetrievalTask:
  """Samples `num_items` noun synsets with distinct first lemmas (deterministic for a seed)."""
  synsets = [s for s in load_synsets(("n",), root) if _usable(s)]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(synsets))
  queries, docs, seen, offsets = [], [], set(), set()
  for i in order:
    s = synsets[i]
    key = s.lemmas[0].lower()
    if key in seen:
      continue
    seen.add(key)
    offsets.add(s.offset)
    queries.append(s.definition)
    docs.append(s.lemmas[0])
    if len(queries) == num_items:
      break
  if len(queries) < num_items:
    raise ValueError(f"only {len(queries)} usable synsets for num_items={num_items}")
  return RetrievalTask(tuple(queries), tuple(docs), frozenset(seen), frozenset(offsets))


def training_texts(task: RetrievalTask, max_texts: Optional[int] = None, seed: int = 1,
                   pos: Sequence[str] = ("n", "v", "a", "r"),
                   root: os.PathLike = WORDNET_DIR) -> list[str]:
  """Unlabelled real text for distillation, disjoint from `task`.

  Definitions, example sentences and lemmas of every synset that neither is an evaluation item nor
  shares any lemma with one. Shuffled deterministically; `max_texts` keeps the first that many.
  """
  out = []
  for s in load_synsets(pos, root):
    if s.offset in task.held_out_offsets and s.pos == "n":
      continue
    if any(l.lower() in task.held_out_lemmas for l in s.lemmas):
      continue
    out.append(s.definition)
    out.extend(s.examples)
    out.append(", ".join(s.lemmas))
  rng = np.random.default_rng(seed)
  out = [out[i] for i in rng.permutation(len(out))]
  return out[:max_texts] if max_texts else out


def retrieval_scores(query_emb: np.ndarray, doc_emb: np.ndarray) -> dict[str, float]:
  """Scores when query i's answer is document i.

  Args:
    query_emb: [N, D] L2-normalised query embeddings.
    doc_emb: [N, D] L2-normalised document embeddings.

  Returns:
    {"top1", "recall@10", "mrr"}; ties count against the correct document (pessimistic).
  """
  q = np.asarray(query_emb, np.float64)
  d = np.asarray(doc_emb, np.float64)
  if q.shape != d.shape:
    raise ValueError(f"query embeddings {q.shape} and document embeddings {d.shape} must match: "
                     "one answer document per query")
  sims = q @ d.T  # [N, N]
  correct = np.diag(sims)[:, None]
  rank = np.sum(sims >= correct, axis=1)  # 1 = best
  return {"top1": float(np.mean(rank == 1)), "recall@10": float(np.mean(rank <= 10)),
          "mrr": float(np.mean(1.0 / rank))}


def evaluate(encode: Callable[[Sequence[str]], np.ndarray], task: RetrievalTask) -> dict[str, float]:
  """Scores an encoder (texts -> [N, D] normalised embeddings) on `task`."""
  return retrieval_scores(encode(task.queries), encode(task.documents))
