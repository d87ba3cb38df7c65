"""The C++ decode-attention kernel on CPU (effjax/attention/cpu_decode.py) against XLA.

Each case compares `impl="cpu_decode"` with `impl="xla"` (precision highest) on the LM cache's flat
[B*K, S, H] layout: outputs, log-sum-exp, rows that see no key, gradients (XLA's, by construction),
the dispatch's routing under `impl="auto"`, and the fallback when the kernel cannot be built.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention import MASK_VALUE, MaskSpec, dot_product_attention
from effjax.attention import cpu_decode
from effjax.ops import cpu_ffi
from tests.helpers_lm import assert_kernel_decoding_matches_xla

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None,
                                reason=f"{cpu_decode.unavailable_reason()}")


def _inputs(seed, b, t, n, kh, h, s):
  rng = np.random.default_rng(seed)
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return make(b, t, n, h), make(b * kh, s, h), make(b * kh, s, h)


def _attend(impl, q, k, v, spec, softcap=None):
  return dot_product_attention(q, k, v, spec, impl=impl, strict=True, softcap=softcap,
                               precision="highest", return_lse=True, kv_layout="flat")


# (queries per row, query heads, kv heads, head_dim, cache slots, window, softcap)
CASES = {
    "decode-gqa": (1, 8, 2, 64, 70, None, None),
    "verify-9-gqa-window": (9, 8, 4, 32, 53, 12, None),
    "16-mha-softcap": (16, 4, 4, 64, 40, None, 5.0),
    "3-mqa-odd-head-dim": (3, 6, 1, 24, 37, 7, 30.0),
    # Keys and values over the kernel's 2 MB prefetching threshold (6.8 MB).
    "decode-prefetching": (1, 8, 4, 64, 1100, None, None),
    # Prefills: 300 and 400 query rows per block, split into the kernel's 128-row units.
    "prefill-150-gqa": (150, 4, 2, 32, 160, None, None),
    "prefill-200-mqa-window": (200, 2, 1, 64, 210, 33, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_xla_including_empty_rows(name):
  t, n, kh, h, s, window, softcap = CASES[name]
  b = 3
  q, k, v = _inputs(0, b, t, n, kh, h, s)
  lengths = jnp.asarray([0, s // 2, s])  # Row 0 sees no key at all.
  pos = jnp.maximum(lengths[:, None] - t, 0) + jnp.arange(t)[None, :]
  spec = MaskSpec(causal=True, q_positions=pos, kv_lengths=lengths, local_window=window)
  out, lse = _attend("cpu_decode", q, k, v, spec, softcap)
  want_out, want_lse = _attend("xla", q, k, v, spec, softcap)
  np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=0)
  np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=1e-6)
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(lse[0], np.float32(MASK_VALUE))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_cache_rounds_float32_attention_once(name):
  """bfloat16 q and cache: widened as read, float32 sums, each output rounded once to bfloat16 -
  within one bfloat16 step of float32 attention over the same (widened) values, and no further
  from it than XLA's bfloat16 attention, which also rounds the probabilities to bfloat16."""
  t, n, kh, h, s, window, softcap = CASES[name]
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(0, 3, t, n, kh, h, s))
  lengths = jnp.asarray([0, s // 2, s])
  pos = jnp.maximum(lengths[:, None] - t, 0) + jnp.arange(t)[None, :]
  spec = MaskSpec(causal=True, q_positions=pos, kv_lengths=lengths, local_window=window)
  out, lse = _attend("cpu_decode", q, k, v, spec, softcap)
  assert out.dtype == jnp.bfloat16
  exact_out, exact_lse = _attend("xla", *(x.astype(jnp.float32) for x in (q, k, v)), spec, softcap)
  out, exact_out = np.asarray(out, np.float32), np.asarray(exact_out)
  np.testing.assert_allclose(out, exact_out, atol=1e-6, rtol=2.0 ** -7)
  np.testing.assert_allclose(lse, exact_lse, atol=2e-6, rtol=1e-6)
  np.testing.assert_array_equal(out[0], 0.0)
  xla_out = np.asarray(_attend("xla", q, k, v, spec, softcap)[0], np.float32)
  assert np.abs(out - exact_out).mean() <= np.abs(xla_out - exact_out).mean()


@pytest.mark.parametrize("isa_flags",
                         [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "scalar"])
def test_other_instruction_sets_match_xla(isa_flags, monkeypatch):
  """The paths without AVX-512 (per-row value sums, the plain logits loop) on every case."""
  target = "effjax_cpu_decode_attention_" + "_".join(f.strip("-") for f in isa_flags)
  reason = cpu_ffi.load(cpu_decode._SOURCE, (*cpu_decode._FLAGS, *isa_flags),
                        "EffjaxCpuDecodeAttention", target, "test build")
  if reason is not None:
    pytest.skip(reason)
  reason = cpu_ffi.load(cpu_decode._SOURCE, (*cpu_decode._FLAGS, *isa_flags),
                        "EffjaxCpuDecodeAttentionBf16", target + "_bf16", "test build")
  assert reason is None, reason
  for name in sorted(CASES):
    t, n, kh, h, s, window, softcap = CASES[name]
    q, k, v = _inputs(0, 3, t, n, kh, h, s)
    lengths = jnp.asarray([0, s // 2, s])
    pos = jnp.maximum(lengths[:, None] - t, 0) + jnp.arange(t)[None, :]
    spec = MaskSpec(causal=True, q_positions=pos, kv_lengths=lengths, local_window=window)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    want_bf16 = np.asarray(_attend("cpu_decode", *bf16, spec, softcap)[0], np.float32)
    with monkeypatch.context() as patch:
      patch.setattr(cpu_decode, "_TARGET", target)
      patch.setattr(cpu_decode, "_TARGET_BF16", target + "_bf16")
      for got, want in zip(_attend("cpu_decode", q, k, v, spec, softcap),
                           _attend("xla", q, k, v, spec, softcap)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6, err_msg=name)
      # bfloat16: the AVX-512 build's outputs to one bfloat16 step (sums in another order).
      got_bf16 = np.asarray(_attend("cpu_decode", *bf16, spec, softcap)[0], np.float32)
      np.testing.assert_allclose(got_bf16, want_bf16, atol=1e-6, rtol=2.0 ** -7, err_msg=name)


def test_non_causal_with_lengths_and_default_positions():
  q, k, v = _inputs(1, 2, 4, 4, 2, 32, 50)
  spec = MaskSpec(kv_lengths=jnp.asarray([7, 50]))
  for got, want in zip(_attend("cpu_decode", q, k, v, spec), _attend("xla", q, k, v, spec)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("t", [3, 9, 33])
def test_rows_are_computed_independently_of_each_other(t):
  """A row's result does not depend on which other rows share the call (bitwise), with or without
  helper threads (66 rows use them): speculative verification of gamma + 1 tokens reproduces
  one-token decoding exactly."""
  q, k, v = _inputs(2, 2, t, 8, 4, 64, 80)
  lengths = jnp.asarray([60, 80])
  pos = lengths[:, None] - t + jnp.arange(t)[None, :]
  spec = lambda p: MaskSpec(causal=True, q_positions=p, kv_lengths=lengths)
  together = _attend("cpu_decode", q, k, v, spec(pos))
  for r in (0, t // 2, t - 1):
    alone = _attend("cpu_decode", q[:, r:r + 1], k, v, spec(pos[:, r:r + 1]))
    np.testing.assert_array_equal(together[0][:, r:r + 1], alone[0])
    np.testing.assert_array_equal(together[1][:, :, r:r + 1], alone[1])


def _random_tree_mask(rng, b, t):
  """[B, T, T] ancestor-or-self masks of random trees (node i's parent is a random earlier node)."""
  masks = np.zeros((b, t, t), bool)
  for row in range(b):
    for i in range(t):
      if i:
        masks[row, i] = masks[row, rng.integers(0, i)]
      masks[row, i, i] = True
  return jnp.asarray(masks)


# 1, 2 and 3 words of tree bits per row; at 65, 130 rows per block: two of the kernel's units.
@pytest.mark.parametrize("t", [5, 33, 65])
def test_tree_mask_matches_xla(t):
  """Medusa's tree pass: the prefix plus each node's ancestors and itself, read as a bitmask."""
  rng = np.random.default_rng(t)
  b, n, kh, h, s = 3, 8, 4, 32, 120
  q, k, v = _inputs(7, b, t, n, kh, h, s)
  tree = _random_tree_mask(rng, b, t)
  spec = MaskSpec(kv_lengths=jnp.asarray([t, 90, s]), tree_mask=tree)  # Row 0: no prefix.
  out, lse = _attend("cpu_decode", q, k, v, spec)
  want_out, want_lse = _attend("xla", q, k, v, spec)
  np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=0)
  np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=1e-6)
  # The dense expansion is the mask the LM built before tree_mask existed.
  rel = np.arange(s)[None, :] - (np.asarray(spec.kv_lengths)[:, None] - t)
  tree_np = np.asarray(tree)
  dense = np.where(rel[:, None, :] < 0, True,
                   np.take_along_axis(tree_np, np.clip(rel, 0, t - 1)[:, None, :].repeat(t, 1), 2))
  dense &= np.arange(s)[None, None, :] < np.asarray(spec.kv_lengths)[:, None, None]
  np.testing.assert_array_equal(spec.dense(b, t, s), dense)


def test_tree_node_equals_its_path_decoded_alone():
  """A node sees the prefix and its ancestors: with the same keys laid out along its path, a causal
  one-token call gives the same output (to rounding: the masked slots change the summation)."""
  rng = np.random.default_rng(0)
  b, t, n, kh, h, s = 1, 17, 4, 2, 32, 60
  q, k, v = _inputs(8, b, t, n, kh, h, s)
  tree = _random_tree_mask(rng, b, t)
  prefix = 30
  spec = MaskSpec(kv_lengths=jnp.asarray([prefix + t]), tree_mask=tree)
  out, _ = _attend("cpu_decode", q, k, v, spec)
  node = t - 1
  path = np.flatnonzero(np.asarray(tree)[0, node])  # Ancestors and the node, in slot order.
  slots = np.concatenate([np.arange(prefix), prefix + path])
  k_path = jnp.zeros_like(k).at[:, :len(slots)].set(k[:, slots])
  v_path = jnp.zeros_like(v).at[:, :len(slots)].set(v[:, slots])
  causal = MaskSpec(causal=True, q_positions=jnp.asarray([[len(slots) - 1]]),
                    kv_lengths=jnp.asarray([len(slots)]))
  alone, _ = _attend("cpu_decode", q[:, node:node + 1], k_path, v_path, causal)
  np.testing.assert_allclose(out[:, node:node + 1], alone, atol=1e-6, rtol=0)


def test_tree_mask_needs_lengths_and_its_shape():
  q, k, v = _inputs(9, 2, 3, 4, 2, 32, 40)
  with pytest.raises(ValueError, match="give kv_lengths too"):
    dot_product_attention(q, k, v, MaskSpec(tree_mask=jnp.ones((2, 3, 3), bool)), kv_layout="flat")
  with pytest.raises(ValueError, match=r"tree_mask must be \[batch, T, T\]"):
    dot_product_attention(q, k, v, MaskSpec(kv_lengths=jnp.asarray([5, 9]),
                                            tree_mask=jnp.ones((2, 3, 4), bool)), kv_layout="flat")


def test_gradients_are_xlas():
  q, k, v = _inputs(3, 2, 2, 4, 2, 32, 30)
  spec = MaskSpec(causal=True, q_positions=jnp.asarray([[20, 21], [8, 9]]),
                  kv_lengths=jnp.asarray([22, 10]))
  loss = lambda impl: lambda q, k, v: jnp.sum(_attend(impl, q, k, v, spec)[0] ** 2)
  got = jax.jit(jax.grad(loss("cpu_decode"), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def _uses_kernel(q, k, v, spec, **kw):
  text = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, spec, **kw)).lower(
      q, k, v).as_text()
  return "effjax_cpu_decode_attention" in text


def test_auto_routes_cache_calls_to_the_kernel_and_the_rest_to_xla():
  q, k, v = _inputs(4, 2, 3, 4, 2, 32, 40)
  spec = MaskSpec(causal=True, q_positions=jnp.asarray([[5, 6, 7], [1, 2, 3]]),
                  kv_lengths=jnp.asarray([8, 4]))
  assert _uses_kernel(q, k, v, spec, kv_layout="flat")
  assert not _uses_kernel(q, k, v, spec, kv_layout="flat", impl="xla")  # xla means XLA
  long_q = jnp.concatenate([q] * 13, axis=1)  # A 39-token prefill: the kernel's too
  long_spec = MaskSpec(causal=True, q_positions=jnp.broadcast_to(jnp.arange(39), (2, 39)),
                       kv_lengths=jnp.asarray([39, 39]))
  assert _uses_kernel(long_q, k, v, long_spec, kv_layout="flat")
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  assert _uses_kernel(*bf16, spec, kv_layout="flat")  # A bfloat16 model's cache too
  assert not _uses_kernel(q, *bf16[1:], spec, kv_layout="flat")  # Mixed dtypes: XLA's
  dense = MaskSpec(causal=True, q_positions=spec.q_positions, kv_lengths=spec.kv_lengths,
                   extra_mask=jnp.ones((2, 3, 40), bool))
  assert not _uses_kernel(q, k, v, dense, kv_layout="flat")  # A dense extra mask: XLA's
  tree = MaskSpec(kv_lengths=spec.kv_lengths, tree_mask=jnp.ones((2, 3, 3), bool))
  assert _uses_kernel(q, k, v, tree, kv_layout="flat")  # Medusa's tree mask: the kernel's


def test_explicit_impl_explains_what_it_cannot_serve():
  q, k, v = _inputs(5, 2, 3, 4, 2, 32, 40)
  bskh = lambda x: x.reshape(2, 2, 40, 32).transpose(0, 2, 1, 3)
  with pytest.raises(ValueError, match=r"impl='cpu_decode' cannot serve this call: .*flat"):
    dot_product_attention(q, bskh(k), bskh(v), impl="cpu_decode", strict=True)
  with pytest.raises(ValueError, match="both float32 or both bfloat16"):
    dot_product_attention(q.astype(jnp.bfloat16), k, v, impl="cpu_decode", strict=True,
                          kv_layout="flat")
  # Not strict: falls back to XLA with the same result.
  got = dot_product_attention(q, bskh(k), bskh(v), impl="cpu_decode")
  np.testing.assert_allclose(got, dot_product_attention(q, bskh(k), bskh(v), impl="xla"),
                             atol=1e-6)


def test_falls_back_to_xla_when_the_kernel_is_disabled(monkeypatch):
  q, k, v = _inputs(6, 2, 1, 4, 2, 32, 40)
  spec = MaskSpec(causal=True, q_positions=jnp.asarray([[9], [3]]), kv_lengths=jnp.asarray([10, 4]))
  monkeypatch.setenv("EFFJAX_CPU_DECODE_KERNEL", "0")
  cpu_decode._load.cache_clear()
  try:
    assert "disabled" in cpu_decode.unavailable_reason()
    assert not _uses_kernel(q, k, v, spec, kv_layout="flat")
  finally:
    monkeypatch.delenv("EFFJAX_CPU_DECODE_KERNEL")
    cpu_decode._load.cache_clear()
  assert cpu_decode.unavailable_reason() is None


def test_lm_cached_decoding_matches_xla():
  """The LM's cached prefill + decode steps through the kernel equal attention_impl="xla"."""
  assert_kernel_decoding_matches_xla("attention_impl")


def test_vmap_over_an_extra_batch_axis():
  q, k, v = _inputs(7, 2 * 3, 2, 4, 2, 32, 30)
  q, k, v = q.reshape(3, 2, *q.shape[1:]), k.reshape(3, 4, 30, 32), v.reshape(3, 4, 30, 32)
  spec = MaskSpec(causal=True, q_positions=jnp.asarray([[20, 21], [8, 9]]),
                  kv_lengths=jnp.asarray([22, 10]))
  got = jax.vmap(lambda q, k, v: _attend("cpu_decode", q, k, v, spec)[0])(q, k, v)
  want = jax.vmap(lambda q, k, v: _attend("xla", q, k, v, spec)[0])(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
