"""Attention benchmark: memory-efficient chunked vs plain XLA on CPU; Pallas vs cuDNN/XLA on GPU/TPU.

CPU (always): causal forward+backward, 8 heads, head_dim 64, batch 1, float32, at S = 1k, 4k, 16k,
32k. Peak temporary memory comes from `jax.jit(...).lower(...).compile().memory_analysis()` (the
plain-XLA program is compiled but never run past `--xla-time-max`, since it needs tens of GB);
times are medians of interleaved runs. Goals: chunked fits 32k in 2 GB of temporaries; chunked within
1.3x of XLA's time where both run.

GPU/TPU (when `jax.default_backend()` is one): TFLOP/s of forward and forward+backward in bfloat16,
S = 512 .. 16k, head_dim 64 and 128, causal on and off, GQA 8:1, for effjax's Pallas kernels, cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")`, GPU only) and XLA. `pallas` is the
dispatch (`impl="pallas"`: on Hopper the Mosaic GPU forward, `flash_attention_hopper`, with the
Triton backward; the row's `pallas_kernel` says which served it), `pallas_triton` the Triton
FlashAttention-2 kernel alone (GPU only). FLOPs: forward
4 * B * S^2 * N * H (halved when causal), backward 2.5x forward (REFERENCES 3); each time is the
median of 7 rounds of 10 back-to-back calls, so the device queue stays full (`per_call_seconds`).
Goal on H100: Pallas forward >= 0.8x cuDNN and >= 2x XLA.

Usage: python benchmarks/attention.py [--quick]. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_timing import interleaved_medians, per_call_seconds  # noqa: E402
from effjax.attention import MaskSpec, dot_product_attention  # noqa: E402
from effjax.attention import xla as xla_impl  # noqa: E402

GB = 1e9
IMPLS = ("pallas", "pallas_triton", "cudnn", "xla")  # Accelerator section; see the docstring.
MODES = ("fwd", "fwd_bwd")


def _interleaved_medians(fns: dict, args, repeats: int) -> dict:
  """Median seconds per attention function applied to `args` (see bench_timing)."""
  return interleaved_medians({name: (lambda fn=fn: jax.block_until_ready(fn(*args)))
                              for name, fn in fns.items()}, repeats)


def _fwd_bwd(attend):
  def loss(q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def cpu_section(quick: bool, xla_time_max: int, chunked_time_max: int, heads=8, head_dim=64,
                kv_chunk=512, q_chunk=1024):
  spec = MaskSpec(causal=True)
  scale = head_dim ** -0.5
  impls = {
      "xla": lambda q, k, v: xla_impl.xla_attention(q, k, v, spec, scale=scale)[0],
      "chunked": lambda q, k, v: xla_impl.chunked_attention(q, k, v, spec, scale=scale,
                                                            kv_chunk=kv_chunk, q_chunk=q_chunk)[0],
  }
  rows = []
  for s in (1024, 4096, 16384, 32768):
    shape = jax.ShapeDtypeStruct((1, s, heads, head_dim), jnp.float32)
    row = {"seq_len": s}
    for name, attend in impls.items():
      compiled = _fwd_bwd(attend).lower(shape, shape, shape).compile()
      row[f"{name}_temp_gb"] = round(compiled.memory_analysis().temp_size_in_bytes / GB, 4)
    timed = {name: _fwd_bwd(attend) for name, attend in impls.items()
             if s <= (xla_time_max if name == "xla" else chunked_time_max)}
    if timed:
      rng = np.random.default_rng(0)
      q, k, v = (jnp.asarray(rng.standard_normal((1, s, heads, head_dim)), jnp.float32)
                 for _ in range(3))
      repeats = 3 if quick or s > 4096 else 5
      medians = _interleaved_medians(timed, (q, k, v), repeats)
      for name, sec in medians.items():
        row[f"{name}_fwd_bwd_s"] = round(sec, 4)
      if len(medians) == 2:
        row["chunked_over_xla_time"] = round(medians["chunked"] / medians["xla"], 3)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  at_32k = [r for r in rows if r["seq_len"] == 32768][0]
  ratios = [r["chunked_over_xla_time"] for r in rows if "chunked_over_xla_time" in r]
  goals = {
      "chunked_32k_under_2gb": at_32k["chunked_temp_gb"] <= 2.0,
      "xla_32k_temp_gb": at_32k["xla_temp_gb"],
      "chunked_within_1.3x_xla": bool(ratios) and max(ratios) <= 1.3,
  }
  return {"config": dict(batch=1, heads=heads, head_dim=head_dim, dtype="float32", causal=True,
                         kv_chunk=kv_chunk, q_chunk=q_chunk), "rows": rows, "goals": goals}


def _flops(b, s, n, h, causal, backward):
  fwd = 4 * b * s * s * n * h / (2 if causal else 1)
  return fwd * (3.5 if backward else 1.0)


def accelerator_section(quick: bool, head_dims=None, impl_names=None, modes=("fwd", "fwd_bwd"),
                        seqs=None):
  from kernels_pallas import flash_attention_gpu
  backend = jax.default_backend()
  seqs = seqs or ((512, 2048, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384))
  head_dims = head_dims or ((128,) if quick else (128, 64))
  kv_heads, groups = 2, 8  # GQA 8:1
  n = kv_heads * groups
  results = []
  for h in head_dims:
    for causal in (True, False):
      for s in seqs:
        b = max(1, 16384 // s)
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.bfloat16)
        impls = {
            "pallas": lambda q, k, v, c=causal: dot_product_attention(
                q, k, v, MaskSpec(causal=c), impl="pallas", strict=True, interpret=False),
            "xla": lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                q, k, v, is_causal=c, implementation="xla"),
        }
        if backend == "gpu":
          impls["cudnn"] = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
              q, k, v, is_causal=c, implementation="cudnn")
          impls["pallas_triton"] = lambda q, k, v, c=causal: flash_attention_gpu.flash_attention(
              q, k, v, causal=c)[0]
        impls = {name: fn for name, fn in impls.items() if not impl_names or name in impl_names}
        row = {"seq_len": s, "batch": b, "head_dim": h, "causal": causal}
        if "pallas" in impls:  # Which kernel the dispatch picks (EFFJAX_PALLAS_HOPPER included).
          from effjax.attention import pallas_bridge
          hopper = backend == "gpu" and pallas_bridge._use_hopper(
              q, k, v, MaskSpec(causal=causal), h ** -0.5, None, False)
          row["pallas_kernel"] = "hopper" if hopper else ("triton" if backend == "gpu" else backend)
        for mode in modes:
          fns = {}
          for name, fn in impls.items():
            fns[name] = jax.jit(fn) if mode == "fwd" else _fwd_bwd(fn)
          ok = {}
          for name, fn in fns.items():
            try:
              jax.block_until_ready(fn(q, k, v))
              ok[name] = fn
            except Exception as e:  # e.g. XLA out of memory at 16k, cuDNN shape limits.
              row[f"{name}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
          medians = per_call_seconds(ok, (q, k, v), calls=10, rounds=5 if quick else 7)
          flops = _flops(b, s, n, h, causal, mode == "fwd_bwd")
          for name, sec in medians.items():
            row[f"{name}_{mode}_tflops"] = round(flops / sec / 1e12, 2)
          for peer in ("cudnn", "xla", "pallas_triton"):
            if "pallas" in medians and peer in medians:
              row[f"pallas_over_{peer}_{mode}"] = round(medians[peer] / medians["pallas"], 3)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  fwd_vs = lambda peer: [r.get(f"pallas_over_{peer}_fwd") for r in results
                         if r.get(f"pallas_over_{peer}_fwd") is not None]
  goals = {}
  if backend == "gpu":
    goals["pallas_fwd_min_over_cudnn"] = min(fwd_vs("cudnn"), default=None)
    goals["pallas_fwd_at_least_0.8x_cudnn"] = bool(fwd_vs("cudnn")) and min(fwd_vs("cudnn")) >= 0.8
  goals["pallas_fwd_min_over_xla"] = min(fwd_vs("xla"), default=None)
  goals["pallas_fwd_at_least_2x_xla"] = bool(fwd_vs("xla")) and min(fwd_vs("xla")) >= 2.0
  return {"device": jax.devices()[0].device_kind, "gqa": f"{groups}:1", "rows": results,
          "goals": goals}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 2 min)")
  parser.add_argument("--xla-time-max", type=int, default=None,
                      help="longest sequence at which plain XLA is run on CPU (it needs O(S^2)); "
                      "default 1024 with --quick, else 4096")
  parser.add_argument("--chunked-time-max", type=int, default=None,
                      help="longest sequence at which the chunked path is timed on CPU; "
                      "default 1024 with --quick, else 16384")
  parser.add_argument("--skip-cpu", action="store_true", help="accelerator section only")
  parser.add_argument("--head-dims", default=None,
                      help="comma-separated head dims of the accelerator section (default 128,64)")
  parser.add_argument("--impls", default=None,
                      help="comma-separated subset of pallas,pallas_triton,cudnn,xla (default all)")
  parser.add_argument("--modes", default="fwd,fwd_bwd", help="fwd, fwd_bwd or both")
  args = parser.parse_args(argv)
  for flag, given, allowed in (("--impls", args.impls, IMPLS), ("--modes", args.modes, MODES)):
    unknown = sorted(set((given or "").split(",")) - set(allowed) - {""})
    if unknown:
      parser.error(f"{flag}: unknown {unknown}; choose from {','.join(allowed)}")
  xla_max = args.xla_time_max or (1024 if args.quick else 4096)
  chunked_max = args.chunked_time_max or (1024 if args.quick else 16384)
  result = {
      "benchmark": "attention",
      "command": "python " + " ".join(sys.argv),
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                  "jax": jax.__version__},
      "note": f"medians of interleaved runs; load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  if not args.skip_cpu and jax.default_backend() == "cpu":
    result["cpu"] = cpu_section(args.quick, xla_max, chunked_max)
  elif not args.skip_cpu:
    with jax.default_device(jax.devices("cpu")[0]):
      result["cpu"] = cpu_section(args.quick, xla_max, chunked_max)
  if jax.default_backend() in ("gpu", "tpu"):
    head_dims = tuple(int(h) for h in args.head_dims.split(",")) if args.head_dims else None
    impl_names = tuple(args.impls.split(",")) if args.impls else None
    result["accelerator"] = accelerator_section(args.quick, head_dims, impl_names,
                                                tuple(args.modes.split(",")))
  else:
    result["accelerator"] = "not run: no GPU/TPU backend"
  print(json.dumps(result))


if __name__ == "__main__":
  main()
