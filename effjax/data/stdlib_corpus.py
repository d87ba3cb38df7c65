"""The embedded default corpus: the CPython standard-library source found on this machine.

Why this corpus: every machine that runs effjax has it (no network, no download), it is 10+ MB of real,
human-written text (code, docstrings, comments), and its exact content is pinned by the manifest, so a
run can say precisely what it trained on. Another Python version gives another corpus, and another hash.

What is read: every `*.py` file under `sysconfig.get_paths()["stdlib"]`, walked without following
symlinks, sorted by POSIX relative path. Skipped directories (at any depth), see `SKIP_DIRS`:
* `site-packages`, `dist-packages`: third-party code installed into this interpreter, not the stdlib;
* `test`, `tests`: the regression suites are huge, repetitive and full of deliberately odd code;
* `idlelib`, `lib2to3`: large tool trees (an IDE, a deprecated code translator) that would dominate;
* `__pycache__` and any hidden directory.
Files that are not valid UTF-8 are skipped too (listed in the manifest), so every document is text.

Split: document-level. A file goes to validation when a hash of its relative path falls below
`val_fraction`, so the split does not depend on which other files exist, and no file is in both splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import platform
import sysconfig
from typing import Optional, Sequence

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                       "__pycache__"})
SPLITS = ("train", "validation")
MANIFEST_FORMAT = "effjax-stdlib-manifest-v1"


@dataclasses.dataclass(frozen=True)
class Document:
  """One source file: its POSIX path relative to the stdlib root, its UTF-8 text and its split."""
  path: str
  text: str
  split: str


def stdlib_root() -> pathlib.Path:
  """The directory of this interpreter's pure-Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Optional[os.PathLike] = None) -> list[str]:
  """Sorted POSIX paths (relative to `root`) of the corpus files; the module doc says what is skipped.

  Args:
    root: directory to scan (default: this interpreter's stdlib).

  Returns:
    Relative paths like "json/decoder.py", sorted as strings.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise ValueError(f"corpus root {str(root)!r} is not a directory; pass the CPython stdlib "
                     "directory (sysconfig.get_paths()['stdlib']) or a directory of .py files")
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    # Prune in place so os.walk never descends into skipped trees.
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
    rel_dir = pathlib.PurePath(os.path.relpath(dirpath, root))
    for name in filenames:
      if name.endswith(".py") and os.path.isfile(os.path.join(dirpath, name)):
        out.append((rel_dir / name).as_posix().removeprefix("./"))
  return sorted(out)


def split_of(path: str, val_fraction: float) -> str:
  """"validation" or "train" for `path`, from a stable hash of the path alone (same on any machine)."""
  digest = hashlib.sha256(b"effjax-split-v1:" + path.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
  return "validation" if u < val_fraction else "train"


def corpus_hash(items: Sequence[tuple[str, bytes]]) -> str:
  """sha256 over (path, content) pairs, length-prefixed so that no two corpora collide by framing."""
  h = hashlib.sha256()
  for path, content in items:
    p = path.encode("utf-8")
    h.update(len(p).to_bytes(8, "little") + p)
    h.update(len(content).to_bytes(8, "little") + content)
  return h.hexdigest()


def load_corpus(root: Optional[os.PathLike] = None, val_fraction: float = 0.05,
                max_docs: Optional[int] = None) -> tuple[list[Document], dict]:
  """Reads the corpus and describes it.

  Args:
    root: directory to scan (default: this interpreter's stdlib).
    val_fraction: fraction of documents, by path hash, that go to validation; in [0, 1).
    max_docs: keep only the first `max_docs` documents of each split, in path order (None: all).

  Returns:
    (documents in path order, manifest). The manifest is JSON-able: `files` (sorted, each with its split
    and size), per-split `docs`/`bytes`, the non-UTF-8 files skipped, and `sha256` over the (path,
    content) pairs of the documents kept.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  if max_docs is not None and max_docs < 1:
    raise ValueError(f"max_docs must be None (all) or a positive int, got {max_docs!r}")
  root = pathlib.Path(root) if root is not None else stdlib_root()
  docs, raw, skipped = [], [], []
  kept = {s: 0 for s in SPLITS}
  for path in list_files(root):
    split = split_of(path, val_fraction)
    if max_docs is not None and kept[split] >= max_docs:
      continue
    content = (root / path).read_bytes()
    try:
      text = content.decode("utf-8")
    except UnicodeDecodeError:
      skipped.append(path)
      continue
    kept[split] += 1
    docs.append(Document(path, text, split))
    raw.append((path, content))
  if not docs:
    raise ValueError(f"no readable .py files under {str(root)!r}; is this a CPython stdlib directory?")
  sizes = {p: len(c) for p, c in raw}
  manifest = {
      "format": MANIFEST_FORMAT,
      "python": platform.python_version(),
      "root": str(root),
      "skip_dirs": sorted(SKIP_DIRS),
      "val_fraction": float(val_fraction),
      "max_docs": max_docs,
      "splits": {s: {"docs": sum(d.split == s for d in docs),
                     "bytes": sum(sizes[d.path] for d in docs if d.split == s)} for s in SPLITS},
      "skipped_non_utf8": skipped,
      "sha256": corpus_hash(raw),
      "files": [{"path": d.path, "split": d.split, "bytes": sizes[d.path]} for d in docs],
  }
  return docs, manifest


def describe(manifest: dict) -> str:
  """A one-line summary for logs: which corpus, how big, and the hash that pins it."""
  s = manifest["splits"]
  mb = sum(v["bytes"] for v in s.values()) / 1e6
  return (f"stdlib corpus (Python {manifest['python']}, {manifest['root']}): "
          f"train {s['train']['docs']} docs / validation {s['validation']['docs']} docs, "
          f"{mb:.2f} MB, sha256 {manifest['sha256'][:16]}")

