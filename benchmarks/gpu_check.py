"""Compiled-kernel checks and tile tuning for a lent GPU (the parts of #4 a CPU cannot do).

Sections, each printing JSON lines (stderr) and a summary (stdout's last line):
  decode   - the split-K decode kernel compiled, against the `jnp` reference (float32 and bfloat16),
             then timed against XLA attention over the same cache (bf16, T=1 and T=9 new tokens),
             and on the LM's heads-major [B*K, S, H] cache read in place vs transposed first.
  sweep    - forward and forward+backward time of `flash_attention_gpu` over a grid of `BlockSizes`
             (bf16, causal, GQA 8:1, S=4096), to check the default table.
  hopper_sweep - forward time of `flash_attention_hopper` (Mosaic GPU, sm_90 only) over a grid of
             `HopperBlockSizes` (bf16, causal and not, GQA 8:1, S=4096), with cuDNN and the Triton
             kernel timed in the same loop; no --dry_run (the kernel has no interpreter).

The LM trained and decoded on compiled Pallas kernels is a test
(`tests/test_attention_dispatch.py::test_lm_trains_and_decodes_identically_on_pallas`, compiled
when the suite runs on a GPU), run by `benchmarks/gpu_session.sh`.

Usage: python benchmarks/gpu_check.py [--sections decode,sweep] [--sweep_seconds 120]
Needs a GPU backend; `benchmarks/gpu_session.sh` runs it with the rest of the device checks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_timing import per_call_seconds  # noqa: E402

# --dry_run: the whole script on CPU, kernels in the Pallas interpreter, tiny shapes - to check the
# script itself before spending device time on it.
DRY_RUN = False


def _emit(row: dict) -> dict:
  print(json.dumps(row), file=sys.stderr, flush=True)
  return row


def _max_err(got, want, relative=False):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  err = float(np.max(np.abs(got - want)))
  return err / max(float(np.max(np.abs(want))), 1e-6) if relative else err


def decode_section() -> dict:
  from kernels_pallas import decode_attention as decode_lib
  from kernels_pallas.reference import attention_reference
  from effjax.attention import xla as xla_impl
  from effjax.attention.mask import MaskSpec

  rows = []
  rng = np.random.default_rng(0)
  for dtype, t, window, softcap in (("float32", 1, None, None), ("float32", 4, 40, 20.0),
                                    ("bfloat16", 9, None, None)):
    b, s, n, kh, h = 3, 1000, 8, 2, 128
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
               for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    lengths = jnp.asarray([t, 517, 1000])
    kw = dict(kv_lengths=lengths, q_positions=lengths[:, None] - t + jnp.arange(t)[None, :],
              causal=True, local_window=window, softcap=softcap)
    out, lse = decode_lib.decode_attention(q, k, v, interpret=DRY_RUN, **kw)
    # The LM cache's heads-major [B*K, S, H] layout, read in place by the same kernel.
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b * kh, s, h)
    flat_out, flat_lse = decode_lib.decode_attention(q, flat(k), flat(v), interpret=DRY_RUN,
                                                     kv_layout="flat", **kw)
    with jax.default_matmul_precision("highest"):
      want_out, want_lse = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    tol = 2e-5 if dtype == "float32" else 3e-2
    row = {"dtype": dtype, "t": t, "window": window, "softcap": softcap,
           "out_err": _max_err(out, want_out), "lse_err": _max_err(lse, want_lse),
           "flat_out_err": _max_err(flat_out, want_out),
           "flat_lse_err": _max_err(flat_lse, want_lse)}
    row["ok"] = all(row[key] <= tol for key in row if key.endswith("_err"))
    rows.append(_emit({"section": "decode_parity", **row}))  # Now: a cut run keeps it.

  timings = []
  shapes = ((1, 1, 8192), (8, 1, 8192), (8, 9, 8192), (1, 1, 32768), (8, 1, 32768))
  for b, t, s in (((2, 1, 256),) if DRY_RUN else shapes):
    n, kh, h = 32, 8, 128
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
               for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    lengths = jnp.full((b,), s, jnp.int32)
    pos = lengths[:, None] - t + jnp.arange(t)[None, :]
    spec = MaskSpec(causal=True, q_positions=pos, kv_lengths=lengths)
    decode = lambda q, k, v, layout="bskh": decode_lib.decode_attention(
        q, k, v, kv_lengths=lengths, q_positions=pos, causal=True, interpret=DRY_RUN,
        kv_layout=layout)[0]
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b * kh, s, h)
    kf, vf = flat(k), flat(v)
    # Every cache is an argument: a cache closed over as a constant would let XLA fold the
    # transpose at compile time (the 2026-11-30 run did that and measured nothing).
    fns = {
        "pallas_decode": jax.jit(lambda q, k, v, kf, vf: decode(q, k, v)),
        "xla": jax.jit(lambda q, k, v, kf, vf: xla_impl.xla_attention(
            q, k, v, spec, scale=h ** -0.5)[0]),
        # The LM's [B*K, S, H] cache: read in place, or transposed first (the path before
        # kv_layout="flat" reached the kernel).
        "pallas_flat": jax.jit(lambda q, k, v, kf, vf: decode(q, kf, vf, "flat")),
        "pallas_flat_transposed": jax.jit(lambda q, k, v, kf, vf: decode(
            q, decode_lib.unflatten_kv(kf, b), decode_lib.unflatten_kv(vf, b))),
    }
    med = per_call_seconds(fns, (q, k, v, kf, vf), calls=50)
    cache_bytes = 2 * b * s * kh * h * 2
    timings.append(_emit({
        "section": "decode_time", "batch": b, "tokens": t, "cache_len": s,
        **{f"{name}_us": round(sec * 1e6, 1) for name, sec in med.items()},
        "pallas_cache_gbps": round(cache_bytes / med["pallas_decode"] / 1e9, 1),
        "xla_over_pallas": round(med["xla"] / med["pallas_decode"], 2),
        "transposed_over_flat": round(med["pallas_flat_transposed"] / med["pallas_flat"], 2)}))
  return _emit({"section": "decode", "parity": rows, "ok": all(r["ok"] for r in rows),
                "timings": timings})


def sweep_section(budget_s: float) -> dict:
  from kernels_pallas import flash_attention_gpu as gpu_lib
  from kernels_pallas.block_sizes import BlockSizes, default_block_sizes

  deadline = time.time() + budget_s
  rng = np.random.default_rng(0)
  b, s, n, kh = (1, 256, 16, 2) if DRY_RUN else (4, 4096, 16, 2)
  results = {}
  for h in (128, 64):
    q = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    flops = 4 * b * s * s * n * h / 2
    default = default_block_sizes("gpu", h)
    if DRY_RUN:
      fwd_grid, bwd_grid = [default, BlockSizes(block_q=64, block_k=32)], [default]
    else:
      fwd_grid = [default] + [BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
                              for bq, bk, w, st in itertools.product((64, 128), (32, 64, 128),
                                                                     (4, 8), (2, 3))]
      bwd_grid = [default] + [BlockSizes(block_q_bwd=bq, block_k_bwd=bk, num_warps=w,
                                         num_stages=2)
                              for bq, bk, w in itertools.product((32, 64, 128), (32, 64, 128),
                                                                 (4, 8))]
    for mode, grid in (("fwd", fwd_grid), ("fwd_bwd", bwd_grid)):
      best = None
      for sizes in grid:
        if time.time() > deadline:
          break
        attend = lambda q, k, v, sz=sizes: gpu_lib.flash_attention(
            q, k, v, causal=True, block_sizes=sz, interpret=DRY_RUN)[0]
        if mode == "fwd":
          fn = jax.jit(attend)
        else:
          fn = jax.jit(jax.grad(lambda q, k, v, a=attend: jnp.sum(a(q, k, v).astype(jnp.float32)),
                                argnums=(0, 1, 2)))
        try:
          jax.block_until_ready(fn(q, k, v))
          sec = per_call_seconds({"x": fn}, (q, k, v), calls=5)["x"]
        except Exception as e:  # Shared-memory overflow or a Triton limit for this tile.
          _emit({"section": "sweep", "head_dim": h, "mode": mode, "sizes": str(sizes),
                 "error": f"{type(e).__name__}: {str(e)[:100]}"})
          continue
        tflops = flops * (3.5 if mode == "fwd_bwd" else 1.0) / sec / 1e12
        _emit({"section": "sweep", "head_dim": h, "mode": mode, "default": sizes is default,
               "sizes": str(sizes), "tflops": round(tflops, 1)})
        if sizes is default:
          results[f"h{h}_{mode}_default_tflops"] = round(tflops, 1)
        if best is None or tflops > best[0]:
          best = (tflops, str(sizes))
      if best:
        results[f"h{h}_{mode}_best"] = {"tflops": round(best[0], 1), "sizes": best[1]}
  return _emit({"section": "sweep", "shape": dict(batch=b, seq=s, heads=n, kv_heads=kh,
                                                  causal=True, dtype="bfloat16"), **results})


def hopper_sweep_section(budget_s: float) -> dict:
  from kernels_pallas import flash_attention_gpu as gpu_lib
  from kernels_pallas import flash_attention_hopper as hopper_lib
  from kernels_pallas.flash_attention_hopper import HopperBlockSizes

  if DRY_RUN or not hopper_lib.is_hopper():
    return _emit({"section": "hopper_sweep", "skipped": "needs an sm_90 GPU (no interpreter)"})
  start = time.time()
  rng = np.random.default_rng(0)
  b, s, n, kh = 4, 4096, 16, 2
  grid = [HopperBlockSizes(64, bk, steps) for bk, steps in itertools.product((128, 256, 64),
                                                                             (2, 3))]
  grid.append(HopperBlockSizes(128, 64, 2))
  results = {}
  cases = list(itertools.product((128, 64), (True, False)))
  for case_index, (h, causal) in enumerate(cases):
    deadline = start + budget_s * (case_index + 1) / len(cases)  # Each case its share.
    q = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    flops = 4 * b * s * s * n * h / (2 if causal else 1)
    default = hopper_lib.default_block_sizes(h)
    fns = {
        "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")),
        "triton": jax.jit(lambda q, k, v: gpu_lib.flash_attention(q, k, v, causal=causal)[0]),
    }
    for sizes in [default] + [g for g in grid if g != default]:
      fns[str(sizes)] = jax.jit(lambda q, k, v, sz=sizes: hopper_lib.flash_attention(
          q, k, v, causal=causal, block_sizes=sz)[0])
    key = f"h{h}_{'causal' if causal else 'full'}"
    tflops = {}
    for name, fn in fns.items():
      if time.time() > deadline:
        break
      try:
        jax.block_until_ready(fn(q, k, v))
        sec = per_call_seconds({"x": fn}, (q, k, v), calls=10, rounds=5)["x"]
      except Exception as e:  # Shared memory or registers exceeded for this tile.
        _emit({"section": "hopper_sweep", "case": key, "sizes": name,
               "error": f"{type(e).__name__}: {str(e)[:160]}"})
        continue
      tflops[name] = round(flops / sec / 1e12, 1)
      _emit({"section": "hopper_sweep", "case": key, "sizes": name, "tflops": tflops[name]})
    hopper = {name: t for name, t in tflops.items() if name.startswith("HopperBlockSizes")}
    if hopper:
      best = max(hopper, key=hopper.get)
      results[key] = {"default_tflops": tflops.get(str(default)), "best": best,
                      "best_tflops": hopper[best], "cudnn_tflops": tflops.get("cudnn"),
                      "triton_tflops": tflops.get("triton")}
  return _emit({"section": "hopper_sweep", "shape": dict(batch=b, seq=s, heads=n, kv_heads=kh,
                                                         dtype="bfloat16"), **results})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default="decode,sweep")
  parser.add_argument("--sweep_seconds", type=float, default=120.0)
  parser.add_argument("--dry_run", action="store_true",
                      help="CPU, Pallas interpreter, tiny shapes: checks this script, not the GPU")
  args = parser.parse_args()
  global DRY_RUN
  DRY_RUN = args.dry_run
  if DRY_RUN:
    os.environ["EFFJAX_PALLAS_INTERPRET"] = "1"
  elif jax.default_backend() != "gpu":
    raise SystemExit(f"gpu_check.py needs a GPU backend; jax sees {jax.default_backend()!r}")
  summary = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for name in args.sections.split(","):
    t0 = time.time()
    try:
      if name == "decode":
        summary[name] = decode_section()
      elif name == "sweep":
        summary[name] = sweep_section(args.sweep_seconds)
      elif name == "hopper_sweep":
        summary[name] = hopper_sweep_section(args.sweep_seconds)
      else:
        raise ValueError(f"unknown section {name!r}; choose from decode, sweep, hopper_sweep")
    except Exception as e:  # Report and go on: one failing section must not hide the others.
      import traceback
      traceback.print_exc()
      summary[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    summary[f"{name}_seconds"] = round(time.time() - t0, 1)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
