"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then PAD, BOS and EOS.

Why bytes and not a locally trained BPE: nothing to train, cache or ship; every string round-trips
exactly; bits per byte falls straight out of the loss; and any two effjax LMs share it, which
speculative decoding and distillation require. The cost is longer sequences (about 3-4x BPE on code).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
NUM_IDS = 259  # Models pad the vocabulary to a multiple of 8 (264).
NAME = "bytes-v1"


class ByteTokenizer:
  """Stateless byte tokenizer. `name` identifies it, so mismatched LMs can be refused."""

  name = NAME
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  vocab_size = NUM_IDS

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == EOS_ID and stop_at_eos:
        break
      if 0 <= i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")

  def token_str(self, i: int) -> str:
    """A printable form of one token, for token-level views."""
    i = int(i)
    if i == PAD_ID:
      return "<pad>"
    if i == BOS_ID:
      return "<bos>"
    if i == EOS_ID:
      return "<eos>"
    if i >= 256:
      return f"<{i}>"
    return bytes([i]).decode("latin-1")

  def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, T] ids and [B] lengths."""
    seqs = [self.encode(t, add_bos=add_bos) for t in texts]
    lengths = np.array([len(s) for s in seqs], np.int32)
    out = np.full((len(seqs), max(1, lengths.max(initial=1))), PAD_ID, np.int32)
    for r, s in enumerate(seqs):
      out[r, :len(s)] = s
    return out, lengths


def document_ids(text: str | bytes) -> np.ndarray:
  """[L + 2] int32 ids of one training document: BOS, its UTF-8 bytes, EOS (vectorized, no Python loop).

  `bytes` are taken as already UTF-8 (TFDS Text features decode to bytes), so nothing is re-encoded.
  """
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  out = np.empty(len(raw) + 2, np.int32)
  out[0], out[-1] = BOS_ID, EOS_ID
  out[1:-1] = np.frombuffer(raw, np.uint8)
  return out
