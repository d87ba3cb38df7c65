"""The fused C++ decode step (effjax.ops.fused_lm_step) against the LM's own cached forward, and
speculative decoding with a fused draft: same greedy output, same cache state after every round."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import random_params, registry
from effjax.models.lm import LM, init_cache
from effjax.ops import cpu_ffi, fused_lm_step
from effjax.speculative import decode

pytestmark = pytest.mark.skipif(fused_lm_step.unsupported_reason(registry.get("lm/tiny"))
                                is not None, reason="fused step unavailable (no compiler?)")

CONFIGS = {
    "tiny": {},  # GQA 4:2, tied embeddings.
    "untied_scaled_mha": dict(tie_embeddings=False, num_kv_heads=4,
                              rope_scaling=(8.0, 1.0, 4.0, 64)),
    # One kv head for 4 query heads, and a head_dim that is not a multiple of the vector width.
    "mqa_head_dim_24": dict(num_heads=4, num_kv_heads=1, head_dim=24),
}


@functools.partial(jax.jit, static_argnames="cfg")
def _prefill(params, context, lengths, *, cfg):
  cache = init_cache(cfg, context.shape[0], 48)
  return LM(cfg).apply(params, context, cache=cache).cache.with_lengths(lengths)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 2), (3, 1), (3, 2), (2, 5)])
def test_matches_the_lm_cached_forward(name, batch, tokens):
  cfg = registry.get("lm/tiny", **CONFIGS[name])
  params = random_params(cfg, 0)
  rng = np.random.default_rng(batch * 10 + tokens)
  context = jnp.asarray(rng.integers(0, 256, (batch, 20)), jnp.int32)
  lengths = jnp.asarray([20, 7, 13][:batch], jnp.int32)  # Ragged: stale slots past each length.
  cache = _prefill(params, context, lengths, cfg=cfg)
  new = jnp.asarray(rng.integers(0, 256, (batch, tokens)), jnp.int32)
  want = LM(cfg).apply(params, new, cache=cache)
  logits, got = jax.jit(functools.partial(fused_lm_step.step, config=cfg))(params, cache=cache,
                                                                           tokens=new)
  np.testing.assert_allclose(logits, want.logits, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got.lengths, lengths + tokens)
  for layer in range(cfg.num_layers):
    for mine, ref, old in ((got.k[layer], want.cache.k[layer], cache.k[layer]),
                           (got.v[layer], want.cache.v[layer], cache.v[layer])):
      np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)
      # Outside the written slots the buffer is the input's, bit for bit (written in place).
      mine, old = cache.row_view(mine), cache.row_view(old)  # [B, S, K, H]
      for r in range(batch):
        start = int(lengths[r])
        np.testing.assert_array_equal(mine[r, :start], old[r, :start])
        np.testing.assert_array_equal(mine[r, start + tokens:], old[r, start + tokens:])


@pytest.mark.parametrize("isa_flags",
                         [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "scalar"])
def test_other_instruction_sets_match_too(isa_flags, monkeypatch):
  """The AVX2 and scalar builds: narrower tiles and vectors, the same step."""
  target = "effjax_fused_lm_step_" + "_".join(f.strip("-") for f in isa_flags)
  reason = cpu_ffi.load(fused_lm_step._SOURCE, (*fused_lm_step._FLAGS, *isa_flags),
                        "EffjaxFusedLmStep", target, "test build")
  assert reason is None, reason  # A compiler is there (the module's skip says so).
  monkeypatch.setattr(fused_lm_step, "_TARGET", target)
  cfg = registry.get("lm/tiny", tie_embeddings=False)
  params = random_params(cfg, 2)
  context = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 20)), jnp.int32)
  cache = _prefill(params, context, jnp.asarray([20, 11], jnp.int32), cfg=cfg)
  new = jnp.asarray([[3, 4], [5, 6]], jnp.int32)
  logits, _ = fused_lm_step.step(params, cfg, cache, new)
  np.testing.assert_allclose(logits, LM(cfg).apply(params, new, cache=cache).logits, atol=1e-5,
                             rtol=0)


def test_repeated_calls_give_the_same_bits():
  """Two threads share each call's work units in whatever order they claim them; a unit's result
  must not depend on that (nor on a lingering helper from the call before)."""
  cfg = registry.get("lm/draft")
  params = random_params(cfg, 3)
  context = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 30)), jnp.int32)
  cache = _prefill(params, context, jnp.full((4,), 30, jnp.int32), cfg=cfg)
  new = jnp.asarray(np.random.default_rng(3).integers(0, 256, (4, 2)), jnp.int32)

  run = jax.jit(lambda cache, new: fused_lm_step.step(params, cfg, cache, new)[0])
  first = np.asarray(run(cache, new))
  for _ in range(30):  # 30 executions from the same (copied, never donated) cache.
    np.testing.assert_array_equal(run(cache, new), first)


def test_concurrent_callers_share_the_helper_safely():
  """Two Python threads call the step at once (the lingering helper is one per process): each
  still gets the single-caller bits."""
  import threading
  cfg = registry.get("lm/draft")
  params = random_params(cfg, 4)
  context = jnp.asarray(np.random.default_rng(4).integers(0, 256, (3, 30)), jnp.int32)
  cache = _prefill(params, context, jnp.full((3,), 30, jnp.int32), cfg=cfg)
  run = jax.jit(lambda cache, new: fused_lm_step.step(params, cfg, cache, new)[0])
  inputs = [jnp.full((3, 1), i, jnp.int32) for i in range(2)]
  want = [np.asarray(run(cache, new)) for new in inputs]
  errors = []

  def worker(i):
    try:
      for _ in range(25):
        np.testing.assert_array_equal(run(cache, inputs[i]), want[i])
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)
  threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors


def test_refuses_what_it_cannot_serve(monkeypatch):
  assert "float32" in fused_lm_step.unsupported_reason(registry.get("lm/tiny", dtype="bfloat16"))
  # lm/small's 19 MB stream from memory: the ops' dispatch is a small part of its step.
  assert "stream" in fused_lm_step.unsupported_reason(registry.get("lm/small"))
  assert fused_lm_step.applies(registry.get("lm/tiny"), 2)
  assert not fused_lm_step.applies(registry.get("lm/tiny"), fused_lm_step.MAX_TOKENS_PER_ROW + 1)
  with pytest.raises(ValueError, match="fused_draft=True"):
    decode.resolve_fused_draft(registry.get("lm/tiny", dtype="bfloat16"), True)
  assert decode.resolve_fused_draft(registry.get("lm/tiny", dtype="bfloat16"), None) is False
  with pytest.raises(ValueError, match="cannot serve"):
    fused_lm_step.step(random_params(registry.get("lm/small"), 0), registry.get("lm/small"),
                       init_cache(registry.get("lm/small"), 1, 8), jnp.zeros((1, 1), jnp.int32))


def test_speculative_output_is_the_same_with_and_without_the_fused_draft():
  cfg = registry.get("lm/tiny", matmul_precision="highest")
  target, draft = random_params(cfg, 0), random_params(cfg, 1)
  target_close = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.std(x), target)
  prompts = np.random.default_rng(0).integers(0, 256, (4, 9)).astype(np.int32)
  lengths = np.array([9, 1, 5, 3], np.int32)
  outs = {}
  for fused in (False, True):
    for name, d in (("unrelated", draft), ("close", target_close)):
      with pytest.warns(UserWarning, match="not smaller"):
        outs[fused, name] = decode.speculative_generate(
            target, cfg, d, cfg, prompts, lengths, gamma=4, max_new_tokens=20,
            fused_draft=fused)
  for name in ("unrelated", "close"):
    np.testing.assert_array_equal(outs[True, name].tokens, outs[False, name].tokens)
  # The fused draft proposes what the unfused one does (its logits agree to float32 rounding).
  np.testing.assert_array_equal(outs[True, "close"].metrics.accepted,
                                outs[False, "close"].metrics.accepted)
  assert int(outs[True, "close"].metrics.accepted.sum()) > 0


def test_fused_draft_cache_matches_a_fresh_forward_after_every_round():
  """Rounds of the loop with the fused draft leave its cache as a fresh forward over the accepted
  context would fill it (rollback by length, the lag after full acceptance)."""
  cfg = registry.get("lm/tiny")
  target, draft = random_params(cfg, 0), jax.tree_util.tree_map(
      lambda x: x * 1.02, random_params(cfg, 0))
  prompts = np.random.default_rng(1).integers(0, 256, (3, 9)).astype(np.int32)
  lengths = np.array([9, 2, 6], np.int32)
  gamma, max_new = 3, 12
  loop = decode.SpecLoop(decode.lm_forward(target, cfg), decode.lm_forward(draft, cfg, fused=True),
                         gamma=gamma, max_new_tokens=max_new,
                         sampling=decode.SamplingParams(temperature=1.0))
  cache_len = 9 + max_new + gamma + 1
  state = jax.jit(loop.init)(init_cache(cfg, 3, cache_len), init_cache(cfg, 3, cache_len),
                             jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(3))
  step = jax.jit(loop.step)

  @jax.jit
  def fresh(params, tokens):
    return LM(cfg).apply(params, tokens).logits

  @jax.jit
  def cached(params, cache, r, tokens, at):
    return LM(cfg).apply(params, tokens, cache=cache.row(r).with_lengths(at)).logits
  saw_lag = False
  while bool(loop.cond(state)):
    state = step(state)
    saw_lag |= bool((state.lag > 0).any())
    out, gen = np.asarray(state.out), np.asarray(state.gen)
    for r in range(3):
      ctx = list(prompts[r, :lengths[r]]) + list(out[r, :gen[r]])
      lag = int(state.lag[r])
      padded = np.zeros((1, 32), np.int32)
      padded[0, :len(ctx)] = ctx
      want = fresh(draft, jnp.asarray(padded))[0, len(ctx) - 1]
      got = cached(draft, state.draft_cache, r, jnp.array([ctx[len(ctx) - 1 - lag:]]),
                   jnp.array([len(ctx) - 1 - lag]))[0, -1]
      np.testing.assert_allclose(got, want, atol=2e-5)
  assert saw_lag
