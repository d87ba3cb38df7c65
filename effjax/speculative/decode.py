"""Speculative decoding with a draft LM and a target LM, the whole loop inside one `jax.jit`.

Each round the draft proposes up to gamma tokens with its own KV cache, the target scores them all in
one (gamma + 1)-token pass, `verify.py` decides how many survive, and every row emits n + 1 tokens.

The bookkeeping, per row, is three integers and a flag, so rollback is a length change and never a copy:

* `ctx_len`: tokens in the context (prompt + generated). The *target* cache always holds all of them
  but the last one, `cur`, which opens the next verification pass: the pass feeds [cur, x_1..x_G] at
  slot ctx_len - 1, and afterwards the cache is valid for cur and the n accepted tokens, i.e. exactly
  the new context minus its new last token.
* The *draft* cache holds the context minus `cur`, or minus `prev` and `cur` when it lags: after a round
  that accepted all gamma drafts the draft never fed x_gamma (REFERENCES 1). The first draft step of a
  round therefore feeds two tokens, [prev, cur] for lagging rows and [cur, filler] otherwise, and reads
  the logits at index `lag`; the filler's slot is stale and is overwritten by the next step.

Rows accept different lengths, hit EOS inside a draft, or run out of budget (`draft_len` shrinks so that
a round never emits past `max_new_tokens`); finished rows are frozen while the others continue.

The loop is written against two *forward functions* `(cache, tokens [B, T], lengths [B]) -> (logits
[B, T, V], cache)`, so the tests can run the exact same loop on Markov tables instead of LMs.

Letters: B batch, P padded prompt length, G gamma (maximum draft length, static), V vocabulary,
N output buffer length, R recorded rounds.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.generate.engine import bucket_length
from effjax.generate.sampling import SamplingParams, logits_to_logprobs
from effjax.models.lm import LM, LMConfig, init_cache
from effjax.ops import fused_lm_step
from effjax.speculative import verify as verify_lib

# (cache, tokens [B, T], lengths [B]) -> (logits [B, T, V] float32, cache).
ForwardFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@struct.dataclass
class SpecMetrics:
  """Counters accumulated by the loop (summarise them with `metrics.summarize`).

  Attributes:
    rounds: [B] int32 verification rounds in which the row was still generating.
    accepted: [B] int32 drafted tokens the target accepted.
    drafted: [B] int32 drafted tokens offered to verification (sum of per-round draft_len).
    bonus: [B] int32 rounds in which every offered draft token was accepted.
    pos_offered: [B, G] int32 rounds in which position i was offered.
    pos_accepted: [B, G] int32 rounds in which position i was accepted.
    alpha_sum: [B] float32 sum over offered positions of sum_x min(p, q) (expected acceptance).
    target_passes: [] int32 target forward passes (one per round, shared by the batch).
    draft_steps: [] int32 draft forward passes (gamma per round, shared by the batch).
    gamma_sum: [] int32 sum of the gamma used in each round (differs from G when adaptive).
  """

  rounds: jax.Array
  accepted: jax.Array
  drafted: jax.Array
  bonus: jax.Array
  pos_offered: jax.Array
  pos_accepted: jax.Array
  alpha_sum: jax.Array
  target_passes: jax.Array
  draft_steps: jax.Array
  gamma_sum: jax.Array


@struct.dataclass
class RoundRecord:
  """Per-round detail for the token-level view (`view.py`), recorded when asked.

  Attributes:
    draft: [R, B, G] int32 the drafted tokens (only the first `draft_len` were offered).
    draft_len: [R, B] int32 tokens offered per row.
    num_accepted: [R, B] int32 accepted drafts per row.
    emitted: [R, B, G + 1] int32 tokens emitted per row (accepted drafts, then the target's token).
    num_emitted: [R, B] int32 how many of `emitted` count (n + 1, fewer when an EOS cut the round).
    active: [R, B] bool the row was still generating in this round.
    gamma: [R] int32 the gamma used in the round.
    num_rounds: [] int32 rounds actually run (rows of the arrays past it are empty).
  """

  draft: jax.Array
  draft_len: jax.Array
  num_accepted: jax.Array
  emitted: jax.Array
  num_emitted: jax.Array
  active: jax.Array
  gamma: jax.Array
  num_rounds: jax.Array


@struct.dataclass
class SpecOutput:
  """Result of `speculative_generate`, shaped like the engine's `GenerateOutput`.

  Attributes:
    tokens: [B, max_new_tokens] int32; after a row's EOS (included) or its end come `pad_id`s.
    lengths: [B] int32 generated tokens per row, EOS included.
    finished: [B] bool whether the row stopped at EOS.
    metrics: `SpecMetrics`.
    rounds: `RoundRecord` or None.
  """

  tokens: jax.Array
  lengths: jax.Array
  finished: jax.Array
  metrics: SpecMetrics
  rounds: Optional[RoundRecord] = None


@struct.dataclass
class LoopState:
  """What the loop carries between rounds, all fixed-size (see the module docstring)."""

  out: jax.Array  # [B, N] generated tokens
  gen: jax.Array  # [B] tokens generated
  ctx_len: jax.Array  # [B] prompt + generated
  prev: jax.Array  # [B] second-to-last context token
  cur: jax.Array  # [B] last context token (not yet in the target cache)
  lag: jax.Array  # [B] int32 1 when the draft cache also lacks `prev`
  done: jax.Array  # [B] bool
  eos_hit: jax.Array  # [B] bool
  target_cache: Any
  draft_cache: Any
  rng: jax.Array
  round: jax.Array  # [] int32
  gamma: jax.Array  # [] int32 gamma for the next round
  alpha_ema: jax.Array  # [] float32 running acceptance estimate (adaptive gamma)
  metrics: SpecMetrics
  record: Optional[RoundRecord]


def predicted_speedup(alpha, gamma, cost_ratio, verify_cost=1.0):
  """Leviathan et al.: (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + v)), with the alpha -> 1 limit.

  v, the verification pass's cost in target steps, is 1 in the paper.
  """
  alpha = jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, 1.0)
  gamma = jnp.asarray(gamma, jnp.float32)
  safe = jnp.where(alpha < 1.0 - 1e-6, alpha, 0.5)
  tokens = jnp.where(alpha < 1.0 - 1e-6, (1.0 - safe ** (gamma + 1.0)) / (1.0 - safe), gamma + 1.0)
  return tokens / (gamma * cost_ratio + verify_cost)


def _best_gamma(alpha, max_gamma: int, cost_ratio: float, verify_cost: float):
  """The gamma in 1..max_gamma that maximises the predicted speedup at this alpha.

  Every round verifies max_gamma + 1 tokens (the pass's width is static), so one verify_cost
  prices every candidate: a smaller gamma saves draft steps, never verification work.
  """
  gammas = jnp.arange(1, max_gamma + 1, dtype=jnp.int32)
  return gammas[jnp.argmax(predicted_speedup(alpha, gammas, cost_ratio, verify_cost))]


def _draft_sample(key, logits, sampling: SamplingParams):
  """Draws from the draft: (token [B], q [B, V]), q exactly what was sampled from.

  Greedy drafting returns q = None: its one-hot q is never needed (verification compares tokens).
  """
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  logq = logits_to_logprobs(logits, sampling)  # [B, V]
  return jax.random.categorical(key, logq, axis=-1).astype(jnp.int32), jnp.exp(logq)


class SpecLoop:
  """The speculative loop over abstract forward functions, as init / step / finish pieces.

  `run_loop` chains them inside a `lax.while_loop`; tests call `step` one round at a time to inspect
  the caches between rounds. Everything is traceable.

  Args:
    target_fwd, draft_fwd: `ForwardFn`s; each writes its T tokens at per-row `lengths`.
    gamma: maximum (and, unless adaptive, fixed) number of drafted tokens per round.
    max_new_tokens: generation budget per row.
    sampling: the same `SamplingParams` make p and q.
    eos_id: a row stops after emitting it (None: never).
    pad_id: filler in the output after a row's end.
    adaptive: choose each round's gamma in 1..gamma from a running acceptance estimate.
    cost_ratio: draft/target step cost c used by the adaptive rule.
    verify_cost: the (gamma + 1)-token verification pass's cost in target steps, for the adaptive
      rule (1 in the paper; ~1.5 on a CPU at gamma 8).
    record_rounds: also keep a `RoundRecord`.
    declare_q: test hook that replaces the q handed to verification (a wrong q must break exactness).
  """

  def __init__(self, target_fwd: ForwardFn, draft_fwd: ForwardFn, *, gamma: int,
               max_new_tokens: int, sampling: SamplingParams, eos_id: Optional[int] = None,
               pad_id: int = 0, adaptive: bool = False, cost_ratio: float = 0.1,
               verify_cost: float = 1.0, record_rounds: bool = False,
               declare_q: Optional[Callable[[jax.Array], jax.Array]] = None):
    self.target_fwd, self.draft_fwd = target_fwd, draft_fwd
    self.gamma, self.max_new_tokens, self.sampling = int(gamma), int(max_new_tokens), sampling
    self.eos_id, self.pad_id, self.adaptive = eos_id, pad_id, adaptive
    self.cost_ratio, self.record_rounds, self.declare_q = cost_ratio, record_rounds, declare_q
    if not 0 < float(verify_cost) < float("inf"):
      raise ValueError(f"verify_cost={verify_cost!r} must be a positive number of target steps (1 "
                       "when a (gamma + 1)-token pass costs one decode step)")
    self.verify_cost = float(verify_cost)
    self.max_rounds = self.max_new_tokens  # Every active row emits at least one token per round.

  def init(self, target_cache, draft_cache, prompts: jax.Array, prompt_lengths: jax.Array,
           rng: jax.Array) -> LoopState:
    """Prefills both caches with each prompt minus its last token.

    Args:
      target_cache, draft_cache: empty caches with room for P + max_new_tokens + gamma + 1 slots.
      prompts: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32 in 1..P.
      rng: PRNG key.
    """
    g, max_new_tokens, pad_id, adaptive = (self.gamma, self.max_new_tokens, self.pad_id,
                                           self.adaptive)
    target_fwd, draft_fwd, record_rounds = self.target_fwd, self.draft_fwd, self.record_rounds
    b, p = prompts.shape
    prompts = prompts.astype(jnp.int32)
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    zeros_b = jnp.zeros((b,), jnp.int32)
    if p > 1:  # Both caches take the prompt minus its last token.
      _, target_cache = target_fwd(target_cache, prompts[:, :p - 1], zeros_b)
      _, draft_cache = draft_fwd(draft_cache, prompts[:, :p - 1], zeros_b)
    cur = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]  # [B]
    prev = jnp.take_along_axis(prompts, jnp.maximum(prompt_lengths - 2, 0)[:, None], axis=1)[:, 0]
    buf = max_new_tokens + g + 1
    rmax = self.max_rounds
    metrics = SpecMetrics(
        rounds=zeros_b, accepted=zeros_b, drafted=zeros_b, bonus=zeros_b,
        pos_offered=jnp.zeros((b, g), jnp.int32), pos_accepted=jnp.zeros((b, g), jnp.int32),
        alpha_sum=jnp.zeros((b,), jnp.float32), target_passes=jnp.int32(0),
        draft_steps=jnp.int32(0), gamma_sum=jnp.int32(0))
    record = None
    if record_rounds:
      record = RoundRecord(
          draft=jnp.zeros((rmax, b, g), jnp.int32), draft_len=jnp.zeros((rmax, b), jnp.int32),
          num_accepted=jnp.zeros((rmax, b), jnp.int32),
          emitted=jnp.full((rmax, b, g + 1), pad_id, jnp.int32),
          num_emitted=jnp.zeros((rmax, b), jnp.int32), active=jnp.zeros((rmax, b), bool),
          gamma=jnp.zeros((rmax,), jnp.int32), num_rounds=jnp.int32(0))
    return LoopState(
        out=jnp.full((b, buf), pad_id, jnp.int32), gen=zeros_b, ctx_len=prompt_lengths,
        prev=prev, cur=cur, lag=zeros_b, done=jnp.zeros((b,), bool),
        eos_hit=jnp.zeros((b,), bool), target_cache=target_cache, draft_cache=draft_cache,
        rng=rng, round=jnp.int32(0), gamma=jnp.int32(max(1, (g + 1) // 2) if adaptive else g),
        alpha_ema=jnp.float32(0.5), metrics=metrics, record=record)

  def cond(self, s: LoopState) -> jax.Array:
    """True while some row is still generating."""
    return (s.round < self.max_rounds) & ~jnp.all(s.done)

  def step(self, s: LoopState) -> LoopState:
    """One round: draft, verify in one target pass, commit by lengths."""
    g, max_new_tokens, sampling, eos_id, pad_id = (self.gamma, self.max_new_tokens, self.sampling,
                                                   self.eos_id, self.pad_id)
    adaptive, cost_ratio, declare_q = self.adaptive, self.cost_ratio, self.declare_q
    target_fwd, draft_fwd = self.target_fwd, self.draft_fwd
    b = s.cur.shape[0]
    zeros_b = jnp.zeros((b,), jnp.int32)
    pos = jnp.arange(g, dtype=jnp.int32)[None, :]  # [1, G]
    rng, k_draft, k_verify = jax.random.split(s.rng, 3)
    active = ~s.done
    gamma_t = s.gamma if adaptive else g  # A static trip count unless gamma adapts.
    draft_len = jnp.clip(jnp.minimum(gamma_t, max_new_tokens - s.gen - 1), 0, g)  # [B]

    # Draft step 1 catches up on the context (two tokens when lagging) and proposes x_1.
    two = jnp.where(s.lag[:, None] > 0, jnp.stack([s.prev, s.cur], 1),
                    jnp.stack([s.cur, zeros_b], 1))  # [B, 2]
    logits, dcache = draft_fwd(s.draft_cache, two, s.ctx_len - 1 - s.lag)
    logits = jnp.take_along_axis(logits, s.lag[:, None, None], axis=1)[:, 0]  # [B, V]
    v = logits.shape[-1]
    x0, q0 = _draft_sample(jax.random.fold_in(k_draft, 0), logits, sampling)
    drafts = jnp.zeros((b, g), jnp.int32).at[:, 0].set(x0)  # [B, G]
    # Greedy rounds carry no q: a one-hot q would only be compared with a one-hot p.
    qs = None if sampling.greedy else jnp.zeros((b, g, v), jnp.float32).at[:, 0].set(q0)

    def draft_step(j, carry):
      cache, drafts, qs = carry
      logits, cache = draft_fwd(cache, drafts[:, j - 1][:, None], s.ctx_len + j - 1)
      x, q = _draft_sample(jax.random.fold_in(k_draft, j), logits[:, 0], sampling)
      drafts = jax.lax.dynamic_update_slice(drafts, x[:, None], (0, j))
      if qs is not None:
        qs = jax.lax.dynamic_update_slice(qs, q[:, None], (0, j, 0))  # [B, G, V]
      return cache, drafts, qs

    dcache, drafts, qs = jax.lax.fori_loop(1, gamma_t, draft_step, (dcache, drafts, qs))

    # One target pass scores cur and every drafted position: p_1..p_{G+1}.
    tokens = jnp.concatenate([s.cur[:, None], drafts], axis=1)  # [B, G + 1]
    t_logits, tcache = target_fwd(s.target_cache, tokens, s.ctx_len - 1)  # [B, G + 1, V]
    if sampling.greedy:
      res = verify_lib.verify_greedy(drafts, t_logits, draft_len, fill=pad_id)
      # sum_x min(p, q) of two one-hots: 1 where the argmaxes agree. Computed from the tokens, not
      # from [B, G, V] one-hots (that sum was 1.3% of a batch-4 round).
      alpha_pos = (drafts == jnp.argmax(t_logits, axis=-1)[:, :g]).astype(jnp.float32)  # [B, G]
    else:
      probs = jnp.exp(logits_to_logprobs(t_logits, sampling))  # [B, G + 1, V]
      q_declared = qs if declare_q is None else declare_q(qs)
      res = verify_lib.verify_sampled(k_verify, drafts, q_declared, probs, draft_len,
                                      fill=pad_id)
      alpha_pos = verify_lib.acceptance_rate(qs, probs[:, :g])  # [B, G]
    n = res.num_accepted  # [B]
    emitted_n = n + 1
    if eos_id is not None:
      idx = jnp.arange(g + 1, dtype=jnp.int32)[None, :]
      is_eos = (res.tokens == eos_id) & (idx < emitted_n[:, None])  # [B, G + 1]
      hit = jnp.any(is_eos, axis=1)
      emitted_n = jnp.where(hit, jnp.argmax(is_eos, axis=1).astype(jnp.int32) + 1, emitted_n)
    else:
      hit = jnp.zeros((b,), bool)
    emitted = jnp.where(jnp.arange(g + 1)[None, :] < emitted_n[:, None], res.tokens, pad_id)

    # Commit: write the emitted tokens, advance lengths (rollback is only this), freeze done rows.
    def write(row, toks, at):
      return jax.lax.dynamic_update_slice(row, toks, (at,))
    out = jnp.where(active[:, None], jax.vmap(write)(s.out, emitted, s.gen), s.out)
    gen = s.gen + jnp.where(active, emitted_n, 0)
    ctx_len = s.ctx_len + jnp.where(active, emitted_n, 0)
    new_cur = jnp.take_along_axis(res.tokens, (emitted_n - 1)[:, None], axis=1)[:, 0]
    new_prev = jnp.where(emitted_n >= 2, jnp.take_along_axis(
        res.tokens, jnp.maximum(emitted_n - 2, 0)[:, None], axis=1)[:, 0], s.cur)
    # The draft fed cur and x_1..x_{gamma_t - 1}; it lags by one when all gamma_t were accepted.
    keep = jnp.minimum(n, gamma_t - 1)
    lag = jnp.clip(emitted_n - 1 - keep, 0, 1)
    done = s.done | (active & (hit | (gen >= max_new_tokens)))

    m = s.metrics
    act = active.astype(jnp.int32)
    offered = (pos < draft_len[:, None]) & active[:, None]  # [B, G]
    alpha_round = jnp.sum(jnp.where(offered, alpha_pos, 0.0), axis=1)  # [B]
    metrics = SpecMetrics(
        rounds=m.rounds + act, accepted=m.accepted + n * act, drafted=m.drafted + draft_len * act,
        bonus=m.bonus + (res.bonus & active & (draft_len > 0)).astype(jnp.int32),
        pos_offered=m.pos_offered + offered.astype(jnp.int32),
        pos_accepted=m.pos_accepted + (res.accepted & offered).astype(jnp.int32),
        alpha_sum=m.alpha_sum + alpha_round, target_passes=m.target_passes + 1,
        draft_steps=m.draft_steps + gamma_t, gamma_sum=m.gamma_sum + gamma_t)

    alpha_ema, next_gamma = s.alpha_ema, s.gamma
    if adaptive:
      n_off = jnp.sum(offered)
      observed = jnp.sum(alpha_round) / jnp.maximum(n_off, 1)
      alpha_ema = jnp.where(n_off > 0, 0.7 * s.alpha_ema + 0.3 * observed, s.alpha_ema)
      next_gamma = _best_gamma(alpha_ema, g, cost_ratio, self.verify_cost)

    record = s.record
    if record is not None:
      r = s.round
      put = lambda buf_, val: jax.lax.dynamic_update_index_in_dim(buf_, val, r, 0)
      record = RoundRecord(
          draft=put(record.draft, jnp.where(pos < draft_len[:, None], drafts, pad_id)),
          draft_len=put(record.draft_len, jnp.where(active, draft_len, 0)),
          num_accepted=put(record.num_accepted, jnp.where(active, n, 0)),
          emitted=put(record.emitted, emitted),
          num_emitted=put(record.num_emitted, jnp.where(active, emitted_n, 0)),
          active=put(record.active, active), gamma=put(record.gamma, gamma_t),
          num_rounds=r + 1)

    keep_old = lambda new, old: jnp.where(active, new, old)
    return LoopState(
        out=out, gen=gen, ctx_len=ctx_len, prev=keep_old(new_prev, s.prev),
        cur=keep_old(new_cur, s.cur), lag=keep_old(lag, s.lag), done=done,
        eos_hit=s.eos_hit | (active & hit), target_cache=tcache, draft_cache=dcache, rng=rng,
        round=s.round + 1, gamma=next_gamma, alpha_ema=alpha_ema, metrics=metrics,
        record=record)

  def finish(self, s: LoopState) -> SpecOutput:
    """The output view of a final state."""
    max_new_tokens, pad_id = self.max_new_tokens, self.pad_id
    tokens = s.out[:, :max_new_tokens]
    tokens = jnp.where(jnp.arange(max_new_tokens)[None, :] < s.gen[:, None], tokens, pad_id)
    return SpecOutput(tokens=tokens, lengths=s.gen, finished=s.eos_hit, metrics=s.metrics,
                      rounds=s.record)


def run_loop(target_fwd: ForwardFn, draft_fwd: ForwardFn, target_cache, draft_cache,
             prompts: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, **kw) -> SpecOutput:
  """Runs a whole generation in one `lax.while_loop`; `kw` are `SpecLoop`'s arguments."""
  loop = SpecLoop(target_fwd, draft_fwd, **kw)
  state = loop.init(target_cache, draft_cache, prompts, prompt_lengths, rng)
  return loop.finish(jax.lax.while_loop(loop.cond, loop.step, state))


# ---------------------------------------------------------------------------------------------------
# The LM front end: validation, caches and the compiled program.


def _variables(params) -> dict:
  return params if isinstance(params, dict) and "params" in params else {"params": params}


def lm_forward(params, config: LMConfig, fused: bool = False) -> ForwardFn:
  """A `ForwardFn` for an effjax LM: writes T tokens at per-row `lengths` of its KV cache.

  `fused`: calls of few tokens per row run as one C++ call (`effjax.ops.fused_lm_step`, where it
  applies): a draft's steps then cost a fraction of XLA's ~60 dispatched ops. Its numbers agree
  with the unfused model's to float32 rounding, not bit for bit: use it for drafts only.
  """
  model, variables = LM(config), _variables(params)

  def fwd(cache, tokens, lengths):
    cache = cache.with_lengths(lengths)
    if fused and fused_lm_step.applies(config, tokens.shape[1]):
      return fused_lm_step.step(variables, config, cache, tokens)
    out = model.apply(variables, tokens, cache=cache)
    return out.logits, out.cache
  return fwd


def resolve_fused_draft(draft_cfg: LMConfig, fused_draft: Optional[bool]) -> bool:
  """`speculative_generate`'s fused_draft: None picks the fused step wherever it applies."""
  reason = fused_lm_step.unsupported_reason(draft_cfg)
  if fused_draft and reason is not None:
    raise ValueError(f"fused_draft=True, but the fused step cannot serve this draft: {reason}; "
                     "pass fused_draft=None (automatic) or False")
  return reason is None if fused_draft is None else bool(fused_draft)


def _tokenizer_name(tok) -> Optional[str]:
  if tok is None:
    return None
  return tok if isinstance(tok, str) else getattr(tok, "name", type(tok).__name__)


def check_pair(target_cfg: LMConfig, draft_cfg: LMConfig, gamma: Any = 1, *,
               target_tokenizer: Any = None, draft_tokenizer: Any = None) -> None:
  """Refuses a draft/target pair (and gamma) that cannot do speculative decoding.

  Args:
    target_cfg, draft_cfg: the two LM configs.
    gamma: drafted tokens per round, an integer >= 1.
    target_tokenizer, draft_tokenizer: tokenizer objects (with `.name`) or names, when known.

  Raises:
    ValueError: different vocabularies or tokenizers, or a bad gamma.
  Warns:
    UserWarning: the draft is at least as large as the target, so it cannot speed anything up.
  """
  if isinstance(gamma, bool) or not isinstance(gamma, (int, np.integer)) or gamma <= 0:
    raise ValueError(f"gamma={gamma!r} must be an integer >= 1 (the number of tokens the draft "
                     "proposes per round; 4 is a good start)")
  if target_cfg.vocab_size != draft_cfg.vocab_size:
    raise ValueError(f"draft vocab_size {draft_cfg.vocab_size} != target vocab_size "
                     f"{target_cfg.vocab_size}: speculative decoding compares the two models' "
                     "distributions token by token, so both must use the same tokenizer and "
                     "vocabulary; pick (or train) a draft with the target's tokenizer")
  t_name, d_name = _tokenizer_name(target_tokenizer), _tokenizer_name(draft_tokenizer)
  if t_name is not None and d_name is not None and t_name != d_name:
    raise ValueError(f"draft tokenizer {d_name!r} != target tokenizer {t_name!r}: the same id "
                     "would mean different text to the two models; use a draft trained with the "
                     "target's tokenizer")
  if draft_cfg.num_params() >= target_cfg.num_params():
    warnings.warn(f"the draft ({draft_cfg.num_params():,} parameters) is not smaller than the "
                  f"target ({target_cfg.num_params():,}): each round costs gamma draft steps plus a "
                  "target pass, so this cannot be faster than decoding the target alone; use a "
                  "smaller draft", UserWarning, stacklevel=3)


@functools.partial(jax.jit, static_argnames=(
    "target_cfg", "draft_cfg", "gamma", "max_new_tokens", "sampling", "eos_id", "pad_id",
    "adaptive", "cost_ratio", "verify_cost", "record_rounds", "cache_len", "fused_draft"))
def _speculative_jit(target_params, draft_params, prompts, prompt_lengths, rng, *, target_cfg,
                     draft_cfg, gamma, max_new_tokens, sampling, eos_id, pad_id, adaptive,
                     cost_ratio, verify_cost, record_rounds, cache_len, fused_draft) -> SpecOutput:
  b = prompts.shape[0]
  return run_loop(
      lm_forward(target_params, target_cfg), lm_forward(draft_params, draft_cfg, fused_draft),
      init_cache(target_cfg, b, cache_len), init_cache(draft_cfg, b, cache_len), prompts,
      prompt_lengths, rng, gamma=gamma, max_new_tokens=max_new_tokens, sampling=sampling,
      eos_id=eos_id, pad_id=pad_id, adaptive=adaptive, cost_ratio=cost_ratio,
      verify_cost=verify_cost, record_rounds=record_rounds)


def speculative_generate(target_params, target_cfg: LMConfig, draft_params, draft_cfg: LMConfig,
                         prompts, prompt_lengths=None, *, gamma: int, max_new_tokens: int,
                         sampling: SamplingParams = SamplingParams(),
                         rng: Optional[jax.Array] = None, eos_id: Optional[int] = None,
                         pad_id: int = 0, adaptive: bool = False,
                         cost_ratio: Optional[float] = None, verify_cost: float = 1.0,
                         record_rounds: bool = False, target_tokenizer: Any = None,
                         draft_tokenizer: Any = None,
                         fused_draft: Optional[bool] = None) -> SpecOutput:
  """Generates with a draft proposing and the target verifying, in one compiled program.

  Greedy output equals the target's plain greedy output (exactly, in float32 with
  `matmul_precision="highest"`); sampled output is distributed exactly as the target's own samples.

  Args:
    target_params, draft_params: LM variables (`{'params': ...}` or the bare tree).
    target_cfg, draft_cfg: their configs (same vocabulary and tokenizer).
    prompts: [B, P] int token ids, right-padded; prompt_lengths: [B] (default all P).
    gamma: drafted tokens per round (the maximum when `adaptive`).
    max_new_tokens: tokens to generate per row; a row stops earlier after `eos_id`.
    sampling: `SamplingParams`, applied identically to target and draft.
    rng: PRNG key (default `jax.random.key(0)`).
    eos_id: token that ends a row (None: never stop early).
    pad_id: filler after a row's end in `tokens`.
    adaptive: pick each round's gamma in 1..gamma to maximise the predicted speedup at the running
      acceptance estimate.
    cost_ratio: draft/target step cost c for the adaptive rule (default: the parameter-count ratio;
      pass `metrics.measure_cost_ratio(...)` for a measured one).
    verify_cost: the (gamma + 1)-token verification pass's cost in target steps, for the adaptive
      rule (default 1, the paper's and an accelerator's; on a CPU it is ~1.5 at gamma 8:
      `metrics.verify_cost_ratio` measures it). It leans the rule towards longer drafts: a round
      verifies gamma + 1 tokens whichever gamma it drafts, so only the draft steps shrink.
    record_rounds: also return each round's drafts and decisions (for `view.py`).
    target_tokenizer, draft_tokenizer: optional tokenizers (or names) checked for equality.
    fused_draft: run the draft's steps as one C++ call each (`effjax.ops.fused_lm_step`): None
      (default) wherever it applies (a float32 draft on CPU whose weights stay in cache), True to
      insist (an error says why not), False for XLA's ops. The target is never fused, so greedy
      output stays bit-identical to plain greedy decoding.

  Returns:
    `SpecOutput` with tokens [B, max_new_tokens], lengths [B], finished [B], metrics and rounds.
  """
  check_pair(target_cfg, draft_cfg, gamma, target_tokenizer=target_tokenizer,
             draft_tokenizer=draft_tokenizer)
  if not isinstance(sampling, SamplingParams):
    raise TypeError(f"sampling must be effjax.generate.SamplingParams; got {type(sampling)}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
      max_new_tokens <= 0):
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  prompts_np = np.asarray(prompts)
  if prompts_np.ndim != 2 or prompts_np.shape[0] == 0 or prompts_np.shape[1] == 0:
    raise ValueError(f"prompts must be [batch, length] token ids with both sizes >= 1; got shape "
                     f"{prompts_np.shape}. Wrap a single prompt as prompts[None]")
  b, p = prompts_np.shape
  lengths_np = (np.full((b,), p, np.int32) if prompt_lengths is None
                else np.asarray(prompt_lengths).astype(np.int32))
  if lengths_np.shape != (b,) or (lengths_np < 1).any() or (lengths_np > p).any():
    raise ValueError(f"prompt_lengths must be [batch]=({b},) with values in 1..{p}; got "
                     f"{lengths_np.tolist()} (every row needs at least one token, e.g. BOS)")
  valid = np.arange(p)[None, :] < lengths_np[:, None]
  bad = valid & ((prompts_np < 0) | (prompts_np >= target_cfg.vocab_size))
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"token id {int(prompts_np[r, c])} at row {r}, position {c} is outside the "
                     f"vocabulary [0, {target_cfg.vocab_size}); check the tokenizer")
  if eos_id is not None and not 0 <= int(eos_id) < target_cfg.vocab_size:
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {target_cfg.vocab_size})")
  limit = min(target_cfg.max_len, draft_cfg.max_len)
  if int(lengths_np.max()) + max_new_tokens > limit:
    raise ValueError(f"prompt length {int(lengths_np.max())} + max_new_tokens {max_new_tokens} "
                     f"exceeds the models' max_len {limit}; shorten the prompt or max_new_tokens")
  # Pad the prompt block to a bucket so similar calls share one compilation (as the engine does).
  p_pad = bucket_length(int(lengths_np.max()))
  block = np.zeros((b, p_pad), np.int32)
  block[:, :min(p, p_pad)] = np.where(valid, prompts_np, 0)[:, :p_pad]
  # Verification writes gamma + 1 slots past the context, so the cache has that much slack.
  cache_len = bucket_length(p_pad + max_new_tokens + gamma + 1)
  if cost_ratio is None:
    cost_ratio = draft_cfg.num_params() / target_cfg.num_params()
  rng = jax.random.key(0) if rng is None else rng
  fused_draft = resolve_fused_draft(draft_cfg, fused_draft)
  return _speculative_jit(
      target_params, draft_params, jnp.asarray(block), jnp.asarray(lengths_np), rng,
      target_cfg=target_cfg, draft_cfg=draft_cfg, gamma=int(gamma),
      max_new_tokens=int(max_new_tokens), sampling=sampling,
      eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id), adaptive=bool(adaptive),
      cost_ratio=float(cost_ratio), verify_cost=float(verify_cost),
      record_rounds=bool(record_rounds), cache_len=int(cache_len), fused_draft=fused_draft)
