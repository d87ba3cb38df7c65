"""The decoding engine: cache invariance, ragged batches, EOS, compilation reuse, streaming, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.data.tokenizer import ByteTokenizer
from effjax.generate import engine, streaming
from effjax.generate.sampling import SamplingParams
from effjax.models import LM, init_cache, random_params, registry

CFG = registry.get("lm/tiny", matmul_precision="highest", max_len=128)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, 0)


def _prompts(seed=0, lengths=(7, 3, 11)):
  rng = np.random.default_rng(seed)
  p = max(lengths)
  out = np.full((len(lengths), p), 99, np.int32)  # junk padding: it must not matter
  for r, n in enumerate(lengths):
    out[r, :n] = rng.integers(0, 256, n)
  return out, np.asarray(lengths, np.int32)


@jax.jit
def _full_forward(params, tokens):
  return LM(CFG).apply(params, tokens).logits  # [B, T, V], no cache


def _greedy_by_recompute(params, prompt, n):
  """Reference: no cache, the whole sequence recomputed for every new token.

  The sequence is padded to one fixed length (one compilation); by causality the padding after
  position t does not change the logits at t.
  """
  seq = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, 64), np.int32)
    padded[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(_full_forward(params, jnp.asarray(padded))[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_cached_logits_equal_full_recompute_every_step(params):
  prompts, lengths = _prompts(lengths=(6, 9))
  cache = init_cache(CFG, 2, 32)
  cache, logits, _ = jax.jit(engine.prefill, static_argnums=1)(
      params, CFG, jnp.asarray(prompts), jnp.asarray(lengths), cache)
  seqs = [list(prompts[r, :lengths[r]]) for r in range(2)]
  step = jax.jit(lambda p, t, c: LM(CFG).apply(p, t, cache=c))
  for i in range(8):
    for r in range(2):
      padded = np.zeros((1, 64), np.int32)
      padded[0, :len(seqs[r])] = seqs[r]
      full = _full_forward(params, jnp.asarray(padded))[0, len(seqs[r]) - 1]
      np.testing.assert_allclose(np.asarray(logits[r]), np.asarray(full), atol=1e-5, rtol=0,
                                 err_msg=f"row {r}, decode step {i}")
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    for r in range(2):
      seqs[r].append(int(tok[r]))
    out = step(params, tok[:, None], cache)
    cache, logits = out.cache, out.logits[:, 0]
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 8)


def test_greedy_generate_matches_recompute_and_ragged_equals_alone(params):
  prompts, lengths = _prompts()
  n = 12
  batch = engine.generate(params, CFG, prompts, lengths, max_new_tokens=n)
  assert batch.tokens.shape == (3, n)
  np.testing.assert_array_equal(np.asarray(batch.lengths), [n] * 3)
  for r in range(3):
    alone = engine.generate(params, CFG, prompts[r:r + 1, :lengths[r]], max_new_tokens=n)
    np.testing.assert_array_equal(np.asarray(batch.tokens[r]), np.asarray(alone.tokens[0]))
  want = _greedy_by_recompute(params, prompts[1, :lengths[1]], n)
  np.testing.assert_array_equal(np.asarray(batch.tokens[1]), want)


def test_rows_stop_at_their_own_eos(params):
  prompts, lengths = _prompts(seed=3)
  free = np.asarray(engine.generate(params, CFG, prompts, lengths, max_new_tokens=10).tokens)
  eos = int(free[0, 4])  # row 0 emits this at step 4 (maybe earlier too)
  out = engine.generate(params, CFG, prompts, lengths, max_new_tokens=10, eos_id=eos, pad_id=-7)
  tokens, got_len = np.asarray(out.tokens), np.asarray(out.lengths)
  for r in range(3):
    hits = np.nonzero(free[r] == eos)[0]
    want_len = int(hits[0]) + 1 if hits.size else 10
    assert got_len[r] == want_len
    assert bool(out.finished[r]) == bool(hits.size)
    np.testing.assert_array_equal(tokens[r, :want_len], free[r, :want_len])
    assert (tokens[r, want_len:] == -7).all()
  # Several EOS ids: the row ends at the first of any.
  other = int(free[1, 2])
  multi = engine.generate(params, CFG, prompts, lengths, max_new_tokens=10, eos_id=[eos, other])
  assert int(multi.lengths[1]) <= 3


def test_sampling_is_reproducible_from_the_key(params):
  prompts, lengths = _prompts(seed=1)
  kw = dict(max_new_tokens=16, sampling=SamplingParams(1.0, top_k=50))
  a = engine.generate(params, CFG, prompts, lengths, rng=jax.random.key(1), **kw)
  b = engine.generate(params, CFG, prompts, lengths, rng=jax.random.key(1), **kw)
  c = engine.generate(params, CFG, prompts, lengths, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  # top_k=1 at any temperature is greedy.
  k1 = engine.generate(params, CFG, prompts, lengths, max_new_tokens=16, rng=jax.random.key(3),
                       sampling=SamplingParams(1.5, top_k=1))
  greedy = engine.generate(params, CFG, prompts, lengths, max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(k1.tokens), np.asarray(greedy.tokens))


def test_one_compilation_per_batch_and_length_bucket(params):
  sp = SamplingParams(0.8, top_p=0.9)  # params of their own, so earlier tests do not interfere
  before = engine.trace_count()
  # Prompts <= 16 and outputs <= 16 slots, prompt + new in 17..32 cache slots: one bucket.
  for n, new in ((5, 14), (9, 12), (16, 16), (3, 15)):
    prompts, lengths = _prompts(seed=n, lengths=(n, max(1, n - 2)))
    engine.generate(params, CFG, prompts, lengths, max_new_tokens=new, sampling=sp,
                    eos_id=5 + n, rng=jax.random.key(n))
  assert engine.trace_count() - before == 1
  prompts, lengths = _prompts(lengths=(20, 4))  # next prompt bucket
  engine.generate(params, CFG, prompts, lengths, max_new_tokens=8, sampling=sp)
  assert engine.trace_count() - before == 2
  prompts, lengths = _prompts(lengths=(5, 4, 3))  # another batch size
  engine.generate(params, CFG, prompts, lengths, max_new_tokens=8, sampling=sp)
  assert engine.trace_count() - before == 3


def test_streaming_hands_out_the_same_tokens_in_order(params):
  prompts, lengths = _prompts(seed=4)
  # Same shapes and sampling as the test above: shares its compilation.
  kw = dict(max_new_tokens=9, sampling=SamplingParams(1.0, top_k=50), rng=jax.random.key(9))
  batch = engine.generate(params, CFG, prompts, lengths, **kw)
  s = streaming.stream(params, CFG, prompts, lengths, **kw)
  chunks = list(s)
  assert [c.step for c in chunks] == list(range(9))
  np.testing.assert_array_equal(np.stack([c.tokens for c in chunks], 1), np.asarray(batch.tokens))
  np.testing.assert_array_equal(s.result.tokens, np.asarray(batch.tokens))
  before = engine.trace_count()
  list(streaming.stream(params, CFG, prompts, lengths, **kw))  # a second stream: no new compile
  assert engine.trace_count() == before


def test_stream_text_reassembles_the_decoded_continuation(params):
  tok = ByteTokenizer()
  ids = tok.encode("héllo wörld", add_bos=True)
  pieces = list(streaming.stream_text(params, CFG, ids, tok.decode, max_new_tokens=16,
                                      eos_id=tok.eos_id))
  out = engine.generate(params, CFG, np.asarray([ids]), max_new_tokens=16, eos_id=tok.eos_id)
  assert "".join(pieces) == tok.decode(np.asarray(out.tokens[0]).tolist())
  assert len(pieces) > 1


@pytest.mark.parametrize("make, match", [
    (lambda: (np.zeros((1, 100), np.int32), None, dict(cache_len=64)), "exceeds the cache"),
    (lambda: (np.zeros((1, 120), np.int32), None, {}), "config.max_len"),
    (lambda: (np.zeros((2, 0), np.int32), None, {}), "empty prompt"),
    (lambda: (np.array([[1, 2, 300]]), None, {}), "outside the vocabulary"),
    (lambda: (np.array([[1, -1, 3]]), None, {}), "outside the vocabulary"),
    (lambda: (np.array([[1, 2], [0, 0]]), np.array([2, 0]), {}), "padding only"),
    (lambda: (np.array([[1, 2]]), None, dict(max_new_tokens=0)), "max_new_tokens"),
    (lambda: (np.array([[1, 2]]), None, dict(max_new_tokens=-3)), "max_new_tokens"),
    (lambda: (np.array([1, 2, 3]), None, {}), r"\[batch, length\]"),
    (lambda: (np.array([[1.0, 2.0]]), None, {}), "integer"),
    (lambda: (np.array([[1, 2]]), np.array([3]), {}), "exceed the padded prompt"),
])
def test_bad_input_raises_clear_errors(params, make, match):
  prompts, lengths, kw = make()
  kw = {"max_new_tokens": 16, **kw}
  with pytest.raises(ValueError, match=match):
    engine.generate(params, CFG, prompts, lengths, **kw)


def test_padding_beyond_the_length_is_ignored_even_if_out_of_vocab(params):
  prompts = np.array([[5, 6, 7, 9999], [8, 9, 10, 11], [1, -5, 300, 2]], np.int32)
  out = engine.generate(params, CFG, prompts, np.array([3, 4, 1]), max_new_tokens=14)
  alone = engine.generate(params, CFG, prompts[:1, :3], max_new_tokens=14)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(alone.tokens[0]))


def test_cli_streams_from_hf_dir_and_from_workdir(params, tmp_path):
  from effjax.interop import hf_llama
  hf_dir = tmp_path / "hf"
  hf_llama.save_hf_dir(params, CFG, str(hf_dir), eos_token_id=ByteTokenizer.eos_id)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
  cmd = [sys.executable, "-m", "experiments.generate", "--prompt", "ab", "--max_new_tokens=6"]
  res = subprocess.run(cmd + [f"--hf_dir={hf_dir}"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  tok = ByteTokenizer()
  ids = tok.encode("ab", add_bos=True)
  want = engine.generate(params, CFG, np.asarray([ids]), max_new_tokens=6, eos_id=tok.eos_id)
  assert res.stdout == "ab" + tok.decode(np.asarray(want.tokens[0]).tolist()) + "\n"
  # A training workdir: Orbax checkpoint via effjax.train.checkpoint, model named in config.json.
  from effjax.train import checkpoint as ckpt_lib
  workdir = tmp_path / "run"
  manager = ckpt_lib.make_manager(str(workdir), keep=1, async_save=False)
  ckpt_lib.save(manager, 3, {"params": params, "step": jnp.int32(3)})
  manager.wait_until_finished()
  manager.close()
  overrides = {"max_len": CFG.max_len, "matmul_precision": CFG.matmul_precision}
  (workdir / "config.json").write_text(json.dumps({"model": "lm/tiny",
                                                   "model_overrides": overrides}))
  res = subprocess.run(cmd + [f"--workdir={workdir}"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout == "ab" + tok.decode(np.asarray(want.tokens[0]).tolist()) + "\n"
  # Both sources at once is a usage error, not a guess.
  bad = subprocess.run(cmd + [f"--hf_dir={hf_dir}", "--workdir=/nonexistent"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert bad.returncode != 0 and "exactly one of" in bad.stderr


def test_cli_model_config_from_experiment_config():
  from effjax.generate.loading import lm_config_from_experiment
  assert lm_config_from_experiment({"model": "lm/tiny"}) == registry.get("lm/tiny")
  got = lm_config_from_experiment({"model": {"name": "lm/tiny", "d_model": 32, "lr": 1.0}})
  assert got == registry.get("lm/tiny", d_model=32)
  # The trainer's config.json: every LMConfig field under model_overrides, None = keep the variant's.
  from effjax.train import lm_task
  overrides = lm_task.model_overrides(remat=True).to_dict()
  got = lm_config_from_experiment({"model": "lm/tiny", "model_overrides": overrides})
  assert got == registry.get("lm/tiny", remat=True)
  with pytest.raises(ValueError, match="--model"):
    lm_config_from_experiment({"optim": {"lr": 1.0}})
