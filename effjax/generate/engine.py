"""The decoding engine: prefill, then a whole generation inside one `jax.jit`.

Why one jit with `lax.while_loop`: a Python loop per token pays dispatch and host sync on every step,
which on CPU costs as much as a small model's forward. Here the decode state is a
`flax.struct.dataclass` of fixed-size buffers, the loop stops when every row has emitted EOS or
reached `max_new_tokens`, and nothing returns to Python until the end.

Ragged batches: prompts are right-padded to one length. Prefill runs the padded block through the LM
with an empty cache (a real token never sees the padding after it, by causality), then sets each row's
`cache.lengths` to its true prompt length. The padding's cache slots become stale and are overwritten by
decoding, so nothing is copied. Every row then decodes at its own position.

Compilations: prompt length, cache length and the output buffer are padded up to *buckets* (powers of
two), and `max_new_tokens`, `eos_id` and `pad_id` are traced values, so repeated calls with similar
shapes reuse one executable: one compilation per (batch, length bucket, sampling params).

Letters: B batch, P padded prompt length, S cache slots, N output buffer length, V vocabulary,
D model width.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Callable, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from effjax.generate.sampling import GREEDY, SamplingParams, sample
from effjax.models.lm import LM, KVCache, LMConfig, init_cache

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest power of two >= max(n, minimum): the padded size that shares one compilation."""
  n = max(int(n), minimum)
  return 1 << (n - 1).bit_length()


def _variables(params) -> dict:
  """Accepts `{'params': tree}` or the bare tree."""
  return params if isinstance(params, dict) and "params" in params else {"params": params}


def project_logits(params, config: LMConfig, hidden: jax.Array) -> jax.Array:
  """hidden [B, T, D] (after the final norm) -> logits [B, T, V] float32, exactly as `LM` does."""
  p = _variables(params)["params"]
  dt = config.compute_dtype
  if config.tie_embeddings:
    logits = jnp.einsum("btd,vd->btv", hidden, p["embed"].astype(dt), precision=config.precision)
  else:
    logits = jnp.einsum("btd,dv->btv", hidden, p["lm_head"].astype(dt), precision=config.precision)
  return logits.astype(jnp.float32)


def prefill(params, config: LMConfig, prompts: jax.Array, prompt_lengths: jax.Array,
            cache: KVCache) -> tuple[KVCache, jax.Array, jax.Array]:
  """Feeds right-padded prompts into the cache. Traceable; call it inside your own jit.

  Only the last real position of each row is projected to the vocabulary: the full [B, P, V]
  logits are dead code and XLA drops them, which matters for 128k vocabularies.

  Args:
    params: LM variables (`{'params': ...}` or the bare tree).
    config: the LM config.
    prompts: [B, P] int32, right-padded (pad values are ignored).
    prompt_lengths: [B] int32 real lengths, 1 <= length <= P.
    cache: cache to extend; rows are written from their `cache.lengths`.

  Returns:
    (cache with lengths + prompt_lengths, last logits [B, V] float32, last hidden [B, D]).
  """
  start = cache.lengths
  out = LM(config).apply(_variables(params), prompts, cache=cache)
  last = jnp.clip(prompt_lengths - 1, 0, prompts.shape[1] - 1)  # [B]
  hidden = jnp.take_along_axis(out.hidden_states, last[:, None, None], axis=1)  # [B, 1, D]
  logits = project_logits(params, config, hidden)[:, 0]  # [B, V]
  new_cache = out.cache.with_lengths(start + prompt_lengths)
  return new_cache, logits, hidden[:, 0]


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries, all fixed-size.

  Attributes:
    cache: the KV cache; finished rows stop advancing their lengths.
    tokens: [B, N] int32 generated tokens, `pad_id` after a row's EOS.
    last: [B] int32 the token fed at the next step.
    done: [B] bool rows that emitted EOS.
    num_generated: [B] int32 tokens generated per row (EOS included).
    step: [] int32 next column of `tokens` to fill.
  """

  cache: KVCache
  tokens: jax.Array
  last: jax.Array
  done: jax.Array
  num_generated: jax.Array
  step: jax.Array


@flax.struct.dataclass
class GenerateOutput:
  """Result of `generate`.

  Attributes:
    tokens: [B, max_new_tokens] int32; after a row's EOS (which is included) come `pad_id`s.
    lengths: [B] int32 number of generated tokens per row, EOS included.
    finished: [B] bool whether the row stopped at EOS (else it hit `max_new_tokens`).
  """

  tokens: jax.Array
  lengths: jax.Array
  finished: jax.Array


# Streaming: listeners keyed by a traced id, so every streamed call shares one compilation.
_LISTENERS: dict[int, Callable[[int, np.ndarray, np.ndarray], None]] = {}
_LISTENER_IDS = itertools.count(1)
_LISTENER_LOCK = threading.Lock()
_TRACE_COUNT = [0]


def add_listener(fn: Callable[[int, np.ndarray, np.ndarray], None]) -> int:
  """Registers `fn(step, tokens [B], emitted [B] bool)` for a streamed call; returns its id."""
  with _LISTENER_LOCK:
    lid = next(_LISTENER_IDS)
    _LISTENERS[lid] = fn
  return lid


def remove_listener(lid: int) -> None:
  with _LISTENER_LOCK:
    _LISTENERS.pop(lid, None)


def _emit(lid, step, tokens, emitted) -> None:
  fn = _LISTENERS.get(int(lid))
  if fn is not None:
    fn(int(step), np.asarray(tokens), np.asarray(emitted))


def trace_count() -> int:
  """How many times the generation program has been traced (one per compilation)."""
  return _TRACE_COUNT[0]


@functools.partial(jax.jit, static_argnames=("config", "sampling", "buf_len", "cache_len",
                                             "stream"))
def _generate_jit(params, prompts, prompt_lengths, max_new, eos_ids, pad_id, rng, listener, *,
                  config: LMConfig, sampling: SamplingParams, buf_len: int, cache_len: int,
                  stream: bool) -> GenerateOutput:
  _TRACE_COUNT[0] += 1  # Runs at trace time only: counts compilations.
  b = prompts.shape[0]
  cache = init_cache(config, b, cache_len)
  cache, logits, _ = prefill(params, config, prompts, prompt_lengths, cache)

  def emit(step, tok, emitted):
    if stream:
      io_callback(_emit, None, listener, step, tok, emitted, ordered=True)

  first = sample(jax.random.fold_in(rng, 0), logits, sampling)  # [B]
  emit(jnp.int32(0), first, jnp.ones((b,), bool))
  tokens = jnp.full((b, buf_len), pad_id, jnp.int32).at[:, 0].set(first)  # [B, N]
  state = DecodeState(cache=cache, tokens=tokens, last=first,
                      done=jnp.any(first[:, None] == eos_ids[None, :], axis=-1),
                      num_generated=jnp.ones((b,), jnp.int32), step=jnp.int32(1))
  model = LM(config)
  variables = _variables(params)

  def cond(s: DecodeState):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    out = model.apply(variables, s.last[:, None], cache=s.cache)
    tok = sample(jax.random.fold_in(rng, s.step), out.logits[:, 0], sampling)  # [B]
    tok = jnp.where(s.done, pad_id, tok)
    emit(s.step, tok, ~s.done)
    hit_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)  # [B]
    # Finished rows keep their length, so they rewrite one stale slot instead of running past S.
    lengths = jnp.where(s.done, s.cache.lengths, out.cache.lengths)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    return DecodeState(cache=out.cache.with_lengths(lengths), tokens=tokens, last=tok,
                       done=s.done | hit_eos,
                       num_generated=s.num_generated + (~s.done).astype(jnp.int32),
                       step=s.step + 1)

  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=state.tokens, lengths=state.num_generated, finished=state.done)


def prompt_block(prompts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
  """[B, width] int32: each row's first `lengths[b]` prompt ids, then id 0 (never attended to).

  Trims or pads the caller's [B, P] prompts to the bucketed width that one compilation serves.
  """
  block = np.zeros((prompts.shape[0], width), np.int32)
  keep = min(width, prompts.shape[1])
  block[:, :keep] = prompts[:, :keep]
  return np.where(np.arange(width)[None, :] < lengths[:, None], block, 0)


def _check_inputs(config: LMConfig, prompts: np.ndarray, prompt_lengths: np.ndarray,
                  max_new_tokens: int, cache_len: Optional[int]) -> int:
  """Validates user input; returns the cache length needed (unbucketed)."""
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be [batch, length] token ids; got shape {prompts.shape}. "
                     "Wrap a single prompt as prompts[None]")
  if not np.issubdtype(prompts.dtype, np.integer):
    raise ValueError(f"prompts must be integer token ids; got dtype {prompts.dtype}")
  b, p = prompts.shape
  if b == 0 or p == 0:
    raise ValueError(f"empty prompt (prompts shape {prompts.shape}); give every row at least one "
                     "token, e.g. the BOS id")
  if prompt_lengths.shape != (b,):
    raise ValueError(f"prompt_lengths must be [batch]=({b},); got shape {prompt_lengths.shape}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
      max_new_tokens <= 0):
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  empty = np.nonzero(prompt_lengths <= 0)[0]
  if empty.size:
    raise ValueError(f"batch rows {empty.tolist()} are padding only (prompt length 0); drop them "
                     "or give each at least one token (e.g. BOS)")
  too_long = np.nonzero(prompt_lengths > p)[0]
  if too_long.size:
    raise ValueError(f"prompt_lengths {prompt_lengths[too_long].tolist()} exceed the padded prompt "
                     f"length {p} (rows {too_long.tolist()})")
  valid = np.arange(p)[None, :] < prompt_lengths[:, None]
  bad = valid & ((prompts < 0) | (prompts >= config.vocab_size))
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"token id {int(prompts[r, c])} at row {r}, position {c} is outside the "
                     f"vocabulary [0, {config.vocab_size}); check the tokenizer matches the model")
  needed = int(prompt_lengths.max()) + int(max_new_tokens)
  limit = config.max_len if cache_len is None else cache_len
  if int(prompt_lengths.max()) > limit or needed > limit:
    what = "config.max_len" if cache_len is None else "cache_len"
    raise ValueError(f"prompt length {int(prompt_lengths.max())} + max_new_tokens "
                     f"{max_new_tokens} = {needed} exceeds the cache size {limit} ({what}); "
                     f"raise {what} or shorten the prompt / max_new_tokens")
  return needed


def generate(params, config: LMConfig, prompts, prompt_lengths=None, *, max_new_tokens: int,
             sampling: SamplingParams = GREEDY, rng: Optional[jax.Array] = None,
             eos_id: Union[int, Sequence[int], None] = None, pad_id: int = 0,
             cache_len: Optional[int] = None,
             bucket: bool = True, listener: int = 0) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row in one compiled program.

  Args:
    params: LM variables (`{'params': ...}` or the bare tree). For float32 models larger than
      the CPU's cache, `effjax.models.lm.pack_weights(params, config)`, made once, decodes
      faster (RESULTS.md).
    config: the LM config (static).
    prompts: [B, P] int token ids, right-padded.
    prompt_lengths: [B] real lengths (default: all P).
    max_new_tokens: tokens to generate per row (> 0); a row stops earlier at `eos_id`.
    sampling: `SamplingParams` (default greedy).
    rng: PRNG key for sampling (default `jax.random.key(0)`); same key, same tokens.
    eos_id: token id (or ids) that end a row (None: never stop early).
    pad_id: filler after a row's EOS in the output.
    cache_len: KV cache slots (default: the bucketed prompt + new length, at most config.max_len).
    bucket: pad shapes to buckets so similar calls share one compilation.
    listener: id from `add_listener` to receive tokens as they are made (see `streaming`).

  Returns:
    GenerateOutput with tokens [B, max_new_tokens], lengths [B], finished [B].
  """
  prompts_np = np.asarray(prompts)
  if prompt_lengths is None:
    prompt_lengths = np.full((prompts_np.shape[0],) if prompts_np.ndim == 2 else (0,),
                             prompts_np.shape[-1] if prompts_np.ndim else 0, np.int32)
  lengths_np = np.asarray(prompt_lengths).astype(np.int32)
  needed = _check_inputs(config, prompts_np, lengths_np, max_new_tokens, cache_len)
  rnd = bucket_length if bucket else (lambda n: int(n))
  if cache_len is None:
    cache_len = min(rnd(needed), config.max_len)
  p = min(rnd(int(lengths_np.max())), cache_len)
  block = prompt_block(prompts_np, lengths_np, p)
  buf_len = rnd(max_new_tokens)
  rng = jax.random.key(0) if rng is None else rng
  eos_ids = [] if eos_id is None else (
      [int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id])
  # Padded with -1 (never sampled) to a multiple of 4, so the count of EOS ids rarely recompiles.
  eos_ids += [-1] * (max(4, -(-len(eos_ids) // 4) * 4) - len(eos_ids))
  out = _generate_jit(params, jnp.asarray(block), jnp.asarray(lengths_np),
                      jnp.int32(max_new_tokens), jnp.asarray(eos_ids, jnp.int32),
                      jnp.int32(pad_id), rng, jnp.int32(listener), config=config,
                      sampling=sampling, buf_len=buf_len, cache_len=int(cache_len),
                      stream=bool(listener))
  return GenerateOutput(tokens=out.tokens[:, :max_new_tokens], lengths=out.lengths,
                        finished=out.finished)
