"""The attention dispatch point: impl routing, fallbacks, the chunked path, and the LM on Pallas.

Everything runs on CPU; impl="pallas" uses the kernels in interpret mode (the CPU default).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.attention import MaskSpec, dispatch, dot_product_attention, resolve_impl
from effjax.attention import pallas_bridge
from effjax.attention import xla as xla_impl
from effjax.models import lm, registry
from kernels_pallas import flash_attention_gpu, flash_attention_tpu
from kernels_pallas.reference import attention_reference


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
  """Each test sees one-time fallback warnings anew."""
  monkeypatch.setattr(dispatch, "_warned", set())
  monkeypatch.delenv("EFFJAX_PALLAS_INTERPRET", raising=False)
  monkeypatch.delenv("EFFJAX_PALLAS_STYLE", raising=False)


def _qkv(seed, b, t, s, n, k, h, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return make(b, t, n, h), make(b, s, k, h), make(b, s, k, h)


def _close(got, want, tol=2e-5, relative=False):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got))
  err = np.max(np.abs(got - want)) / (max(np.max(np.abs(want)), 1e-6) if relative else 1.0)
  assert err <= tol, f"max {'relative ' if relative else ''}error {err:.3g} > {tol}"


def _spy(monkeypatch, module, name):
  """Counts calls of module.name while still running it."""
  calls = []
  original = getattr(module, name)

  def wrapper(*args, **kwargs):
    calls.append(name)
    return original(*args, **kwargs)
  monkeypatch.setattr(module, name, wrapper)
  return calls


def test_resolve_impl_by_backend_length_and_env(monkeypatch):
  assert resolve_impl("auto", 128) == "xla"
  assert resolve_impl("auto", dispatch.AUTO_CHUNK_THRESHOLD) == "chunked"
  assert resolve_impl("cudnn", 8) == "cudnn"
  monkeypatch.setenv("EFFJAX_PALLAS_INTERPRET", "1")
  assert resolve_impl("auto", 128) == "pallas"
  with pytest.raises(ValueError, match="unknown attention impl"):
    resolve_impl("flash", 8)


def test_pallas_training_spec_matches_xla_and_picks_style(monkeypatch):
  """Packed training batch (positions restart per segment): GPU style by default, TPU on request."""
  q, k, v = _qkv(0, 2, 48, 48, 4, 2, 32)
  seg = jnp.asarray(np.repeat([[1] * 30 + [2] * 18], 2, 0))
  pos = jnp.asarray(np.repeat([list(range(30)) + list(range(18))], 2, 0))
  spec = MaskSpec(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                  causal=True)
  want = dot_product_attention(q, k, v, spec, impl="xla", precision="highest", return_lse=True)
  gpu_calls = _spy(monkeypatch, flash_attention_gpu, "flash_attention")
  got = dot_product_attention(q, k, v, spec, impl="pallas", strict=True, return_lse=True)
  assert gpu_calls == ["flash_attention"]
  _close(got[0], want[0])
  _close(got[1], want[1])
  monkeypatch.setenv("EFFJAX_PALLAS_STYLE", "tpu")
  tpu_calls = _spy(monkeypatch, flash_attention_tpu, "flash_attention")
  got = dot_product_attention(q, k, v, spec, impl="pallas", strict=True)
  assert tpu_calls == ["flash_attention"]
  _close(got, want[0])


def test_pallas_decode_spec_uses_decode_kernel(monkeypatch):
  """A cached step (q_positions + kv_lengths) goes to the split-K decode kernel."""
  from kernels_pallas import decode_attention
  q, k, v = _qkv(1, 2, 3, 96, 4, 1, 32)
  lengths = jnp.asarray([10, 96])
  spec = MaskSpec(q_positions=lengths[:, None] - 3 + jnp.arange(3)[None], kv_lengths=lengths,
                  causal=True)
  calls = _spy(monkeypatch, decode_attention, "decode_attention")
  got = dot_product_attention(q, k, v, spec, impl="pallas", strict=True)
  assert calls == ["decode_attention"]
  _close(got, dot_product_attention(q, k, v, spec, impl="xla", precision="highest"))


def test_unsupported_calls_fall_back_once_or_raise_in_strict_mode(caplog):
  q, k, v = _qkv(2, 1, 4, 20, 2, 2, 16)
  tree = jnp.asarray(np.tril(np.ones((4, 20), bool), k=16))[None]
  spec = MaskSpec(kv_lengths=jnp.asarray([20]), extra_mask=tree)
  want = dot_product_attention(q, k, v, spec, impl="xla")
  with caplog.at_level(logging.WARNING):
    out1 = dot_product_attention(q, k, v, spec, impl="pallas")
    out2 = dot_product_attention(q, k, v, spec, impl="pallas")
  _close(out1, want)
  _close(out2, want)
  warnings = [r.getMessage() for r in caplog.records if "falling back from pallas" in r.getMessage()]
  assert len(warnings) == 1 and "extra_mask" in warnings[0]
  with pytest.raises(ValueError, match="impl='pallas' cannot serve this call: .*extra_mask"):
    dot_product_attention(q, k, v, spec, impl="pallas", strict=True)
  # Compiled Pallas on CPU is impossible: interpret=False must fall back, or raise when strict.
  with pytest.raises(ValueError, match="need a GPU or TPU"):
    dot_product_attention(q, k, v, MaskSpec(), impl="pallas", interpret=False, strict=True)
  _close(dot_product_attention(q, k, v, MaskSpec(), impl="pallas", interpret=False),
         dot_product_attention(q, k, v, MaskSpec(), impl="xla"))
  assert pallas_bridge.unsupported_reason(q, k, MaskSpec(), 0.25, None, True) is None


CHUNKED_CASES = {
    "causal-gqa-odd": dict(b=2, t=37, s=197, n=4, k=2, spec=lambda b, t, s: MaskSpec(causal=True)),
    "segments-lengths-softcap": dict(
        b=2, t=64, s=64, n=2, k=1, softcap=4.0,
        spec=lambda b, t, s: MaskSpec(
            q_segment_ids=jnp.asarray((np.arange(t) >= 23)[None].repeat(b, 0), jnp.int32),
            kv_segment_ids=jnp.asarray((np.arange(s) >= 23)[None].repeat(b, 0), jnp.int32),
            kv_lengths=jnp.asarray([64, 40]), causal=True, local_window=17)),
    "fully-masked-row": dict(b=2, t=20, s=50, n=2, k=2,
                             spec=lambda b, t, s: MaskSpec(kv_lengths=jnp.asarray([0, 50]))),
}


@pytest.mark.parametrize("name", sorted(CHUNKED_CASES))
def test_chunked_matches_reference(name):
  """Output, LSE and gradients (through both) of the chunked path equal the dense reference."""
  case = CHUNKED_CASES[name]
  b, t, s, n, kh, h = case["b"], case["t"], case["s"], case["n"], case["k"], 32
  q, k, v = _qkv(3, b, t, s, n, kh, h)
  spec = case["spec"](b, t, s)
  softcap = case.get("softcap")
  chunked = lambda q, k, v: xla_impl.chunked_attention(
      q, k, v, spec, scale=h ** -0.5, softcap=softcap, kv_chunk=32, q_chunk=16,
      precision="highest")
  ref = lambda q, k, v: attention_reference(
      q, k, v, q_positions=spec.q_positions, kv_lengths=spec.kv_lengths,
      q_segment_ids=spec.q_segment_ids, kv_segment_ids=spec.kv_segment_ids, causal=spec.causal,
      local_window=spec.local_window, softcap=softcap)
  rng = np.random.default_rng(4)
  cot = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32),
         jnp.asarray(rng.standard_normal((b, n, t)), jnp.float32) * 0.1)
  (out, lse), pull = jax.vjp(chunked, q, k, v)
  (want_out, want_lse), want_pull = jax.vjp(ref, q, k, v)
  _close(out, want_out)
  _close(lse, want_lse)
  for got, want in zip(pull(cot), want_pull(cot)):
    _close(got, want, relative=True)


def _flat(x):
  """[B, S, K, H] -> the KV cache's heads-major [B*K, S, H]."""
  b, s, k, h = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * k, s, h)


@pytest.mark.parametrize("name", sorted(CHUNKED_CASES))
def test_flat_kv_layout_matches_bskh_for_every_impl(name):
  """The KV cache's [B*K, S, H] layout gives what [B, S, K, H] gives, output, LSE and gradients."""
  case = CHUNKED_CASES[name]
  b, t, s, n, kh, h = case["b"], case["t"], case["s"], case["n"], case["k"], 32
  q, k, v = _qkv(7, b, t, s, n, kh, h)
  spec, softcap = case["spec"](b, t, s), case.get("softcap")
  for impl in ("xla", "chunked"):
    call = lambda q, k, v, layout: dot_product_attention(
        q, k, v, spec, softcap=softcap, impl=impl, kv_chunk=32, precision="highest",
        return_lse=True, kv_layout=layout)
    flat = jax.jit(lambda q, k, v: call(q, _flat(k), _flat(v), "flat"))
    want = call(q, k, v, "bskh")
    got = flat(q, k, v)
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)
    cot = jnp.ones_like(want[0])
    pull = jax.grad(lambda q, k, v: jnp.sum(flat(q, k, v)[0] * cot), argnums=(0, 1, 2))
    want_pull = jax.grad(lambda q, k, v: jnp.sum(call(q, k, v, "bskh")[0] * cot),
                         argnums=(0, 1, 2))
    for g, w in zip(pull(q, k, v), want_pull(q, k, v)):
      _close(g, w, 1e-5, relative=True)


@pytest.mark.parametrize("t", [2, 20])
def test_pallas_reads_the_flat_cache_in_place_for_decode(t, monkeypatch):
  """Decode-sized calls hand the [B*K, S, H] cache to the split-K kernel untransposed; longer
  (prefill) calls go to the flash kernel in [B, S, K, H]. Both match XLA."""
  from kernels_pallas import decode_attention as decode_lib
  seen = []
  real = decode_lib.decode_attention
  monkeypatch.setattr(decode_lib, "decode_attention",
                      lambda q, k, v, **kw: seen.append(k.ndim) or real(q, k, v, **kw))
  b, s, n, kh, h = 2, 40, 4, 2, 16
  q, k, v = _qkv(11, b, t, s, n, kh, h)
  lengths = jnp.asarray([t + 5, s])
  spec = MaskSpec(causal=True, q_positions=lengths[:, None] - t + jnp.arange(t)[None, :],
                  kv_lengths=lengths)
  call = lambda impl: dot_product_attention(q, _flat(k), _flat(v), spec, impl=impl, strict=True,
                                            interpret=True, precision="highest",
                                            return_lse=True, kv_layout="flat")
  got, want = call("pallas"), call("xla")
  _close(got[0], want[0], 1e-5)
  _close(got[1], want[1], 1e-5)
  assert seen == ([3] if t <= 16 else [])


def test_flat_kv_layout_bad_input_says_what_is_wrong():
  q, k, v = _qkv(8, 2, 3, 10, 4, 2, 16)
  with pytest.raises(ValueError, match="unknown kv_layout 'bksh'"):
    dot_product_attention(q, k, v, kv_layout="bksh")
  with pytest.raises(ValueError, match=r"kv_layout='flat' expects \[batch \* kv_heads"):
    dot_product_attention(q, k, v, kv_layout="flat")  # Still [B, S, K, H].
  with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
    dot_product_attention(q[:, :, :3], _flat(k), _flat(v), kv_layout="flat")


def test_chunked_with_extra_mask_matches_xla():
  q, k, v = _qkv(5, 1, 6, 70, 2, 2, 16)
  extra = jnp.asarray(np.random.default_rng(5).random((1, 6, 70)) < 0.7)
  spec = MaskSpec(extra_mask=extra, kv_lengths=jnp.asarray([66]))
  got = xla_impl.chunked_attention(q, k, v, spec, scale=0.25, kv_chunk=32, q_chunk=4)
  want = xla_impl.xla_attention(q, k, v, spec, scale=0.25)
  _close(got[0], want[0], 1e-5)
  _close(got[1], want[1], 1e-5)


def test_tree_mask_is_its_dense_expansion_on_the_xla_paths():
  """MaskSpec.tree_mask (the LM's Medusa pass) equals the dense extra_mask it stands for, on the
  plain and the chunked path (whose query tiles take rows of the tree mask)."""
  b, t, s = 2, 6, 70
  q, k, v = _qkv(6, b, t, s, 2, 2, 16)
  parents = [[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, 0, 4]]
  tree = np.zeros((b, t, t), bool)
  for row, par in enumerate(parents):
    for i, p in enumerate(par):
      tree[row, i] = tree[row, p] if p >= 0 else False
      tree[row, i, i] = True
  lengths = np.asarray([40, 70])
  rel = np.arange(s)[None, :] - (lengths[:, None] - t)
  dense = np.where(rel[:, None, :] < 0, True,
                   np.take_along_axis(tree, np.clip(rel, 0, t - 1)[:, None, :].repeat(t, 1), 2))
  as_tree = MaskSpec(kv_lengths=jnp.asarray(lengths), tree_mask=jnp.asarray(tree))
  as_dense = MaskSpec(kv_lengths=jnp.asarray(lengths), extra_mask=jnp.asarray(dense))
  want = xla_impl.xla_attention(q, k, v, as_dense, scale=0.25)
  for got in (xla_impl.xla_attention(q, k, v, as_tree, scale=0.25),
              xla_impl.chunked_attention(q, k, v, as_tree, scale=0.25, kv_chunk=32, q_chunk=4)):
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)


def test_chunked_memory_is_far_below_xla():
  """Compiled temporaries of causal forward+backward at 8k tokens (compile only, never run)."""
  shape = jax.ShapeDtypeStruct((1, 8192, 4, 64), jnp.float32)

  def temp_bytes(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v)[0] ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  spec = MaskSpec(causal=True)
  chunked = temp_bytes(lambda q, k, v: xla_impl.chunked_attention(q, k, v, spec, scale=0.125))
  plain = temp_bytes(lambda q, k, v: xla_impl.xla_attention(q, k, v, spec, scale=0.125))
  assert plain > 4e9  # [4, 8192, 8192] float32 logits and their gradients
  assert chunked < 0.3e9, f"chunked path keeps {chunked / 1e9:.2f} GB of temporaries"


def _train_losses(config, tokens, steps=3):
  model = lm.LM(config)
  params = lm.init_params(config, jax.random.PRNGKey(0))
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply(p, tokens[:, :-1]).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses, params


@pytest.mark.slow
def test_lm_trains_and_decodes_identically_on_pallas(monkeypatch):
  """LMConfig(attention_impl="pallas"): same losses and cached decode as XLA.

  Interpret mode on CPU; compiled where a GPU/TPU runs the suite (`benchmarks/gpu_session.sh`).
  """
  if jax.default_backend() == "cpu":
    monkeypatch.setenv("EFFJAX_PALLAS_INTERPRET", "1")
  base = registry.get("lm/tiny", matmul_precision="highest", num_layers=1)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 41), 0, 256)
  losses_xla, params = _train_losses(base.replace(attention_impl="xla"), tokens)
  losses_pallas, _ = _train_losses(base.replace(attention_impl="pallas"), tokens)
  np.testing.assert_allclose(losses_pallas, losses_xla, rtol=1e-5)
  assert losses_xla[-1] < losses_xla[0]

  def decode(impl):
    cfg = base.replace(attention_impl=impl)
    model = lm.LM(cfg)
    cache = lm.init_cache(cfg, 2, 64).with_lengths(jnp.zeros((2,), jnp.int32))
    prefill = model.apply(params, tokens[:, :20], cache=cache)
    # Row 1 rolls back 5 tokens (a rejected draft), then both rows take a 2-token step.
    cache = prefill.cache.with_lengths(jnp.asarray([20, 15]))
    step = model.apply(params, tokens[:, 20:22], cache=cache)
    return prefill.logits, step.logits

  for got, want in zip(decode("pallas"), decode("xla")):
    _close(got, want, 1e-4)


def test_cudnn_refuses_masks_its_call_would_drop(monkeypatch):
  """impl="cudnn" passes only kv_lengths and the window to jax.nn: segment ids or key positions
  must make it refuse (strict) rather than be silently dropped. Checked before any GPU is needed."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  seg = jnp.zeros((1, 8), jnp.int32)
  for spec in (MaskSpec(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
               MaskSpec(causal=True, kv_positions=jnp.arange(8)[None])):
    with pytest.raises(ValueError, match="impl='cudnn' cannot serve.*segment ids"):
      dot_product_attention(q, q, q, spec, impl="cudnn", strict=True)
