"""Speculative-decoding metrics: what the loop counted, turned into the numbers papers report.

Definitions (REFERENCES 1):
* TAR, accepted draft tokens per round (sum of accepted / rounds, over rows);
* tau = TAR + 1, tokens per round counting the target's correction/bonus token (vLLM, EAGLE and
  Spec-Bench count it);
* per-position acceptance, P(position i accepted | position i offered);
* alpha = E[sum_x min(p, q)] = 1 - TV(p, q), averaged over offered positions (the expected acceptance of
  one drafted token, independent of where the round stopped);
* target passes per generated token (1 for plain decoding);
* c, the measured cost of one draft decode step over one target decode step;
* predicted speedup (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)), to put next to the measured one;
* and, where the (gamma + 1)-token verification pass does not cost one target step (CPUs: it costs
  about 2 steps at gamma 8 for lm/small), the same prediction with its measured cost v in place of
  the 1: (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + v)), `predicted_speedup_verify`.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models.lm import LMConfig, init_cache
from effjax.speculative.decode import SpecMetrics, lm_forward, resolve_fused_draft


def expected_tokens_per_round(alpha: float, gamma: float) -> float:
  """(1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per round at i.i.d. acceptance alpha."""
  if alpha >= 1.0:
    return gamma + 1.0
  return (1.0 - alpha ** (gamma + 1.0)) / (1.0 - alpha)


def predicted_speedup(alpha: float, gamma: float, cost_ratio: float,
                      verify_cost: float = 1.0) -> float:
  """Leviathan et al.'s wall-clock gain at acceptance alpha, gamma drafts and cost ratio c.

  `verify_cost` is the (gamma + 1)-token verification pass in target steps (1 in the paper).
  """
  return expected_tokens_per_round(alpha, gamma) / (gamma * cost_ratio + verify_cost)


def _seconds_over_sets(fn, prompt_sets) -> float:
  """Wall seconds of `fn(prompts)` for every prompt set in turn, until all tokens are ready."""
  start = time.perf_counter()
  jax.block_until_ready([fn(p).tokens for p in prompt_sets])
  return time.perf_counter() - start


def median_seconds_over_sets(fn, prompt_sets, repeats: int):
  """Median seconds of running `fn(prompts)` over every prompt set in turn, after one warm-up pass.

  Batch-1 latency is measured over several prompts run one after another (one prompt decides too
  little: a draft can agree with the target on one text and not on the next). Returns (seconds,
  the warm-up pass's outputs, one per set).
  """
  outs = [fn(p) for p in prompt_sets]
  jax.block_until_ready([o.tokens for o in outs])
  times = [_seconds_over_sets(fn, prompt_sets) for _ in range(repeats)]
  return statistics.median(times), outs


def paired_speedup_over_sets(baseline_fn, fn, prompt_sets, repeats: int,
                             probe: Optional[Callable[[], float]] = None) -> dict:
  """Times `baseline_fn` and `fn` over every prompt set in alternation: the speedup of `fn`.

  Both must be compiled and idle already (call each once and block on its outputs: dispatch is
  asynchronous, and a warm-up still running would slow the first timed run). Each repeat runs the
  baseline over the sets, then `fn`; the speedup is the median of the repeats' ratios, so a machine
  whose speed drifts within a run (2-core VMs here: autoregressive generation of the same prompts
  took 1.9 s in one minute and 1.6 s a few minutes later) moves both sides of each ratio together.

  Drift that moves both sides together is not the only kind: see `make_compute_probe`. With
  `probe`, it is timed before and after each pair, and the slower of the two is that pair's probe.

  Returns:
    dict with baseline_s and seconds (medians), speedup (median of baseline / seconds), ratios (one
    per repeat) and, with `probe`, probe_s (one per repeat).
  """
  base, new, probes = [], [], []
  for _ in range(repeats):
    before = probe() if probe else 0.0
    base.append(_seconds_over_sets(baseline_fn, prompt_sets))
    new.append(_seconds_over_sets(fn, prompt_sets))
    if probe:
      probes.append(max(before, probe()))
  ratios = [b / n for b, n in zip(base, new)]
  out = {"baseline_s": statistics.median(base), "seconds": statistics.median(new),
         "speedup": statistics.median(ratios), "ratios": ratios}
  if probe:
    out["probe_s"] = probes
  return out


def make_compute_probe(size: int = 512, matmuls: int = 10, runs: int = 3) -> Callable[[], float]:
  """A compute-bound probe of the machine's state: the fastest of `runs` timings of `matmuls`
  chained (size, size) float32 matmuls (~15 ms each on 2 Zen 4 vCPUs), in cache, on XLA's thread
  pool. The minimum drops one-off stalls; a state that lasts seconds slows every run.

  Why: the 2-vCPU Zen 4 VM these benchmarks ran on switches, for seconds at a time (up to ~16 s
  seen), into a state where a cache line takes ~350 ns instead of ~55 ns to go from one vCPU to the
  other and back (the host has put them far apart), this probe runs ~35% slower, streaming from DRAM
  ~40% faster, and one-thread compute is unchanged (RESULTS.md, "Two states of the VM"). A
  memory-bound baseline (autoregressive decoding of a target past the L3) and a compute-bound
  candidate (batch-4 verification passes) then move in opposite directions, and their ratio flips
  between two modes that pairing cannot cancel. Timing the probe around each pair says which state
  it ran in (`split_by_machine_state`).
  """
  a = jnp.full((size, size), 1e-3, jnp.float32)
  chain = jax.jit(lambda x: jax.lax.fori_loop(0, matmuls, lambda i, y: y @ x, x))
  chain(a).block_until_ready()  # Compiles.

  def probe() -> float:
    times = []
    for _ in range(runs):
      start = time.perf_counter()
      chain(a).block_until_ready()
      times.append(time.perf_counter() - start)
    return min(times)
  return probe


def split_by_machine_state(ratios, probe_s, reference_s: float, slack: float = 1.2) -> dict:
  """Median speedup over the pairs that ran at the machine's full compute and over the rest.

  A pair ran at full compute when its probe (`make_compute_probe`) took at most `slack` times
  `reference_s`, the run's fastest probe; the probe's own noise stays within ~10% here, the low
  state costs it ~35%. Returns speedup_full_compute and speedup_low_compute (None where no pair
  ran in that state) and low_compute_share, the fraction of pairs in the low state.
  """
  if len(ratios) != len(probe_s) or not ratios:
    raise ValueError(f"need one probe time per ratio, got {len(ratios)} ratios and "
                     f"{len(probe_s)} probe times")
  full = [r for r, t in zip(ratios, probe_s) if t <= slack * reference_s]
  low = [r for r, t in zip(ratios, probe_s) if t > slack * reference_s]
  return {"speedup_full_compute": statistics.median(full) if full else None,
          "speedup_low_compute": statistics.median(low) if low else None,
          "low_compute_share": len(low) / len(ratios)}


def merge_rows(outputs) -> tuple:
  """(metrics, lengths) of several `SpecOutput`s as if they were one batch: counters that are
  per-row arrays are concatenated, scalar counters summed."""
  metrics = jax.tree.map(lambda *xs: sum(np.asarray(x) for x in xs) if np.ndim(xs[0]) == 0
                         else np.concatenate([np.asarray(x) for x in xs]),
                         *[o.metrics for o in outputs])
  return metrics, np.concatenate([np.asarray(o.lengths) for o in outputs])


def summarize(metrics: SpecMetrics, lengths, *, cost_ratio: Optional[float] = None,
              measured_speedup: Optional[float] = None,
              verify_cost: Optional[float] = None) -> dict:
  """Turns the loop's counters into a flat dict of floats (JSON-ready).

  Args:
    metrics: `SpecOutput.metrics`.
    lengths: `SpecOutput.lengths`, [B] generated tokens per row.
    cost_ratio: measured c (see `measure_cost_ratio`); enables `predicted_speedup`.
    measured_speedup: wall-clock speedup over plain decoding, reported beside the prediction.
    verify_cost: measured cost of the verification pass in target steps (`verify_cost_ratio`);
      with cost_ratio, enables `predicted_speedup_verify`.

  Returns:
    dict with tar, tau, alpha, acceptance_rate (accepted / offered), per_position_acceptance (list),
    target_passes_per_token, draft_steps_per_round, mean_gamma, rounds, generated_tokens, and, when
    given, cost_ratio, predicted_speedup, measured_speedup.
  """
  m = jax.tree_util.tree_map(np.asarray, metrics)
  lengths = np.asarray(lengths)
  row_rounds = int(m.rounds.sum())
  accepted, drafted = int(m.accepted.sum()), int(m.drafted.sum())
  passes = int(m.target_passes)
  tar = accepted / max(row_rounds, 1)
  offered = m.pos_offered.sum(0)
  per_pos = [float(a) / float(o) if o else float("nan")
             for a, o in zip(m.pos_accepted.sum(0), offered)]
  alpha = float(m.alpha_sum.sum()) / drafted if drafted else float("nan")
  mean_gamma = float(m.gamma_sum) / max(passes, 1)
  out = {
      "tar": tar,
      "tau": tar + 1.0,
      "alpha": alpha,
      "acceptance_rate": accepted / drafted if drafted else float("nan"),
      "per_position_acceptance": per_pos,
      "bonus_rate": float(m.bonus.sum()) / max(row_rounds, 1),
      "target_passes_per_token": row_rounds / max(int(lengths.sum()), 1),
      "draft_steps_per_round": float(m.draft_steps) / max(passes, 1),
      "mean_gamma": mean_gamma,
      "rounds": passes,
      "generated_tokens": int(lengths.sum()),
  }
  if cost_ratio is not None:
    out["cost_ratio"] = float(cost_ratio)
    if drafted:
      out["predicted_speedup"] = predicted_speedup(min(alpha, 1.0), mean_gamma, cost_ratio)
      if verify_cost is not None:
        out["verify_cost"] = float(verify_cost)
        out["predicted_speedup_verify"] = predicted_speedup(min(alpha, 1.0), mean_gamma,
                                                            cost_ratio, verify_cost)
  if measured_speedup is not None:
    out["measured_speedup"] = float(measured_speedup)
  return out


@functools.partial(jax.jit, static_argnames=("config", "steps", "fused"),
                   donate_argnames=("cache",))
def _decode_steps(params, cache, tokens, *, config: LMConfig, steps: int, fused: bool = False):
  """`steps` cached decode steps inside one program, as the decoding loops run them.

  Returns (a [B] checksum of the logits, the cache with its lengths as given). The cache is
  donated: pass the returned one to the next call. A decoding loop keeps its cache in place across
  steps; without the donation XLA copied every cache buffer into the loop on each call (105 MB
  per call for `large` at batch 8, ~1 ms per step at 4 steps per call), which inflated the
  measured step. `fused`: through `effjax.ops.fused_lm_step` where it applies, as speculative
  drafts run.
  """
  fwd, start = lm_forward(params, config, fused), cache.lengths

  def body(i, carry):
    cache, acc = carry
    logits, cache = fwd(cache, tokens + i % 7, start + i)
    return cache, acc + logits[:, -1, 0]
  cache, acc = jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(tokens.shape[:1])))
  return acc, cache.with_lengths(start)


class DecodeSteps:
  """Calls `_decode_steps` again and again on one cache, handing the donated cache back each time.

  `DecodeSteps(params, cache, tokens, config=..., steps=...)()` runs the steps and returns the
  checksum; `lower()` gives the compiled program's `Lowered`.
  """

  def __init__(self, params, cache, tokens, **static):
    self.params, self.cache, self.tokens, self.static = params, cache, tokens, static

  def __call__(self, **override):
    acc, self.cache = _decode_steps(self.params, self.cache, self.tokens,
                                    **{**self.static, **override})
    return acc

  def lower(self, **override):
    return _decode_steps.lower(self.params, self.cache, self.tokens, **{**self.static, **override})


def step_time(params, config: LMConfig, *, batch: int = 1, context: int = 64,
              cache_len: int = 256, iters: int = 20, tokens_per_step: int = 1,
              steps: int = 16, fused: bool = False) -> float:
  """Median seconds of one cached decode step (`tokens_per_step` new tokens after `context`).

  Steps run `steps` at a time inside one compiled loop, so host dispatch (which the one-jit decoding
  loops never pay per step) does not inflate small models' cost. `fused`: time the step as a fused
  speculative draft runs it (`effjax.ops.fused_lm_step`).
  """
  if context + steps * tokens_per_step > cache_len:
    raise ValueError(f"context {context} + {steps} steps x {tokens_per_step} tokens exceeds "
                     f"cache_len {cache_len}; raise cache_len")
  cache = init_cache(config, batch, cache_len)
  cache = cache.with_lengths(jnp.full((batch,), context, jnp.int32))
  tokens = jnp.zeros((batch, tokens_per_step), jnp.int32)
  run = DecodeSteps(params, cache, tokens, config=config, steps=steps, fused=fused)
  jax.block_until_ready(run())  # Compile.
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def measure_cost_ratio(target_params, target_cfg: LMConfig, draft_params, draft_cfg: LMConfig, *,
                       batch: int = 1, context: int = 64, cache_len: int = 256,
                       iters: int = 20, fused_draft: Optional[bool] = None) -> dict:
  """c = draft step time / target step time, both one cached token at the same context and batch.

  The draft's step is timed as `speculative_generate(fused_draft=...)` runs it (None: fused where
  `effjax.ops.fused_lm_step` applies).

  The speedup formula assumes the target's (gamma + 1)-token verification pass costs one target step,
  which memory-bound accelerators give and CPUs only approximate; `step_time(tokens_per_step=...)`
  measures that pass when the difference matters.

  Returns:
    dict with target_step_s, draft_step_s and cost_ratio.
  """
  t = step_time(target_params, target_cfg, batch=batch, context=context, cache_len=cache_len,
                iters=iters)
  d = step_time(draft_params, draft_cfg, batch=batch, context=context, cache_len=cache_len,
                iters=iters, fused=resolve_fused_draft(draft_cfg, fused_draft))
  return {"target_step_s": t, "draft_step_s": d, "cost_ratio": d / t}


def verify_cost_ratio(params, config: LMConfig, gamma: int, *, batch: int = 1, context: int = 64,
                      cache_len: int = 256, iters: int = 10) -> float:
  """v = time of one (gamma + 1)-token target pass / time of one 1-token target step."""
  steps = max(1, min(16, (cache_len - context) // (gamma + 1)))
  one = step_time(params, config, batch=batch, context=context, cache_len=cache_len, iters=iters,
                  steps=steps)
  many = step_time(params, config, batch=batch, context=context, cache_len=cache_len, iters=iters,
                   tokens_per_step=gamma + 1, steps=steps)
  return many / one


def format_table(rows: list[dict], columns: list[str]) -> str:
  """A fixed-width text table of `columns` from each row dict (floats to 3 decimals)."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
      return " ".join(f"{x:.2f}" for x in v)
    return str(v)
  cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
