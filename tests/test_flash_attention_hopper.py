"""The Hopper (Mosaic GPU) flash-attention forward: scope and lowering on CPU, parity on a GPU.

The kernel's warpgroup/TMA primitives have no interpreter, so on CPU the tests check what can be
checked without the chip: which calls it accepts and why it refuses the rest, that the bridge sends
a call to it only on sm_90, and that forward and backward (Triton dq/dkv fed this forward's output
and LSE) lower to Mosaic GPU / Triton custom calls for CUDA. The numerics run compiled on a Hopper
GPU (`gpu_only`, skipped elsewhere and on other GPUs), against float32 `jax.nn` attention.
"""

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from effjax.attention import pallas_bridge
from effjax.attention.mask import MaskSpec
from kernels_pallas import flash_attention_hopper as hopper_lib
from kernels_pallas.flash_attention_hopper import HopperBlockSizes
from kernels_pallas.reference import attention_reference
from tests.test_flash_attention import TOL, _assert_close, _cotangents, _inputs, _jax_nn, _vjp

# (dtype, causal, (num_heads, num_kv_heads), (T, S), head_dim, check gradients)
HOPPER_CASES = [
    ("bfloat16", True, (4, 2), (256, 256), 64, True),
    ("bfloat16", False, (4, 1), (128, 384), 64, True),  # S not a multiple of block_kv 256.
    ("bfloat16", True, (4, 4), (128, 512), 128, False),  # Causal with T < S.
    ("float16", False, (16, 2), (512, 512), 128, False),
]


def _sds(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _reason(q_shape, kv_shape, dtype=jnp.bfloat16, **kw):
  args = dict(causal=False, has_mask_arrays=False, local_window=None, softcap=None,
              interpret=False)
  args.update(kw)
  return hopper_lib.unsupported_reason(_sds(q_shape, dtype), _sds(kv_shape, dtype), **args)


def test_scope_accepts_the_benchmark_shapes():
  for h in (64, 128):
    for causal in (False, True):
      assert _reason((4, 4096, 16, h), (4, 4096, 2, h), causal=causal) is None
  assert _reason((1, 128, 4, 64), (1, 320, 4, 64), jnp.float16) is None


@pytest.mark.parametrize("kw, q_shape, kv_shape, dtype, words", [
    (dict(), (1, 256, 4, 64), (1, 256, 4, 64), jnp.float32, "all float16 or all bfloat16"),
    (dict(), (1, 256, 4, 96), (1, 256, 4, 96), jnp.bfloat16, "head_dim=96"),
    (dict(), (1, 197, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "T=197"),
    (dict(), (1, 256, 4, 64), (1, 200, 4, 64), jnp.bfloat16, "S=200"),
    (dict(causal=True), (1, 512, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "T=512 > S=256"),
    (dict(has_mask_arrays=True), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "segment ids"),
    (dict(softcap=30.0), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "softcap=30.0"),
    (dict(local_window=64), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "local_window=64"),
    (dict(interpret=True), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "interpret"),
    (dict(scale=0.0), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16, "scale=0.0"),
    (dict(v=_sds((1, 256, 4, 64), jnp.float32)), (1, 256, 4, 64), (1, 256, 4, 64), jnp.bfloat16,
     "bfloat16/bfloat16/float32"),
])
def test_scope_refusals_say_why(kw, q_shape, kv_shape, dtype, words):
  assert words in _reason(q_shape, kv_shape, dtype, **kw)


def test_refuses_causal_on_the_cuda_versions_that_miscompile_it(monkeypatch):
  monkeypatch.setattr(hopper_lib, "_cuda_runtime_version", lambda: 12080)
  assert "miscompiles" in _reason((1, 256, 4, 64), (1, 256, 4, 64), causal=True)
  assert _reason((1, 256, 4, 64), (1, 256, 4, 64), causal=False) is None
  monkeypatch.setattr(hopper_lib, "_cuda_runtime_version", lambda: 12091)
  assert _reason((1, 256, 4, 64), (1, 256, 4, 64), causal=True) is None


def test_entry_point_raises_a_clear_error_outside_its_scope():
  q = jnp.zeros((1, 197, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="T=197.*flash_attention_gpu"):
    hopper_lib.flash_attention(q, kv, kv)


def test_block_sizes_validate_and_fit():
  with pytest.raises(ValueError, match="multiple of 64"):
    HopperBlockSizes(block_kv=96)
  with pytest.raises(ValueError, match=">= 2"):
    HopperBlockSizes(max_concurrent_steps=1)
  assert hopper_lib._fitted(HopperBlockSizes(block_kv=256), 384).block_kv == 128
  assert hopper_lib._fitted(HopperBlockSizes(block_kv=256), 320).block_kv == 64
  with pytest.raises(ValueError, match="head_dim"):
    hopper_lib.default_block_sizes(256)


def test_bridge_uses_the_kernel_only_on_hopper_in_scope(monkeypatch):
  q = _sds((2, 256, 8, 128))
  kv = _sds((2, 256, 2, 128))
  causal = MaskSpec(causal=True)
  monkeypatch.setattr(hopper_lib, "is_hopper", lambda: False)
  use = lambda spec=causal, softcap=None, interpret=False, v=kv: pallas_bridge._use_hopper(
      q, kv, v, spec, 0.125, softcap, interpret)
  assert not use()
  monkeypatch.setattr(hopper_lib, "is_hopper", lambda: True)
  assert use()
  assert not use(spec=MaskSpec(causal=True, kv_lengths=jnp.full((2,), 200)))
  assert not use(spec=MaskSpec(causal=True, q_segment_ids=jnp.zeros((2, 256), jnp.int32),
                               kv_segment_ids=jnp.zeros((2, 256), jnp.int32)))
  assert not use(softcap=30.0)
  assert not use(interpret=True)
  assert not use(v=_sds((2, 256, 2, 128), jnp.float32))
  monkeypatch.setenv("EFFJAX_PALLAS_HOPPER", "0")
  assert not use()


@pytest.mark.parametrize("h", [64, 128])
def test_forward_and_backward_lower_for_cuda(h):
  """Mosaic GPU custom call forward; the gradient adds the Triton dq and dkv kernels."""
  args = (_sds((2, 256, 8, h)), _sds((2, 256, 2, h)), _sds((2, 256, 2, h)))

  def loss(q, k, v):
    out, lse = hopper_lib.flash_attention(q, k, v, causal=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  fwd = jax.jit(lambda q, k, v: hopper_lib.flash_attention(q, k, v, causal=True))
  fwd_text = fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "@mosaic_gpu" in fwd_text and "__gpu$xla.gpu.triton" not in fwd_text
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  grad_text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert grad_text.count("@mosaic_gpu") >= 1
  assert grad_text.count("effjax_flash_dq") >= 1 and grad_text.count("effjax_flash_dkv") >= 1


def _case_id(case):
  dtype, causal, (n, k), (t, s), h, grads = case
  return f"{dtype}-{'causal' if causal else 'full'}-{n}x{k}-{t}x{s}-h{h}{'-grads' if grads else ''}"


@pytest.mark.gpu_only
@pytest.mark.parametrize("case", HOPPER_CASES, ids=_case_id)
def test_compiled_parity_on_hopper(case):
  if not hopper_lib.is_hopper():
    pytest.skip("needs an sm_90 GPU (H100/H200)")
  dtype, causal, (n, kh), (t, s), h, check_grads = case
  batch = 2
  q, k, v = _inputs(0, batch, t, s, n, kh, h, jnp.dtype(dtype))
  attend = lambda q, k, v: hopper_lib.flash_attention(q, k, v, causal=causal)
  tol = TOL["bfloat16"]
  if not check_grads:
    out, lse = jax.jit(attend)(q, k, v)
    want_out, want_lse = jax.jit(_jax_nn(causal, None, None))(q, k, v)
  else:
    cot = _cotangents(0, (batch, t, n, h), (batch, n, t))
    out, lse, grads = _vjp(attend, q, k, v, cot)
    do, dlse = cot
    want_out, want_lse, nn_grads = _vjp(_jax_nn(causal, None, None), q, k, v,
                                        (do, jnp.zeros_like(dlse)))
    upcast = lambda *a: attention_reference(*(x.astype(jnp.float32) for x in a), causal=causal)
    _, _, lse_grads = _vjp(upcast, q, k, v, (jnp.zeros_like(do), dlse))
    for name, got, a, b in zip(("dq", "dk", "dv"), grads, nn_grads, lse_grads):
      assert got.dtype == q.dtype
      _assert_close(name, got, a.astype(jnp.float32) + b.astype(jnp.float32), tol["grad"],
                    relative=True)
  assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (batch, n, t)
  _assert_close("out", out, want_out, tol["out"])
  _assert_close("lse", lse, want_lse, tol["lse"])


@pytest.mark.gpu_only
def test_dispatch_routes_to_the_hopper_kernel():
  if not hopper_lib.is_hopper():
    pytest.skip("needs an sm_90 GPU (H100/H200)")
  from effjax.attention import dot_product_attention
  q, k, v = _inputs(1, 1, 256, 256, 8, 2, 128, jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, MaskSpec(causal=True),
                                                     impl="pallas", strict=True))
  assert "@mosaic_gpu" in fn.lower(q, k, v).as_text()
  want = jax.jit(_jax_nn(True, None, None))(q, k, v)[0]
  _assert_close("out", fn(q, k, v), want, TOL["bfloat16"]["out"])


def test_lm_training_mask_leaves_default_positions_out(monkeypatch):
  """A full forward given no positions masks without position arrays (the Hopper kernel's scope);
  explicit positions still reach the mask."""
  from effjax.models import lm, registry
  seen = []

  def record(q, k, v, spec, scale, softcap, interpret):
    seen.append(spec)
    return False
  monkeypatch.setattr(pallas_bridge, "_use_hopper", record)
  monkeypatch.setenv("EFFJAX_PALLAS_INTERPRET", "1")
  cfg = registry.get("lm/tiny", num_layers=1, attention_impl="pallas")
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.zeros((1, 16), jnp.int32)
  default = lm.LM(cfg).apply(params, tokens).logits
  assert seen and seen[-1].q_positions is None and seen[-1].kv_positions is None
  explicit = lm.LM(cfg).apply(params, tokens, positions=jnp.arange(16)[None]).logits
  assert seen[-1].q_positions is not None
  _assert_close("logits", default, explicit, 1e-5)


@pytest.mark.gpu_only
def test_lm_bfloat16_training_runs_on_the_hopper_kernel():
  """LM training steps in bfloat16 through impl="pallas" (Hopper forward, Triton backward) track
  impl="xla", and the Mosaic GPU kernel is in the compiled step."""
  if not hopper_lib.is_hopper():
    pytest.skip("needs an sm_90 GPU (H100/H200)")
  from effjax.models import lm, registry
  from tests.test_attention_dispatch import _train_losses
  base = registry.get("lm/tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                      dtype="bfloat16")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 129), 0, 256)
  losses_xla, _ = _train_losses(base.replace(attention_impl="xla"), tokens)
  losses_pallas, params = _train_losses(base.replace(attention_impl="pallas"), tokens)
  np.testing.assert_allclose(losses_pallas, losses_xla, rtol=2e-2)
  model = lm.LM(base.replace(attention_impl="pallas"))
  text = jax.jit(lambda p, t: model.apply(p, t).logits).lower(params, tokens[:, :-1]).as_text()
  assert "@mosaic_gpu" in text
