"""Packed weights for the few-row matmul (`few_row_matmul.pack`, `lm.pack_weights`).

The layout itself, the kernel's results on it (bit for bit those of the row-major weights, which
is what lets decoding loops use either), gradients, and the LM and its decoding loops with packed
copies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.generate.engine import generate
from effjax.models import lm, registry
from effjax.ops import cpu_ffi, few_row_matmul
from effjax.speculative.decode import speculative_generate
from tests.helpers_lm import prefill_rollback_step_logits

pytestmark = pytest.mark.skipif(few_row_matmul.unavailable_reason() is not None,
                                reason=f"{few_row_matmul.unavailable_reason()}")

# (K, N): several full panels plus a narrow one, exactly one panel, N < one panel, one column.
SHAPES = [(256, 264), (64, 70), (37, 128), (16, 1), (128, 384), (200, 300)]


@pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v))
def test_pack_lays_out_panels_one_after_another(k, n):
  w = np.arange(k * n, dtype=np.float32).reshape(k, n)
  packed = np.asarray(few_row_matmul.pack(jnp.asarray(w)))
  assert packed.shape == (k, n)
  flat, offset = packed.reshape(-1), 0
  for c0 in range(0, n, few_row_matmul.PANEL):
    width = min(few_row_matmul.PANEL, n - c0)
    np.testing.assert_array_equal(flat[offset:offset + k * width].reshape(k, width),
                                  w[:, c0:c0 + width], err_msg=f"panel at column {c0}")
    offset += k * width
  np.testing.assert_array_equal(np.asarray(few_row_matmul.unpack(jnp.asarray(packed))), w)


@pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v))
def test_packed_matmul_is_bit_identical_to_row_major(k, n):
  rng = np.random.default_rng(k * n)
  x = jnp.asarray(rng.standard_normal((40, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  packed = few_row_matmul.pack(w)
  for m in (1, 3, 9, 17, 40):
    want = np.asarray(few_row_matmul.matmul(x[:m], w))
    for stream in (False, True):
      got = np.asarray(few_row_matmul.matmul(x[:m], packed, packed=True, stream=stream))
      np.testing.assert_array_equal(got, want, err_msg=f"{m} rows, stream={stream}")
  if n > few_row_matmul.PANEL:  # The check can fail: the packed array read as row-major differs.
    assert not np.array_equal(np.asarray(few_row_matmul.matmul(x, packed)),
                              np.asarray(few_row_matmul.matmul(x, w)))


def test_packed_gradients_are_the_row_major_ones_packed():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((6, 48)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((48, 200)), jnp.float32)
  loss = lambda x, w, packed: jnp.sum(jnp.sin(few_row_matmul.matmul(x, w, packed=packed)))
  gx, gw = jax.grad(loss, argnums=(0, 1))(x, w, False)
  px, pw = jax.grad(loss, argnums=(0, 1))(x, few_row_matmul.pack(w), True)
  np.testing.assert_array_equal(px, gx)
  np.testing.assert_array_equal(pw, few_row_matmul.pack(gw))


@pytest.mark.parametrize("isa_flags",
                         [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "scalar"])
def test_other_instruction_sets_read_packed_panels_too(isa_flags):
  """The AVX2 and scalar builds split a 128-column panel into 32- and 4-column work units; their
  bfloat16 handler widens the weights to the AVX-512 build's bits."""
  target = "effjax_few_row_matmul_" + "_".join(f.strip("-") for f in isa_flags)
  for symbol, name in (("EffjaxFewRowMatmul", target),
                       ("EffjaxFewRowMatmulBf16", target + "_bf16")):
    reason = cpu_ffi.load(few_row_matmul._SOURCE, (*few_row_matmul._FLAGS, *isa_flags), symbol,
                          name, "test build")
    if reason is not None:
      pytest.skip(reason)
  call = lambda x, w, packed, stream: jax.ffi.ffi_call(
      target, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(
          x, w, transpose_w=False, stream=stream, packed=packed)
  rng = np.random.default_rng(1)
  for k, n in SHAPES:
    x = jnp.asarray(rng.standard_normal((9, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    want = np.asarray(call(x, w, False, False))
    np.testing.assert_allclose(want, np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                               atol=2e-6 * k, rtol=0)
    for stream in (False, True):
      np.testing.assert_array_equal(call(x, few_row_matmul.pack(w), True, stream), want,
                                    err_msg=f"{k}x{n}, stream={stream}")
    x16, w16 = x.astype(jnp.bfloat16), few_row_matmul.pack(w.astype(jnp.bfloat16))
    got16 = jax.ffi.ffi_call(target + "_bf16", jax.ShapeDtypeStruct((9, n), jnp.bfloat16))(
        x16, w16, transpose_w=False, stream=True, packed=True)
    want16 = few_row_matmul.matmul(x16, w16, packed=True, stream=True)
    np.testing.assert_array_equal(np.asarray(got16).view(np.uint16),
                                  np.asarray(want16).view(np.uint16), err_msg=f"{k}x{n} bf16")


def test_packed_weights_must_be_k_by_n():
  x, w = jnp.ones((2, 8)), jnp.ones((5, 8))
  with pytest.raises(ValueError, match="transpose_w must be False"):
    few_row_matmul.matmul(x, w, transpose_w=True, packed=True)


def _untied_tiny(**kw):
  # Every projection but k/v (32 columns) is wider than one 128-column panel, so packing moves its
  # elements: q, o and down 160 columns, gate and up 200, the untied head 264.
  return registry.get("lm/tiny", d_model=160, num_heads=10, num_kv_heads=2, head_dim=16,
                      mlp_dim=200, tie_embeddings=False, matmul_precision="highest", **kw)


def test_pack_weights_covers_every_projection_once():
  cfg = _untied_tiny()
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  packed = lm.pack_weights(params, cfg, force=True)
  assert set(packed) == {"params", lm.PACKED_WEIGHTS}
  copies = jax.tree_util.tree_leaves_with_path(packed[lm.PACKED_WEIGHTS])
  # Per layer q, k and v side by side, o, gate and up side by side, down; the head.
  assert len(copies) == 4 * cfg.num_layers + 1
  names = set()
  for path, copy in copies:
    name = path[-1].key
    module = params["params"]
    for key in path[:-1]:
      module = module[key.key]
    parts = {"wqkv": ("wq", "wk", "wv"), "gate_up": ("gate", "up")}.get(name, (name,))
    want = np.concatenate([module[part].reshape(-1, module[part].shape[-1]) if part == "wo" else
                           module[part].reshape(module[part].shape[0], -1) for part in parts],
                          axis=1)
    np.testing.assert_array_equal(few_row_matmul.unpack(copy), want, err_msg=name)
    names.add(name)
  assert names == {"wqkv", "wo", "gate_up", "down", "lm_head"}
  again = lm.pack_weights(packed, cfg)  # Packed already: nothing to do.
  assert again[lm.PACKED_WEIGHTS] is packed[lm.PACKED_WEIGHTS]
  xla = cfg.replace(matmul_impl="xla")  # The kernel is not used: nothing to pack for.
  assert lm.PACKED_WEIGHTS not in lm.pack_weights(params, xla, force=True)


def test_pack_weights_leaves_cache_resident_models_alone():
  cfg = registry.get("lm/draft")  # 1.7 MB: the L2 caches hold it.
  assert not cfg.weights_stream()
  params = lm.random_params(cfg, 0)
  assert lm.PACKED_WEIGHTS not in lm.pack_weights(params, cfg)
  small = registry.get("lm/small")  # 19 MB: streams past the L2 caches every step.
  shapes = jax.eval_shape(lambda: lm.init_params(small, jax.random.PRNGKey(0)))
  packed = jax.eval_shape(lambda p: lm.pack_weights(p, small), shapes)
  assert lm.PACKED_WEIGHTS in packed


@pytest.mark.parametrize("remat", [False, True])
def test_lm_reads_the_packed_copies_and_gets_the_same_logits(remat):
  cfg = _untied_tiny(remat=remat)
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  packed = lm.pack_weights(params, cfg, force=True)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)
  np.testing.assert_array_equal(prefill_rollback_step_logits(cfg, packed, tokens),
                                prefill_rollback_step_logits(cfg, params, tokens))
  step = lambda v: jax.jit(lambda v, t, c: lm.LM(cfg).apply(v, t, cache=c).logits).lower(
      v, tokens[:, :3], lm.init_cache(cfg, 2, 32)).as_text()
  assert step(packed).count("packed = true") == 4 * cfg.num_layers + 1  # q/k/v, gate/up fused.
  assert "packed = true" not in step(params)


def test_separately_packed_projections_still_serve():
  """Variables packed one projection per copy (before q/k/v and gate/up were fused) still decode,
  through one call per projection, to the same logits."""
  cfg = _untied_tiny()
  params = lm.init_params(cfg, jax.random.PRNGKey(0))

  def separately(tree):
    return {name: separately(value) if isinstance(value, dict)
            else few_row_matmul.pack(lm._as_matrix(name, value))
            for name, value in tree.items() if isinstance(value, dict) or name in lm._PROJECTIONS}
  old = {**params, lm.PACKED_WEIGHTS: separately(params["params"])}
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)
  np.testing.assert_array_equal(prefill_rollback_step_logits(cfg, old, tokens),
                                prefill_rollback_step_logits(cfg, params, tokens))
  text = jax.jit(lambda v, t, c: lm.LM(cfg).apply(v, t, cache=c).logits).lower(
      old, tokens[:, :3], lm.init_cache(cfg, 2, 32)).as_text()
  assert text.count("packed = true") == 7 * cfg.num_layers + 1


def test_decoding_loops_take_packed_variables():
  """Plain and speculative greedy decoding give the same tokens with packed variables."""
  t_cfg = registry.get("lm/tiny", matmul_precision="highest")
  d_cfg = t_cfg.replace(num_layers=1)
  target = lm.init_params(t_cfg, jax.random.PRNGKey(0))
  draft = lm.init_params(d_cfg, jax.random.PRNGKey(1))
  prompts = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 256))
  want = np.asarray(generate(target, t_cfg, prompts, max_new_tokens=16).tokens)
  packed_target = lm.pack_weights(target, t_cfg, force=True)
  got = generate(packed_target, t_cfg, prompts, max_new_tokens=16).tokens
  np.testing.assert_array_equal(got, want)
  packed_draft = lm.pack_weights(draft, d_cfg, force=True)
  spec = speculative_generate(packed_target, t_cfg, packed_draft, d_cfg, prompts, gamma=3,
                              max_new_tokens=16)
  np.testing.assert_array_equal(spec.tokens, want)
