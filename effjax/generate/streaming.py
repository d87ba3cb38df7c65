"""Streaming: hand tokens out as they are made, from the same one-jit program as batch generation.

Why not a Python loop of jitted steps: that would be a second decoding path to keep correct and would
pay a host round trip per token. Instead the compiled `while_loop` calls back to the host with an
ordered `io_callback` after every step (compiled in only when streaming). The generation runs on a
worker thread; the caller iterates over a queue the callback fills. Listeners are looked up by a
traced id, so every streamed call with the same shapes shares one compilation.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from effjax.generate import engine

_DONE = object()


@dataclasses.dataclass(frozen=True)
class StreamChunk:
  """One decode step's tokens.

  Attributes:
    step: index of the generated token (0 = the token sampled after prefill).
    tokens: [B] int32 token of each row at this step.
    emitted: [B] bool rows that produced a real token at this step (False once a row ended).
  """

  step: int
  tokens: np.ndarray
  emitted: np.ndarray


class TokenStream:
  """Iterates over `StreamChunk`s while the generation runs; `.result` holds the final output.

  Use as `for chunk in stream(...)`; `result` is set once iteration ends. Errors raised by the
  generation (bad input, compilation) are re-raised in the iterating thread.
  """

  def __init__(self, params, config, prompts, prompt_lengths=None, **generate_kw):
    self._queue: queue.Queue = queue.Queue()
    self.result: Optional[engine.GenerateOutput] = None
    self._error: Optional[BaseException] = None
    # Validate on the caller's thread so bad input fails before anything starts.
    prompts = np.asarray(prompts)
    lengths = (np.full((prompts.shape[0],), prompts.shape[-1], np.int32)
               if prompt_lengths is None and prompts.ndim == 2 else prompt_lengths)
    if lengths is not None:
      engine._check_inputs(config, prompts, np.asarray(lengths).astype(np.int32),
                           generate_kw.get("max_new_tokens"), generate_kw.get("cache_len"))
    self._args = (params, config, prompts, lengths)
    self._kw = generate_kw
    self._thread: Optional[threading.Thread] = None

  def _run(self) -> None:
    lid = engine.add_listener(lambda step, toks, emitted: self._queue.put(
        StreamChunk(step, toks.copy(), emitted.copy())))
    try:
      out = engine.generate(*self._args, listener=lid, **self._kw)
      self.result = engine.GenerateOutput(tokens=np.asarray(out.tokens),
                                          lengths=np.asarray(out.lengths),
                                          finished=np.asarray(out.finished))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
      self._error = e
    finally:
      engine.remove_listener(lid)
      self._queue.put(_DONE)

  def __iter__(self) -> Iterator[StreamChunk]:
    if self._thread is not None:
      raise RuntimeError("a TokenStream can be iterated once; call stream(...) again")
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    while True:
      item = self._queue.get()
      if item is _DONE:
        break
      yield item
    self._thread.join()
    if self._error is not None:
      raise self._error


def stream(params, config, prompts, prompt_lengths=None, **generate_kw) -> TokenStream:
  """Like `engine.generate`, but yields each step's tokens as soon as they exist."""
  return TokenStream(params, config, prompts, prompt_lengths, **generate_kw)


def stream_text(params, config, prompt_ids: Sequence[int], decode: Callable[[list[int]], str],
                **generate_kw) -> Iterator[str]:
  """Streams the text of one prompt's continuation, piece by piece.

  Text is decoded from all tokens so far and only the new suffix is yielded, so multi-byte
  characters split across tokens come out whole (a trailing U+FFFD is held back until completed).

  Args:
    params: LM variables.
    config: LM config.
    prompt_ids: the prompt's token ids.
    decode: ids -> text (e.g. `ByteTokenizer().decode`).
    **generate_kw: as for `engine.generate` (max_new_tokens, sampling, rng, eos_id, ...).
  """
  prompt = np.asarray(list(prompt_ids), np.int32)[None]
  eos = generate_kw.get("eos_id")
  eos = set() if eos is None else ({int(eos)} if np.ndim(eos) == 0 else {int(e) for e in eos})
  ids: list[int] = []
  shown = ""
  for chunk in stream(params, config, prompt, **generate_kw):
    if not chunk.emitted[0]:
      continue
    tok = int(chunk.tokens[0])
    if tok in eos:
      continue  # Keep draining so the worker thread finishes cleanly.
    ids.append(tok)
    text = decode(ids)
    stable = text.rstrip("\ufffd")
    if stable.startswith(shown) and len(stable) > len(shown):
      yield stable[len(shown):]
      shown = stable
  text = decode(ids)
  if text.startswith(shown) and len(text) > len(shown):
    yield text[len(shown):]
