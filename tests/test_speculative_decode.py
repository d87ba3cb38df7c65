"""Speculative decoding with LMs: greedy exactness against the engine, cache state after every round,
EOS and length limits, adaptive gamma, metrics, the token-level view and refusals of bad input."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.generate.engine import generate
from effjax.generate.sampling import SamplingParams
from effjax.models import init_params, registry
from effjax.models.lm import LM, init_cache
from effjax.speculative import decode, metrics, view
from effjax.speculative.decode import speculative_generate

MAX_NEW = 21  # Not a multiple of any gamma + 1, so the last round is cut by the budget.


@pytest.fixture(scope="module")
def models():
  """Target, an unrelated draft of the same shape, and a smaller draft that is the target perturbed."""
  cfg = registry.get("lm/tiny", matmul_precision="highest")

  @jax.jit  # One compilation instead of many eager random ops.
  def make():
    target = init_params(cfg, jax.random.key(0))
    unrelated = init_params(cfg, jax.random.key(1))
    leaves, tree = jax.tree_util.tree_flatten(target)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    close = jax.tree_util.tree_unflatten(tree, [
        x + 0.4 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return target, unrelated, close
  return (cfg,) + make()


def prompts_for(batch):
  rng = np.random.default_rng(batch)
  prompts = rng.integers(0, 256, (batch, 9)).astype(np.int32)
  lengths = np.array([9, 1, 5, 3][:batch] if batch <= 4 else rng.integers(1, 10, batch), np.int32)
  return prompts, lengths


def spec(target, cfg, draft, dcfg, prompts, lengths, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # Same-size drafts warn (they cannot be faster).
    return speculative_generate(target, cfg, draft, dcfg, prompts, lengths, **kw)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("gamma", range(1, 9))
def test_greedy_equals_plain_greedy(models, batch, gamma):
  cfg, target, unrelated, _ = models
  prompts, lengths = prompts_for(batch)
  ref = generate(target, cfg, prompts, lengths, max_new_tokens=MAX_NEW)
  # Draft == target: every drafted token is accepted, every round.
  out = spec(target, cfg, target, cfg, prompts, lengths, gamma=gamma, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  m = out.metrics
  np.testing.assert_array_equal(m.accepted, m.drafted)
  np.testing.assert_array_equal(m.rounds, [-(-MAX_NEW // (gamma + 1))] * batch)
  np.testing.assert_array_equal(m.pos_accepted, m.pos_offered)
  # An unrelated draft: nearly everything is rejected, and the output is still the target's.
  out = spec(target, cfg, unrelated, cfg, prompts, lengths, gamma=gamma, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  assert int(out.metrics.accepted.sum()) < int(out.metrics.drafted.sum()) // 2


@pytest.mark.parametrize("batch", [1, 4])
def test_bfloat16_greedy_equals_plain_greedy(models, batch):
  """A bfloat16 target and draft: the kernels' bfloat16 paths keep each row's numbers independent
  of the rows beside it, so verifying gamma + 1 tokens at once still reproduces plain greedy."""
  cfg, target, unrelated, _ = models
  cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  target16, unrelated16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
                           for p in (target, unrelated))
  prompts, lengths = prompts_for(batch)
  ref = generate(target16, cfg16, prompts, lengths, max_new_tokens=MAX_NEW)
  for draft, gamma in ((target16, 4), (unrelated16, 3)):
    out = spec(target16, cfg16, draft, cfg16, prompts, lengths, gamma=gamma,
               max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_eos_inside_draft_and_length_limit(models):
  cfg, target, _, close = models
  prompts, lengths = prompts_for(4)
  free = generate(target, cfg, prompts, lengths, max_new_tokens=MAX_NEW)
  eos = int(free.tokens[0, 6])  # A token the target emits mid-sequence in row 0: use it as EOS.
  ref = generate(target, cfg, prompts, lengths, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=7)
  assert int(ref.lengths[0]) <= 7 and bool(ref.finished[0])
  for draft in (target, close):  # With draft == target the EOS sits inside an accepted draft.
    out = spec(target, cfg, draft, cfg, prompts, lengths, gamma=5, max_new_tokens=MAX_NEW,
               eos_id=eos, pad_id=7)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.finished, ref.finished)


def fresh_last_logits(params, cfg, seq):
  """Logits after `seq` from a cache-free forward (padded to one shape: causality hides the pad)."""
  padded = np.zeros((1, 32), np.int32)
  padded[0, :len(seq)] = seq
  return _fresh(params, jnp.asarray(padded), len(seq) - 1, cfg=cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _fresh(params, tokens, last, *, cfg):
  return LM(cfg).apply(params, tokens).logits[0, last]


def test_caches_match_fresh_forward_after_every_round(models):
  """After each round, a row's target cache plus `cur` (and the draft cache plus what it lags) give
  the logits of a fresh forward over the row's accepted context: rollback left nothing stale."""
  cfg, target, _, close = models
  prompts, lengths = prompts_for(3)
  gamma, max_new = 3, 16
  loop = decode.SpecLoop(decode.lm_forward(target, cfg), decode.lm_forward(close, cfg),
                         gamma=gamma, max_new_tokens=max_new,
                         sampling=SamplingParams(temperature=1.0))
  cache_len = 9 + max_new + gamma + 1
  state = jax.jit(loop.init)(init_cache(cfg, 3, cache_len), init_cache(cfg, 3, cache_len),
                             jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(5))
  step = jax.jit(loop.step)
  @jax.jit
  def fwd(params, cache, r, tokens, at):  # Row r of the cache, fed `tokens` at slot `at`.
    return LM(cfg).apply(params, tokens, cache=cache.row(r).with_lengths(at)).logits
  saw_lag = saw_reject = False
  while bool(loop.cond(state)):
    state = step(state)
    saw_lag |= bool((state.lag > 0).any())
    saw_reject |= bool((state.metrics.accepted < state.metrics.drafted).any())
    out, gen, ctx_len, cur = map(np.asarray, (state.out, state.gen, state.ctx_len, state.cur))
    for r in range(3):
      ctx = list(prompts[r, :lengths[r]]) + list(out[r, :gen[r]])
      assert len(ctx) == ctx_len[r] and cur[r] == ctx[-1]
      got = fwd(target, state.target_cache, r, jnp.array([[ctx[-1]]]),
                jnp.array([len(ctx) - 1]))[0, -1]
      np.testing.assert_allclose(got, fresh_last_logits(target, cfg, ctx), atol=2e-5)
      lag = int(state.lag[r])
      got = fwd(close, state.draft_cache, r, jnp.array([ctx[len(ctx) - 1 - lag:]]),
                jnp.array([len(ctx) - 1 - lag]))[0, -1]
      np.testing.assert_allclose(got, fresh_last_logits(close, cfg, ctx), atol=2e-5)
  assert saw_lag and saw_reject, "the run must exercise both full acceptance and rejection"
  assert (np.asarray(state.gen) == max_new).all()


def test_greedy_alpha_counts_every_offered_position_where_draft_and_target_agree(models):
  """Greedy alpha (sum_x min(p, q) of two one-hots) is 1 exactly where the drafted token is the
  target's argmax given the context and the earlier drafts, rejected positions included."""
  cfg, target, _, close = models
  prompts, lengths = prompts_for(2)
  out = spec(target, cfg, close, cfg, prompts, lengths, gamma=4, max_new_tokens=MAX_NEW,
             record_rounds=True)
  rec = out.rounds
  expected = np.zeros(2)
  for b in range(2):
    ctx = list(prompts[b, :lengths[b]])
    for r in range(int(rec.num_rounds)):
      if not bool(rec.active[r, b]):
        continue
      drafts = [int(x) for x in rec.draft[r, b, :int(rec.draft_len[r, b])]]
      for i, x in enumerate(drafts):
        expected[b] += int(np.argmax(fresh_last_logits(target, cfg, ctx + drafts[:i]))) == x
      ctx += [int(x) for x in rec.emitted[r, b, :int(rec.num_emitted[r, b])]]
  alpha_sum = np.asarray(out.metrics.alpha_sum)
  np.testing.assert_array_equal(alpha_sum, expected)
  # Not a vacuous check: some drafts agree after a rejection (alpha counts them, acceptance does
  # not), and some disagree.
  assert (alpha_sum > np.asarray(out.metrics.accepted)).any()
  assert (alpha_sum < np.asarray(out.metrics.drafted)).all()


def test_sampled_is_seeded_and_draft_equal_target_accepts_all(models):
  cfg, target, _, close = models
  prompts, lengths = prompts_for(4)
  sampling = SamplingParams(temperature=1.0, top_p=0.9)
  kw = dict(gamma=4, max_new_tokens=MAX_NEW, sampling=sampling)
  a = spec(target, cfg, close, cfg, prompts, lengths, rng=jax.random.key(1), **kw)
  b = spec(target, cfg, close, cfg, prompts, lengths, rng=jax.random.key(1), **kw)
  c = spec(target, cfg, close, cfg, prompts, lengths, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  s = spec(target, cfg, target, cfg, prompts, lengths, rng=jax.random.key(1), **kw)
  summary = metrics.summarize(s.metrics, s.lengths)
  assert summary["acceptance_rate"] > 0.97 and summary["alpha"] > 0.99, summary


def test_adaptive_gamma_grows_for_a_good_draft_and_shrinks_for_a_bad_one(models):
  cfg, target, unrelated, _ = models
  prompts, lengths = prompts_for(4)
  ref = generate(target, cfg, prompts, lengths, max_new_tokens=40)
  kw = dict(gamma=6, max_new_tokens=40, adaptive=True, cost_ratio=0.1, record_rounds=True)
  good = spec(target, cfg, target, cfg, prompts, lengths, **kw)
  bad = spec(target, cfg, unrelated, cfg, prompts, lengths, **kw)
  for out in (good, bad):
    np.testing.assert_array_equal(out.tokens, ref.tokens)
  g_good = np.asarray(good.rounds.gamma)[:int(good.rounds.num_rounds)]
  g_bad = np.asarray(bad.rounds.gamma)[:int(bad.rounds.num_rounds)]
  assert g_good[0] == 3 and g_good[-1] == 6, g_good
  assert g_bad[-1] == 1, g_bad

def test_adaptive_gamma_pays_the_verification_pass_whatever_gamma_it_drafts(models):
  """Drafting as dear as a target step makes one-token drafts best when verification costs one
  step; a costly pass (a CPU's), paid in full whatever gamma a round drafts, makes longer ones best."""
  cfg, target, _, close = models
  prompts, lengths = prompts_for(4)
  ref = generate(target, cfg, prompts, lengths, max_new_tokens=40)
  kw = dict(gamma=6, max_new_tokens=40, adaptive=True, cost_ratio=1.0, record_rounds=True)
  last_gamma = {}
  for v in (1.0, 1000.0):
    out = spec(target, cfg, close, cfg, prompts, lengths, verify_cost=v, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    last_gamma[v] = int(np.asarray(out.rounds.gamma)[int(out.rounds.num_rounds) - 1])
  assert last_gamma[1.0] == 1 and last_gamma[1000.0] > 1, last_gamma
  with pytest.raises(ValueError, match="verify_cost"):
    spec(target, cfg, close, cfg, prompts, lengths, verify_cost=0.0, **kw)
  with pytest.raises(ValueError, match="verify_cost"):  # Refused for a fixed gamma too.
    spec(target, cfg, close, cfg, prompts, lengths, gamma=2, max_new_tokens=4, verify_cost=-1.0)


def test_record_and_views_reconstruct_the_output(models):
  cfg, target, _, close = models
  prompts, lengths = prompts_for(4)
  out = spec(target, cfg, close, cfg, prompts, lengths, gamma=4, max_new_tokens=MAX_NEW,
             sampling=SamplingParams(temperature=1.0), record_rounds=True)
  n_rej = 0
  for r in range(4):
    rounds = view.row_rounds(out.rounds, r)
    rebuilt = [t for rd in rounds for t in rd.accepted + [rd.target_token]]
    np.testing.assert_array_equal(rebuilt, out.tokens[r, :int(out.lengths[r])])
    n_rej += sum(len(rd.rejected) for rd in rounds)
  assert n_rej > 0
  text = view.render_terminal(out.rounds, 0, color=True)
  assert "\x1b[9;31m" in text and len(text.split("\n")) == len(view.row_rounds(out.rounds, 0))
  page = view.render_html(out.rounds, summary=metrics.summarize(out.metrics, out.lengths))
  assert page.count("<div class='round'>") == sum(len(view.row_rounds(out.rounds, r))
                                                 for r in range(4))
  assert page.count('<span class="rej">') >= 1 and "<table>" in page


def test_view_of_a_hand_made_round():
  # One row, gamma 3: drafted "abc", accepted "ab", rejected "c", target wrote "X"; then a bonus.
  rec = decode.RoundRecord(
      draft=jnp.array([[[97, 98, 99]], [[100, 101, 102]]]), draft_len=jnp.array([[3], [3]]),
      num_accepted=jnp.array([[2], [3]]),
      emitted=jnp.array([[[97, 98, 88, 0]], [[100, 101, 102, 33]]]),
      num_emitted=jnp.array([[3], [4]]), active=jnp.array([[True], [True]]),
      gamma=jnp.array([3, 3]), num_rounds=jnp.int32(2))
  assert view.render_terminal(rec, 0, color=False).splitlines() == ["ab~~c~~[X]", "abXdef[!]"]
  page = view.render_html(rec, prompts=["<p>"])
  assert '<span class="rej">c</span>' in page and '<span class="fix">X</span>' in page
  assert '<span class="bonus">!</span>' in page and "&lt;p&gt;" in page


def test_summarize_and_predicted_speedup():
  m = decode.SpecMetrics(
      rounds=jnp.array([4, 2]), accepted=jnp.array([6, 1]), drafted=jnp.array([12, 6]),
      bonus=jnp.array([1, 0]), pos_offered=jnp.array([[4, 4, 4], [2, 2, 2]]),
      pos_accepted=jnp.array([[3, 2, 1], [1, 0, 0]]), alpha_sum=jnp.array([9.0, 3.0]),
      target_passes=jnp.int32(4), draft_steps=jnp.int32(12), gamma_sum=jnp.int32(12))
  s = metrics.summarize(m, jnp.array([10, 3]), cost_ratio=0.0)
  assert s["tar"] == pytest.approx(7 / 6) and s["tau"] == pytest.approx(13 / 6)
  assert s["alpha"] == pytest.approx(12 / 18)
  assert s["per_position_acceptance"] == pytest.approx([4 / 6, 2 / 6, 1 / 6])
  assert s["target_passes_per_token"] == pytest.approx(6 / 13)
  # Leviathan's EnDe anchor: alpha 0.75, gamma 7, c = 0 gives (1 - 0.75^8) / 0.25 = 3.60 tokens.
  assert metrics.predicted_speedup(0.75, 7, 0.0) == pytest.approx(3.5995, abs=1e-3)
  assert float(decode.predicted_speedup(0.75, 7, 0.05)) == pytest.approx(
      metrics.predicted_speedup(0.75, 7, 0.05), rel=1e-5)
  assert metrics.predicted_speedup(1.0, 4, 0.0) == 5.0
  # A verification pass costing v target steps divides by (gamma c + v) instead of (gamma c + 1).
  assert metrics.predicted_speedup(0.75, 7, 0.1, verify_cost=2.0) == pytest.approx(3.5995 / 2.7,
                                                                                 abs=1e-3)
  s = metrics.summarize(m, jnp.array([10, 3]), cost_ratio=0.1, verify_cost=2.0)
  assert s["verify_cost"] == 2.0
  assert s["predicted_speedup_verify"] == pytest.approx(
      metrics.predicted_speedup(12 / 18, 3.0, 0.1, verify_cost=2.0))
  assert s["predicted_speedup_verify"] < s["predicted_speedup"]


def test_paired_speedup_follows_a_drifting_machine(monkeypatch):
  """The speedup is the median of per-repeat ratios, so a machine slowing down mid-run moves the
  baseline and the candidate together."""
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  slowdown = iter([1.0, 3.0, 3.0])  # The machine turns 3x slower after the first repeat.

  class Out:
    tokens = jnp.zeros((1,))

  def runs(seconds):
    def fn(prompts):
      clock[0] += seconds * speed[0]
      return Out()
    return fn

  speed = [1.0]

  def baseline(p):
    speed[0] = next(slowdown)
    return runs(2.0)(p)
  t = metrics.paired_speedup_over_sets(baseline, runs(1.0), [None], repeats=3)
  assert t["speedup"] == pytest.approx(2.0)  # Every repeat: 2 s vs 1 s at the same speed.
  # The medians themselves carry the slowdown (2 of 3 repeats ran 3x slower).
  assert t["baseline_s"] == pytest.approx(6.0) and t["seconds"] == pytest.approx(3.0)


def test_machine_state_split_separates_the_two_modes(monkeypatch):
  """A machine that, in some repeats, computes slower and streams memory faster: the paired ratio
  of a memory-bound baseline and a compute-bound candidate flips there, and the probe timed around
  each pair sorts the repeats into the two states."""
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  low_state = iter([False, True, False, True, True])  # The state of repeats 1..5.
  low = [False]

  class Out:
    tokens = jnp.zeros((1,))

  def baseline(p):  # Memory-bound: 1.2x faster in the low state.
    low[0] = next(low_state)
    clock[0] += 2.0 / (1.2 if low[0] else 1.0)
    return Out()

  def candidate(p):  # Compute-bound: 1.35x slower in the low state.
    clock[0] += 1.0 * (1.35 if low[0] else 1.0)
    return Out()

  def probe():
    clock[0] += 0.015 * (1.35 if low[0] else 1.0)
    return 0.015 * (1.35 if low[0] else 1.0)

  t = metrics.paired_speedup_over_sets(baseline, candidate, [None], repeats=5, probe=probe)
  assert len(t["ratios"]) == len(t["probe_s"]) == 5
  # Each pair's probe is the slower of before and after, and a repeat's "before" probe runs in the
  # state the last repeat left: repeat 3 (full) follows a low one, so it counts as low. Only pairs
  # wholly in the full state count as full (here, repeat 1).
  split = metrics.split_by_machine_state(t["ratios"], t["probe_s"], min(t["probe_s"]))
  assert split["speedup_full_compute"] == pytest.approx(2.0)
  assert split["speedup_low_compute"] == pytest.approx(2.0 / 1.2 / 1.35)
  assert split["low_compute_share"] == pytest.approx(4 / 5)
  with pytest.raises(ValueError, match="one probe time per ratio"):
    metrics.split_by_machine_state([1.0, 2.0], [0.1], 0.1)


def test_bad_input_is_refused(models):
  cfg, target, _, _ = models
  prompts, lengths = prompts_for(1)
  kw = dict(gamma=2, max_new_tokens=4)
  small = cfg.replace(num_layers=1)
  draft = target  # Never run: every call below is refused before the program starts.
  with pytest.raises(ValueError, match="vocab_size"):
    speculative_generate(target, cfg, draft, small.replace(vocab_size=300), prompts, lengths, **kw)
  with pytest.raises(ValueError, match="tokenizer"):
    speculative_generate(target, cfg, draft, small, prompts, lengths, target_tokenizer="bytes-v1",
                         draft_tokenizer="gpt2", **kw)
  for gamma in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=re.escape(f"gamma={gamma!r}")):
      speculative_generate(target, cfg, draft, small, prompts, lengths, gamma=gamma,
                           max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    speculative_generate(target, cfg, draft, small, prompts, lengths, gamma=2, max_new_tokens=0)
  with pytest.raises(ValueError, match="prompt_lengths"):
    speculative_generate(target, cfg, draft, small, prompts, np.array([0]), **kw)
  with pytest.raises(ValueError, match="max_len"):
    speculative_generate(target, cfg, draft, small, prompts, lengths, gamma=2,
                         max_new_tokens=cfg.max_len)
  with pytest.warns(UserWarning, match="cannot be faster"):
    decode.check_pair(small, cfg, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    decode.check_pair(cfg, small, 2)  # A smaller draft: no warning.


def test_experiment_tiny_config_runs(tmp_path):
  import importlib.util
  import os
  from effjax.speculative import experiment
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "speculative",
                      "stdlib.py")
  spec_ = importlib.util.spec_from_file_location("spec_stdlib_config", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  results = experiment.run(module.get_config("tiny"), str(tmp_path))
  (row,) = results["rows"]
  assert row["lossless"] is True and row["gamma"] == 3 and row["batch"] == 2
  assert 0.0 <= row["alpha"] <= 1.0 and row["tau"] == pytest.approx(row["tar"] + 1.0)
  page = (tmp_path / "speculative_view.html").read_text()
  assert page.count("<div class='round'>") > 0 and "draft scratch" in page
  assert (tmp_path / "speculative_results.json").exists()
