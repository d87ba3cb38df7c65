"""Pallas flash-attention kernels (kernels_pallas/) against jax.nn.dot_product_attention and the
`jnp` reference, in interpret mode on CPU.

The parity grid is a covering design, not a full product: every pair of values of (dtype, causal,
head layout, segment ids, sequence lengths, head_dim) appears in some case. Block sizes are small
and differ between forward and backward, so each case runs several blocks, partial blocks (37, 197)
and segment boundaries that fall inside blocks. Compiled (non-interpret) variants run only on a
matching accelerator (gpu_only / tpu_only).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas import decode_attention as decode_lib
from kernels_pallas import flash_attention_gpu as gpu_lib
from kernels_pallas import flash_attention_tpu as tpu_lib
from kernels_pallas.block_sizes import BlockSizes, DecodeBlockSizes, default_block_sizes
from kernels_pallas.reference import attention_reference

TOL = {"float32": dict(out=2e-5, lse=2e-5, grad=2e-5),
       "bfloat16": dict(out=3e-2, lse=3e-2, grad=3e-2)}
GPU_BLOCKS = BlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=64)
TPU_BLOCKS = BlockSizes(block_q=32, block_k=64, block_q_bwd=16, block_k_bwd=128)

# (dtype, causal, (num_heads, num_kv_heads), segments, (Sq, Sk), head_dim)
GPU_CASES = [
    ("float32", True, (4, 4), False, (128, 128), 64),
    ("float32", True, (4, 2), True, (37, 197), 128),
    ("float32", False, (4, 1), True, (197, 197), 64),
    ("float32", False, (4, 2), False, (128, 37), 128),
    ("bfloat16", True, (4, 1), False, (197, 197), 128),
    ("bfloat16", False, (2, 2), True, (128, 128), 64),
    ("bfloat16", True, (4, 2), True, (37, 197), 64),
    ("bfloat16", False, (4, 2), False, (37, 128), 128),
]
TPU_CASES = [
    ("float32", True, (4, 2), True, (37, 197), 64),
    ("bfloat16", False, (4, 1), False, (128, 128), 128),
    ("float32", False, (2, 2), True, (197, 197), 128),
    ("bfloat16", True, (4, 4), True, (128, 197), 64),
]


def _case_id(case):
  dtype, causal, (n, k), seg, (t, s), h = case
  heads = "mha" if n == k else ("mqa" if k == 1 else "gqa")
  return f"{dtype}-{'causal' if causal else 'full'}-{heads}-{'seg' if seg else 'noseg'}-{t}x{s}-h{h}"


def _segments(batch, length):
  """Ids that change at positions 23, 71, 150 (+5 per row): never on a block boundary."""
  pos = np.arange(length)[None, :]
  shift = 5 * np.arange(batch)[:, None]
  return jnp.asarray((pos >= 23 + shift) + (pos >= 71 + shift) + (pos >= 150 + shift), jnp.int32)


def _inputs(seed, batch, t, s, n, k, h, dtype, scale=1.0):
  rng = np.random.default_rng(seed)
  make = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)
  return make(batch, t, n, h), make(batch, s, k, h), make(batch, s, k, h)


def _cotangents(seed, out_shape, lse_shape):
  rng = np.random.default_rng(seed + 1)
  return (jnp.asarray(rng.standard_normal(out_shape), jnp.float32),
          jnp.asarray(0.1 * rng.standard_normal(lse_shape), jnp.float32))


def _vjp(fn, q, k, v, cot):
  # Under jit the references run as one program, not op by op (which on a GPU compiles every op).
  (out, lse), pullback = jax.vjp(jax.jit(fn), q, k, v)
  do, dlse = cot
  return out, lse, pullback((do.astype(out.dtype), dlse))


def _jax_nn(causal, q_seg, kv_seg):
  """jax.nn.dot_product_attention (XLA) in float32 as (out [B,T,N,H], lse [B,N,T])."""
  mask = None if q_seg is None else (q_seg[:, None, :, None] == kv_seg[:, None, None, :])

  def fn(q, k, v):
    with jax.default_matmul_precision("highest"):
      out, lse = jax.nn.dot_product_attention(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask,
          is_causal=causal, implementation="xla", return_residual=True)
    return out, lse.transpose(0, 2, 1)
  return fn


def _assert_close(name, got, want, tol, relative=False):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  err = np.max(np.abs(got - want))
  if relative:
    err /= max(np.max(np.abs(want)), 1e-6)
  assert err <= tol, f"{name}: max {'relative ' if relative else ''}error {err:.3g} > {tol}"


class _KernelTests:
  """Shared checks; subclasses choose the kernel style, blocks and interpret mode."""

  LIB = gpu_lib
  BLOCKS = GPU_BLOCKS
  INTERPRET = False

  def attend(self, **kw):
    return lambda q, k, v: self.LIB.flash_attention(q, k, v, block_sizes=self.BLOCKS,
                                                    interpret=self.INTERPRET, **kw)

  def check_parity(self, case):
    dtype, causal, (n, kh), seg, (t, s), h = case
    batch = 2
    q, k, v = _inputs(0, batch, t, s, n, kh, h, jnp.dtype(dtype))
    q_seg = _segments(batch, t) if seg else None
    kv_seg = _segments(batch, s) if seg else None
    cot = _cotangents(0, (batch, t, n, h), (batch, n, t))
    kw = dict(causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, lse, grads = _vjp(self.attend(**kw), q, k, v, cot)
    # jax.nn's LSE residual carries no gradient: the LSE cotangent's share comes from the reference.
    do, dlse = cot
    want_out, want_lse, nn_grads = _vjp(_jax_nn(causal, q_seg, kv_seg), q, k, v,
                                        (do, jnp.zeros_like(dlse)))
    upcast = lambda *a: attention_reference(*(x.astype(jnp.float32) for x in a), **kw)
    _, _, lse_grads = _vjp(upcast, q, k, v, (jnp.zeros_like(do), dlse))
    want_grads = [a.astype(jnp.float32) + b.astype(jnp.float32)
                  for a, b in zip(nn_grads, lse_grads)]
    tol = TOL[dtype]
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (batch, n, t)
    _assert_close("out", out, want_out, tol["out"])
    _assert_close("lse", lse, want_lse, tol["lse"])
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
      assert got.dtype == q.dtype
      _assert_close(name, got, want, tol["grad"], relative=True)

  def test_window_softcap_positions_lengths(self):
    """Packed positions restart per segment; window, soft-cap and ragged key lengths together."""
    batch, t, s, n, kh, h = 2, 45, 45, 4, 2, 64
    q, k, v = _inputs(1, batch, t, s, n, kh, h, jnp.float32, scale=2.0)
    seg = _segments(batch, t)
    starts = jnp.asarray([[np.flatnonzero(np.asarray(row) == x)[0] for x in np.asarray(row)]
                          for row in seg])
    pos = jnp.arange(t)[None, :] - starts  # positions restart at each segment
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              kv_lengths=jnp.asarray([45, 30]), causal=True, local_window=9, softcap=3.0)
    cot = _cotangents(1, (batch, t, n, h), (batch, n, t))
    out, lse, grads = _vjp(self.attend(**kw), q, k, v, cot)
    want_out, want_lse, want_grads = _vjp(lambda *a: attention_reference(*a, **kw), q, k, v, cot)
    _assert_close("out", out, want_out, 2e-5)
    _assert_close("lse", lse, want_lse, 2e-5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
      _assert_close(name, got, want, 2e-5, relative=True)

  def test_fully_masked_rows_and_huge_logits(self):
    """Rows with no visible key give zeros and finite gradients; logits near 1e3 stay finite."""
    batch, t, s, n, kh, h = 2, 40, 70, 2, 1, 64
    q, k, v = _inputs(2, batch, t, s, n, kh, h, jnp.float32)
    q = q * (1e3 ** 0.5) / jnp.linalg.norm(q, axis=-1, keepdims=True) * 8.0
    k = k * (1e3 ** 0.5) / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q_seg = jnp.asarray(np.where(np.arange(t) < 20, 1, 7)[None].repeat(batch, 0))  # 7: no keys
    kv_seg = jnp.ones((batch, s), jnp.int32)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, kv_lengths=jnp.asarray([0, 50]),
              causal=True)
    cot = _cotangents(2, (batch, t, n, h), (batch, n, t))
    out, lse, grads = _vjp(self.attend(**kw), q, k, v, cot)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # row 0 has no valid key
    np.testing.assert_array_equal(np.asarray(out[1, 20:]), 0.0)  # segment 7 has no key
    assert np.all(np.asarray(lse[0]) == common.MASK_VALUE)
    assert float(jnp.max(jnp.abs(lse[1, :, :20]))) > 100.0  # the case really has huge logits
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0][0]), 0.0)
    want_out, want_lse, want_grads = _vjp(lambda *a: attention_reference(*a, **kw), q, k, v, cot)
    _assert_close("out", out, want_out, 1e-4)
    _assert_close("lse", lse[1, :, :20], want_lse[1, :, :20], 1e-3)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
      _assert_close(name, got, want, 1e-3, relative=True)


@pytest.mark.gpu_only
class TestGpuKernelCompiled(_KernelTests):

  @pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
  def test_parity(self, case):
    self.check_parity(case)


class TestGpuKernelInterpret(_KernelTests):
  INTERPRET = True

  @pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
  def test_parity(self, case):
    self.check_parity(case)

  def test_jit_vmap_checkpoint(self):
    """vmap over an extra leading axis, under jit and jax.checkpoint, gradients included."""
    q, k, v = _inputs(4, 3 * 2, 40, 40, 4, 2, 64, jnp.float32)
    q, k, v = (x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v))

    def loss(attend):
      per_example = jax.checkpoint(lambda q, k, v: jnp.sum(attend(q, k, v)[0] ** 2))
      return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.vmap(per_example)(q, k, v)),
                              argnums=(0, 1, 2)))

    got = loss(self.attend(causal=True))(q, k, v)
    want = loss(lambda *a: attention_reference(*a, causal=True))(q, k, v)
    for g, w in zip(got, want):
      _assert_close("grad", g, w, 2e-5, relative=True)

  def test_lowers_to_triton(self):
    """The kernels (forward, dq, dkv) lower to Triton IR for CUDA, checked without a GPU."""
    q = jax.ShapeDtypeStruct((1, 256, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def fwd_bwd(q, k, v, seg):
      def loss(q, k, v):
        out, lse = gpu_lib.flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                           causal=True, local_window=100, softcap=30.0)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    decode = lambda q, k, v, lengths: decode_lib.decode_attention(
        q[:, :2], k, v, kv_lengths=lengths, q_positions=lengths[:, None] - 2 + jnp.arange(2),
        causal=True)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=checks)(
        q, kv, kv, seg).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 3
    text = export.export(jax.jit(decode), platforms=["cuda"], disabled_checks=checks)(
        q, kv, kv, jax.ShapeDtypeStruct((1,), jnp.int32)).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    flat_kv = jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16)  # The LM cache's [B*K, S, H].
    flat_decode = lambda q, k, v, lengths: decode_lib.decode_attention(
        q[:, :1], k, v, kv_lengths=lengths, q_positions=lengths[:, None] - 1, causal=True,
        kv_layout="flat")
    text = export.export(jax.jit(flat_decode), platforms=["cuda"], disabled_checks=checks)(
        q, flat_kv, flat_kv, jax.ShapeDtypeStruct((1,), jnp.int32)).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    cache_transposes = [line for line in text.splitlines()
                        if "stablehlo.transpose" in line and "256x" in line]
    assert not cache_transposes, cache_transposes  # Only the few query rows are transposed.


@pytest.mark.tpu_only
class TestTpuKernelCompiled(_KernelTests):
  LIB = tpu_lib
  BLOCKS = None  # The TPU table: small blocks do not meet Mosaic's (8, 128) tiling.

  @pytest.mark.parametrize("case", TPU_CASES, ids=_case_id)
  def test_parity(self, case):
    self.check_parity(case)


class TestTpuKernelInterpret(_KernelTests):
  LIB = tpu_lib
  BLOCKS = TPU_BLOCKS
  INTERPRET = True

  @pytest.mark.parametrize("case", TPU_CASES, ids=_case_id)
  def test_parity(self, case):
    self.check_parity(case)

  def test_no_races_in_tpu_simulation(self):
    """Forward and backward under the TPU memory simulator with race detection."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    q, k, v = _inputs(5, 1, 24, 150, 2, 1, 64, jnp.float32)
    params = pltpu.InterpretParams(detect_races=True)
    kernel = lambda q, k, v: tpu_lib.flash_attention(
        q, k, v, causal=True, interpret=params,
        block_sizes=BlockSizes(block_q=8, block_k=128, block_q_bwd=8, block_k_bwd=128))
    cot = _cotangents(5, q.shape, (1, 2, 24))
    out, lse, grads = _vjp(kernel, q, k, v, cot)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    want_out, _, want_grads = _vjp(lambda *a: attention_reference(*a, causal=True), q, k, v, cot)
    _assert_close("out", out, want_out, 2e-5)
    for got, want in zip(grads, want_grads):
      _assert_close("grad", got, want, 2e-5, relative=True)

  def test_lowers_to_mosaic(self):
    """With the TPU default blocks the three kernels lower to Mosaic, checked without a TPU."""
    q = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def fwd_bwd(q, k, v, seg):
      def loss(q, k, v):
        out, lse = tpu_lib.flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                           causal=True, softcap=30.0)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, kv, kv, seg).mlir_module()
    assert text.count("tpu_custom_call") == 3


def test_reference_matches_jax_nn_with_window_and_lengths():
  q, k, v = _inputs(6, 2, 50, 50, 4, 2, 32, jnp.float32)
  lengths = jnp.asarray([50, 45])  # every query keeps a key (jax.nn differs on empty rows)
  out, lse = attention_reference(q, k, v, causal=True, local_window=7, kv_lengths=lengths)
  with jax.default_matmul_precision("highest"):
    want, want_lse = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(6, 0), key_value_seq_lengths=lengths,
        implementation="xla", return_residual=True)
  _assert_close("out", out, want, 2e-6)
  _assert_close("lse", lse, want_lse.transpose(0, 2, 1), 2e-6)


def test_block_ranges_skip_invisible_blocks():
  """Skip ranges: causal lower triangle, packed segments and windows really drop blocks."""
  b, t = 1, 128
  cfg = common.MaskConfig(causal=True, use_segments=True)
  meta = common.build_meta(b, t, t, t, t)
  kv_lo, kv_hi, q_lo, q_hi = common.block_ranges(meta, 32, 32, cfg)
  np.testing.assert_array_equal(kv_lo[0], [0, 0, 0, 0])
  np.testing.assert_array_equal(kv_hi[0], [1, 2, 3, 4])
  np.testing.assert_array_equal(q_lo[0], [0, 1, 2, 3])
  np.testing.assert_array_equal(q_hi[0], [4, 4, 4, 4])
  seg = jnp.asarray([[0] * 64 + [1] * 64])
  meta = common.build_meta(b, t, t, t, t, q_segment_ids=seg, kv_segment_ids=seg)
  kv_lo, kv_hi, _, _ = common.block_ranges(meta, 32, 32, cfg)
  np.testing.assert_array_equal(kv_lo[0], [0, 0, 2, 2])
  windowed = dataclasses.replace(cfg, local_window=20)
  kv_lo, kv_hi, _, _ = common.block_ranges(common.build_meta(b, t, t, t, t), 32, 32, windowed)
  np.testing.assert_array_equal(kv_lo[0], [0, 0, 1, 2])
  meta = common.build_meta(b, t, t, t, t, kv_lengths=jnp.asarray([0]))
  kv_lo, kv_hi, _, _ = common.block_ranges(meta, 32, 32, cfg)
  np.testing.assert_array_equal(kv_hi[0] - kv_lo[0], 0)


@pytest.mark.parametrize("t, n, kh, window, softcap", [(1, 4, 4, None, None), (4, 8, 2, 40, 20.0)])
def test_decode_kernel_matches_reference(t, n, kh, window, softcap):
  """Split-K decode over a cache with per-row lengths (empty, mid-split, full)."""
  batch, s, h = 3, 256, 64
  q, k, v = _inputs(7, batch, t, s, n, kh, h, jnp.float32)
  lengths = jnp.asarray([t, 150, 256])
  pos = lengths[:, None] - t + jnp.arange(t)[None, :]
  kw = dict(kv_lengths=lengths, q_positions=pos, causal=True, local_window=window,
            softcap=softcap)
  out, lse = decode_lib.decode_attention(q, k, v, interpret=True,
                                         block_sizes=DecodeBlockSizes(block_k=32, num_splits=4),
                                         **kw)
  want_out, want_lse = attention_reference(q, k, v, **kw)
  _assert_close("out", out, want_out, 2e-5)
  _assert_close("lse", lse, want_lse, 2e-5)
  grad = jax.grad(lambda q: jnp.sum(decode_lib.decode_attention(q, k, v, interpret=True, **kw)[0]))
  want_grad = jax.grad(lambda q: jnp.sum(attention_reference(q, k, v, **kw)[0]))
  _assert_close("dq", grad(q), want_grad(q), 2e-5, relative=True)


def test_bad_inputs_raise_clear_errors():
  q, k, v = _inputs(8, 1, 16, 16, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48)
  with pytest.raises(ValueError, match="head_dim=512"):
    default_block_sizes("gpu", 512)
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    gpu_lib.flash_attention(q, k, v, q_segment_ids=jnp.zeros((1, 16), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="not a multiple"):
    gpu_lib.flash_attention(q[:, :, :3], k, v, interpret=True)
  with pytest.raises(ValueError, match="at most 16 new tokens"):
    decode_lib.decode_attention(jnp.concatenate([q, q], axis=1), k, v, interpret=True)


def test_decode_kernel_reads_the_flat_cache_layout():
  """kv_layout="flat" ([B*K, S, H], the LM's cache) gives what [B, S, K, H] gives, gradients too."""
  batch, t, s, n, kh, h = 2, 3, 100, 8, 2, 64  # S off the block grid: the padding path.
  q, k, v = _inputs(9, batch, t, s, n, kh, h, jnp.float32)
  flat = lambda x: x.transpose(0, 2, 1, 3).reshape(batch * kh, s, h)
  lengths = jnp.asarray([40, 100])
  kw = dict(kv_lengths=lengths, q_positions=lengths[:, None] - t + jnp.arange(t)[None, :],
            causal=True, softcap=30.0, interpret=True,
            block_sizes=DecodeBlockSizes(block_k=32, num_splits=2))
  want = decode_lib.decode_attention(q, k, v, **kw)
  got = decode_lib.decode_attention(q, flat(k), flat(v), kv_layout="flat", **kw)
  for name, g, w in zip(("out", "lse"), got, want):
    _assert_close(name, g, w, 1e-6)
  loss = lambda layout, prep: lambda q, k, v: jnp.sum(decode_lib.decode_attention(
      q, prep(k), prep(v), kv_layout=layout, **kw)[0] ** 2)
  grads = jax.grad(loss("flat", flat), argnums=(0, 1, 2))(q, k, v)
  want_grads = jax.grad(loss("bskh", lambda x: x), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    _assert_close(name, g, w, 1e-5, relative=True)
  with pytest.raises(ValueError, match=r"kv_layout='flat' expects \[batch \* kv_heads"):
    decode_lib.decode_attention(q, k, v, kv_layout="flat", interpret=True)
  with pytest.raises(ValueError, match="unknown kv_layout"):
    decode_lib.decode_attention(q, k, v, kv_layout="bksh", interpret=True)
