"""The C++ few-row matmul on CPU (effjax/ops/few_row_matmul.py): accuracy, exactness, routing.

Accuracy is checked against float64 numpy; exactness (the same bits for a row whatever else is in
the call - what speculative and Medusa decoding stand on) bit for bit; the LM's routing by lowering
its calls and reading the custom calls in the program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import lm, registry
from effjax.ops import few_row_matmul
from tests.helpers_lm import assert_kernel_decoding_matches_xla, prefill_rollback_step_logits

pytestmark = pytest.mark.skipif(few_row_matmul.unavailable_reason() is not None,
                                reason=f"{few_row_matmul.unavailable_reason()}")


def _inputs(seed, m, k, n, transpose_w):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((n, k) if transpose_w else (k, n)).astype(np.float32)
  return x, w


def _reference(x, w, transpose_w):
  w64 = w.astype(np.float64)
  return x.astype(np.float64) @ (w64.T if transpose_w else w64)


# (rows, K, N): full and partial panels, K not a multiple of the vector width, row counts that
# split into several register blocks with a remainder.
SHAPES = [(1, 256, 768), (5, 64, 70), (13, 37, 33), (40, 128, 264), (3, 16, 1)]


# "nn-stream": the blocked order for weights read from DRAM (K > 64 makes several blocks).
MODES = {"nn": (False, False), "nn-stream": (False, True), "nt": (True, False)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", SHAPES + [(9, 200, 300)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, mode):
  m, k, n = shape
  transpose_w, stream = MODES[mode]
  x, w = _inputs(0, m, k, n, transpose_w)
  got = np.asarray(few_row_matmul.matmul(jnp.asarray(x), jnp.asarray(w), transpose_w=transpose_w,
                                         stream=stream))
  assert got.shape == (m, n)
  # float32 accumulation over K terms of size ~1: error ~ sqrt(K) * 2^-24 * |terms|.
  np.testing.assert_allclose(got, _reference(x, w, transpose_w), atol=2e-6 * k, rtol=0)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rows_are_bit_identical_whatever_the_other_rows(mode):
  """A row's result does not depend on how many rows share the call or where it sits, nor on
  whether the weights are read in streaming blocks."""
  k, n = 200, 300
  transpose_w, stream = MODES[mode]
  x, w = _inputs(1, 40, k, n, transpose_w)
  call = lambda stream: jax.jit(lambda x: few_row_matmul.matmul(
      x, jnp.asarray(w), transpose_w=transpose_w, stream=stream))
  whole = np.asarray(call(stream)(jnp.asarray(x)))
  for start, size in ((0, 1), (17, 1), (3, 5), (11, 12), (25, 13), (1, 39)):
    part = np.asarray(call(stream)(jnp.asarray(x[start:start + size])))
    np.testing.assert_array_equal(part, whole[start:start + size], err_msg=f"{start}+{size}")
    part = np.asarray(call(not stream)(jnp.asarray(x[start:start + size])))
    np.testing.assert_array_equal(part, whole[start:start + size], err_msg=f"other {start}+{size}")
  # The comparison can fail: the same products summed in another order (two halves of K, then
  # added) differ from the kernel in some bits on these shapes.
  wk = w.T if transpose_w else w
  other = x[:, :k // 2] @ wk[:k // 2] + x[:, k // 2:] @ wk[k // 2:]
  assert not np.array_equal(other, whole)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", SHAPES + [(8, 512, 3072)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_rounds_float32_sums_like_xlas_bfloat16_dot(shape, mode):
  """bfloat16 x and w: each output is the float32 sum rounded once to bfloat16 - within half a
  bfloat16 step of the exact product, and XLA's own bfloat16 dot to one step."""
  m, k, n = shape
  transpose_w, stream = MODES[mode]
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(2, m, k, n, transpose_w))
  got = few_row_matmul.matmul(x, w, transpose_w=transpose_w, stream=stream)
  assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
  got = np.asarray(got, np.float64)
  exact = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), transpose_w)
  np.testing.assert_allclose(got, exact, rtol=2.0 ** -8, atol=2e-6 * k)
  want = np.asarray(jnp.matmul(x, w.T if transpose_w else w), np.float64)
  np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=2e-6 * k)
  assert np.mean(got == want) > 0.99  # Mostly the very same bfloat16.


def test_bfloat16_rows_are_bit_identical_whatever_the_other_rows():
  k, n = 200, 300
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(3, 40, k, n, False))
  packed = few_row_matmul.pack(w)
  call = lambda x, stream: few_row_matmul.matmul(x, packed, packed=True, stream=stream)
  whole = np.asarray(call(x, True)).view(np.uint16)
  for start, size in ((0, 1), (17, 1), (3, 5), (11, 12), (25, 13)):
    for stream in (True, False):
      part = np.asarray(call(x[start:start + size], stream)).view(np.uint16)
      np.testing.assert_array_equal(part, whole[start:start + size], err_msg=f"{start}+{size}")


def test_gradients_are_xlas():
  x, w = (jnp.asarray(a) for a in _inputs(2, 6, 48, 40, False))
  for transpose_w, w_ in ((False, w), (True, w.T)):
    loss = lambda x, w: jnp.sum(jnp.sin(few_row_matmul.matmul(x, w, transpose_w=transpose_w)))
    want_loss = lambda x, w: jnp.sum(jnp.sin(
        jnp.matmul(x, w.T if transpose_w else w, precision="highest")))
    got = jax.grad(loss, argnums=(0, 1))(x, w_)
    want = jax.grad(want_loss, argnums=(0, 1))(x, w_)
    for g, v in zip(got, want):
      np.testing.assert_allclose(g, v, atol=1e-5, rtol=1e-5)


def test_leading_axes_and_vmap():
  x, w = (jnp.asarray(a) for a in _inputs(3, 12, 32, 24, False))
  got = few_row_matmul.matmul(x.reshape(2, 3, 2, 32), w)  # [2, 3, 2, 24]
  np.testing.assert_allclose(got.reshape(12, 24), x @ w, atol=1e-5)
  per_example = jax.vmap(lambda x: few_row_matmul.matmul(x, w))(x.reshape(4, 3, 32))
  np.testing.assert_array_equal(per_example.reshape(12, 24), few_row_matmul.matmul(x, w))


def test_bad_shapes_say_what_is_wrong():
  x, w = (jnp.asarray(a) for a in _inputs(4, 2, 8, 5, False))
  with pytest.raises(ValueError, match=r"\[\.\.\., 8\] does not fit w \(5, 8\)"):
    few_row_matmul.matmul(x, w.T)
  with pytest.raises(ValueError, match="matmul_impl='fast'"):
    lm.LMConfig(matmul_impl="fast")


def _custom_calls(cfg, params, tokens, cache):
  text = jax.jit(lambda p, t, c: lm.LM(cfg).apply(p, t, cache=c).logits).lower(
      params, tokens, cache).as_text()
  return text.count("effjax_few_row_matmul")


def test_streaming_hint_follows_the_models_weight_bytes(monkeypatch):
  """Models larger than the cores' L2 caches ask for the streaming order; small ones do not."""
  draft = registry.get("lm/draft")  # ~1.7 MB of float32 weights
  small = registry.get("lm/small")  # ~19 MB
  assert not draft.weights_stream() and small.weights_stream()
  monkeypatch.setenv("EFFJAX_STREAMING_WEIGHT_BYTES", str(1 << 20))
  assert draft.weights_stream()
  monkeypatch.setenv("EFFJAX_STREAMING_WEIGHT_BYTES", str(64 << 20))
  assert not small.weights_stream()
  tiny = registry.get("lm/tiny")
  params = lm.init_params(tiny, jax.random.PRNGKey(0))
  text = jax.jit(lambda p, t, c: lm.LM(tiny).apply(p, t, cache=c).logits).lower(
      params, jnp.zeros((1, 2), jnp.int32), lm.init_cache(tiny, 1, 16)).as_text()
  assert "stream = false" in text  # lm/tiny (~0.2 MB) stays under even a 1 MB limit.


def test_blocked_reads_only_for_weights_the_last_level_cache_cannot_hold(monkeypatch):
  """Blocks pay from DRAM only: a model the LLC holds streams past L2 but is read unblocked."""
  small = registry.get("lm/small")  # ~19 MB: past L2, within a 32 MB L3
  monkeypatch.delenv("EFFJAX_STREAMING_WEIGHT_BYTES", raising=False)
  monkeypatch.setenv("EFFJAX_BLOCKED_WEIGHT_BYTES", str(32 << 20))
  assert small.weights_stream() and not small.weights_in_blocks()
  monkeypatch.setenv("EFFJAX_BLOCKED_WEIGHT_BYTES", str(16 << 20))
  assert small.weights_in_blocks()
  monkeypatch.delenv("EFFJAX_BLOCKED_WEIGHT_BYTES")
  monkeypatch.setattr(few_row_matmul, "last_level_cache_bytes", lambda: None)  # Unknown: block.
  assert small.weights_in_blocks()
  assert not registry.get("lm/draft").weights_in_blocks()  # The L2 caches hold it.
  cfg = registry.get("lm/tiny")
  params = lm.pack_weights(lm.init_params(cfg, jax.random.PRNGKey(0)), cfg, force=True)
  lower = lambda: jax.jit(lambda p, t, c: lm.LM(cfg).apply(p, t, cache=c).logits).lower(
      params, jnp.zeros((1, 2), jnp.int32), lm.init_cache(cfg, 1, 16)).as_text()
  assert "stream = false" in lower() and "stream = true" not in lower()
  monkeypatch.setenv("EFFJAX_STREAMING_WEIGHT_BYTES", "0")  # Past "L2"; the LLC is unknown above.
  assert "stream = true" in lower()


def test_last_level_cache_size_is_read_and_implausible_sizes_are_not_trusted(monkeypatch, tmp_path):
  for index, size in (("index0", "32K"), ("index2", "1024K"), ("index3", "32768K")):
    (tmp_path / index).mkdir()
    (tmp_path / index / "size").write_text(size + "\n")
  monkeypatch.setattr(few_row_matmul, "SYSFS_CPU_CACHES", str(tmp_path))
  few_row_matmul.last_level_cache_bytes.cache_clear()
  try:
    assert few_row_matmul.last_level_cache_bytes() == 32 << 20
    (tmp_path / "index3" / "size").write_text("491520K\n")  # A VM host's 480 MB, shared.
    few_row_matmul.last_level_cache_bytes.cache_clear()
    assert few_row_matmul.last_level_cache_bytes() is None
  finally:
    few_row_matmul.last_level_cache_bytes.cache_clear()


def test_lm_routes_cached_few_token_calls_only():
  cfg = registry.get("lm/tiny", matmul_precision="highest")
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  cache = lm.init_cache(cfg, 2, 128)
  # Per layer q, k, v, o, gate, up, down, plus the tied embedding's logits.
  per_call = 7 * cfg.num_layers + 1
  assert _custom_calls(cfg, params, jnp.zeros((2, 9), jnp.int32), cache) == per_call
  limit = few_row_matmul.MAX_TOKENS_PER_ROW
  assert _custom_calls(cfg, params, jnp.zeros((2, limit + 1), jnp.int32), cache) == 0
  assert _custom_calls(cfg.replace(matmul_impl="xla"), params, jnp.zeros((2, 1), jnp.int32),
                       cache) == 0
  full = jax.jit(lambda p, t: lm.LM(cfg).apply(p, t).logits).lower(
      params, jnp.zeros((2, 9), jnp.int32)).as_text()
  assert "effjax_few_row_matmul" not in full  # Training / full forwards stay on XLA.
  bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  bf16_cache = lm.init_cache(bf16, 2, 128)
  assert _custom_calls(bf16, bf16_params, jnp.zeros((2, 9), jnp.int32), bf16_cache) == per_call
  mixed = cfg.replace(param_dtype="bfloat16")  # float32 activations, bfloat16 weights: XLA's
  assert not mixed.uses_few_row_matmul(cached=True, tokens_per_row=1)
  untied = cfg.replace(tie_embeddings=False)
  untied_params = lm.init_params(untied, jax.random.PRNGKey(0))
  assert _custom_calls(untied, untied_params, jnp.zeros((2, 1), jnp.int32), cache) == per_call


def test_lm_cached_decoding_matches_xla():
  assert_kernel_decoding_matches_xla("matmul_impl")


def test_lm_bfloat16_decoding_matches_xla():
  """A bfloat16 model's cached calls through the kernel give XLA's logits to bfloat16 rounding."""
  base = registry.get("lm/tiny", dtype="bfloat16", param_dtype="bfloat16")
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                        lm.init_params(base.replace(dtype="float32", param_dtype="float32"),
                                       jax.random.PRNGKey(0)))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)
  decode = lambda impl: np.asarray(prefill_rollback_step_logits(base.replace(matmul_impl=impl),
                                                                params, tokens))
  got, want = decode("auto"), decode("xla")
  # Within one bfloat16 step of the largest logit (identical here); the float32 model's logits are
  # 0.05 away, so this also tells a bfloat16 path from one that skipped the rounding.
  np.testing.assert_allclose(got, want, atol=2.0 ** -7 * np.abs(want).max(), rtol=0)


def test_falls_back_to_xla_when_the_kernel_is_disabled(monkeypatch):
  cfg = registry.get("lm/tiny")
  monkeypatch.setenv("EFFJAX_CPU_MATMUL_KERNEL", "0")
  few_row_matmul._load.cache_clear()
  try:
    assert "disabled" in few_row_matmul.unavailable_reason()
    assert not cfg.uses_few_row_matmul(cached=True, tokens_per_row=1)
  finally:
    monkeypatch.delenv("EFFJAX_CPU_MATMUL_KERNEL")
    few_row_matmul._load.cache_clear()
  assert cfg.uses_few_row_matmul(cached=True, tokens_per_row=1)
