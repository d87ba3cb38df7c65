r"""Greedy decoding speed on CPU: effjax's one-jit engine against transformers, plus a roofline.

The same random weights run in both (effjax params exported with `effjax.interop.hf_llama`), on the
same prompts (128 random bytes), greedy, 128 new tokens, no early stop, batch 1 and 8, for two sizes:
`small` (~4.8M parameters, 19 MB in float32: fits the last-level cache, not the L2s) and `large`
(~32M, 126 MB: several times the LLC). Reported: end-to-end tokens/s (prefill included, compilation and warm-up
excluded), medians over repeats (effjax and transformers timed in alternation, so load drifting
on a shared machine hits both alike), the effjax/transformers ratio, and effjax's fraction of
this machine's roofline. Also timed in the same alternation: effjax with `attention_impl="xla"`
(`kernel_speedup` = its time / the default's), the gain of the C++ decode-attention kernel
(`effjax/attention/cpu_decode.py`) that `attention_impl="auto"` uses on CPU; and one layer's decode
attention alone, kernel against XLA, with the cache half-way through the generation
(`decode_attention_per_layer`); effjax with `matmul_impl="xla"` (`matmul_kernel_speedup`), the
gain of the C++ few-row matmul (`effjax/ops/few_row_matmul.py`) its decode steps use on CPU; and
effjax without the packed weight copies (`lm.pack_weights`, made once before timing as a loader
would) the kernel reads by default here (`packing_speedup`; its tokens must be identical).
`large_bf16`: `large` with bfloat16 weights and activations at batch 1, the few-row kernel's
bfloat16 path against XLA's bfloat16 dots (`matmul_kernel_speedup`), no transformers run.

Roofline: measured in the same run, at its start and its end, best figure kept (a ceiling; other jobs
only slow a run). Memory bandwidth = bytes / time of a jitted `jnp.sum` over a 512 MB float32 array
(streaming reads, like weights in decode); matmul rate = a jitted 2048^3 float32 `jnp.dot`. The time
floor of one generation is
  prefill: max(weight bytes / bw, 2 * B * P * matmul params / flops)
  + for each decode step at context c: max((weight bytes + KV bytes(c)) / bw,
                                           (2 * B * matmul params + 4 * B * c * N * H * L) / flops)
and effjax's fraction = floor / measured time. For `small`, which the last-level cache could hold,
the DRAM bandwidth need not be its ceiling, so its fraction can exceed 1. `goal_needs_roofline_fraction`
is the fraction the issue's ratio (2x transformers at batch 1, 3x at batch 8) asks for in that run:
near 1, for a model whose weights come from DRAM, no code reaches the goal on that machine.

  python benchmarks/decode.py            # full: 128/128 tokens, 5 repeats
  python benchmarks/decode.py --quick    # < 2 min: 128 prompt / 32 new tokens, 1 repeat

transformers is measured fairly: `torch.inference_mode()`, its KV cache on, SDPA attention,
`torch.set_num_threads(2)`, a warm-up call, the same greedy settings and token count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_timing import interleaved_medians, per_call_seconds  # noqa: E402
from effjax.generate import engine  # noqa: E402
from effjax.models import LMConfig, random_params, registry  # noqa: E402
from effjax.models.lm import pack_weights  # noqa: E402

# lm/small (19 MB: fits a 32 MB L3) and lm/large (126 MB: streams from DRAM every step).
MODELS = {"small": registry.get("lm/small"), "large": registry.get("lm/large")}


def log(*args):
  print(*args, flush=True)


def _times(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def measure_machine(quick: bool) -> dict:
  """Streaming-read bandwidth and float32 matmul rate of this machine, measured now.

  A roofline is a ceiling, so each figure is the best of several runs (other jobs on a shared
  CPU only ever slow a run down).
  """
  reps = 5 if quick else 9
  x = jnp.ones((128 * 1024 * 1024,), jnp.float32)  # 512 MB, far beyond the last-level cache
  reduce = jax.jit(jnp.sum)
  reduce(x).block_until_ready()
  bw = x.nbytes / min(_times(lambda: reduce(x).block_until_ready(), reps))
  del x
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  rate = 2 * n ** 3 / min(_times(lambda: dot(a, a).block_until_ready(), reps))
  src = np.ones(64 * 1024 * 1024, np.float32)
  dst = np.empty_like(src)
  np_copy = 2 * src.nbytes / min(_times(lambda: np.copyto(dst, src), 3))
  return {"bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": rate / 1e9,
          "numpy_copy_GBps": np_copy / 1e9}


def best_of(a: dict, b: dict) -> dict:
  return {k: max(a[k], b[k]) for k in a}


def roofline_seconds(cfg: LMConfig, batch: int, prompt: int, new: int, machine: dict) -> float:
  """Lower bound on one generation's time on this machine (see module docstring)."""
  wbytes = cfg.num_params() * np.dtype(cfg.param_dtype).itemsize
  matmul_params = cfg.num_params() - cfg.d_model * (2 * cfg.num_layers + 1)  # norms excluded
  bw, rate = machine["bandwidth_GBps"] * 1e9, machine["matmul_GFLOPs"] * 1e9
  kv_item = np.dtype(cfg.dtype).itemsize
  total = max(wbytes / bw, 2 * batch * prompt * matmul_params / rate)
  for step in range(1, new):
    ctx = prompt + step
    kv = 2 * cfg.num_layers * batch * ctx * cfg.num_kv_heads * cfg.head_dim * kv_item
    flops = 2 * batch * matmul_params + 4 * batch * ctx * cfg.num_heads * cfg.head_dim * (
        cfg.num_layers)
    total += max((wbytes + kv) / bw, flops / rate)
  return total


def effjax_runner(params, cfg, prompts, new, pack=True):
  """Compiles and warms effjax's generation; returns (timed call, tokens, compile seconds).

  `pack`: pack the weights for the few-row kernel once here, as a loader would (`pack_weights`;
  a no-op for the XLA-matmul baseline).
  """
  if pack:
    params = pack_weights(params, cfg)
  def run():
    out = engine.generate(params, cfg, prompts, max_new_tokens=new)
    out.tokens.block_until_ready()
    return out
  start = time.perf_counter()
  tokens = np.asarray(run().tokens)  # compile + first run
  compile_s = time.perf_counter() - start
  return run, tokens, compile_s


def hf_runner(model, prompts, new):
  """Warms transformers' `generate`; returns (timed call, tokens)."""
  import torch
  ids = torch.from_numpy(prompts.astype(np.int64))
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
            pad_token_id=0, use_cache=True)

  def run():
    with torch.inference_mode():
      return model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
  with torch.inference_mode():
    model.generate(ids, max_new_tokens=4, **kw)  # warm-up
  return run, run()[:, prompts.shape[1]:].numpy()


def attention_layer_times(cfg: LMConfig, batch: int, slots: int, visible: int,
                          repeats: int) -> dict:
  """One layer's decode attention (1 new token per row, `visible` of `slots` cache slots filled):
  the C++ kernel (`impl="cpu_decode"`) against XLA (`impl="xla"`), microseconds per call."""
  from effjax.attention import MaskSpec, dot_product_attention
  rng = np.random.default_rng(0)
  kh, h = cfg.num_kv_heads, cfg.head_dim
  q = jnp.asarray(rng.standard_normal((batch, 1, cfg.num_heads, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((batch * kh, slots, h)), jnp.float32) for _ in range(2))
  lengths = jnp.full((batch,), visible, jnp.int32)
  spec = MaskSpec(causal=True, q_positions=lengths[:, None] - 1, kv_lengths=lengths)
  fns = {impl: jax.jit(lambda q, k, v, impl=impl: dot_product_attention(
      q, k, v, spec, impl=impl, strict=True, kv_layout="flat")) for impl in ("cpu_decode", "xla")}
  per_call = per_call_seconds(fns, (q, k, v), calls=20, rounds=repeats)
  return {"batch": batch, "slots": slots, "visible": visible,
          **{f"{name}_us": round(sec * 1e6, 1) for name, sec in per_call.items()},
          "xla_over_kernel": round(per_call["xla"] / per_call["cpu_decode"], 2)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="fewer new tokens and repeats (< 2 min)")
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=None, help="default 128 (32 with --quick)")
  ap.add_argument("--repeats", type=int, default=None, help="default 5 (1 with --quick)")
  ap.add_argument("--models", default="small,large")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--no_bf16", action="store_true", help="skip the effjax bfloat16 variant")
  ap.add_argument("--no_xla_attention", action="store_true",
                  help="skip the baseline run of effjax with attention_impl='xla' (decode "
                  "attention in XLA instead of the C++ kernel)")
  ap.add_argument("--no_xla_matmul", action="store_true",
                  help="skip the baseline run of effjax with matmul_impl='xla' (weight matmuls "
                  "in XLA instead of the C++ few-row kernel)")
  ap.add_argument("--no_unpacked", action="store_true",
                  help="skip the baseline run of effjax on row-major weights (no pack_weights)")
  args = ap.parse_args()
  new = args.new_tokens or (32 if args.quick else 128)
  repeats = args.repeats or (1 if args.quick else 5)
  import torch
  torch.set_num_threads(2)
  from effjax.interop import hf_llama

  machine = measure_machine(args.quick)
  log(f"machine: {machine}")
  results, attention = [], []
  for name in args.models.split(","):
    cfg = MODELS[name]
    if not args.no_xla_attention:
      for batch in [int(b) for b in args.batches.split(",")]:
        slots = min(engine.bucket_length(args.prompt_len + new), cfg.max_len)  # As the engine.
        row = {"model": name, **attention_layer_times(cfg, batch, slots, args.prompt_len + new // 2,
                                                      repeats=7)}
        log(json.dumps(row))
        attention.append(row)
    params = random_params(cfg, 0)
    hf_model = None if args.skip_hf else hf_llama.to_hf_model(params, cfg, "sdpa")
    for batch in [int(b) for b in args.batches.split(",")]:
      prompts = np.random.default_rng(batch).integers(0, 256, (batch, args.prompt_len)).astype(
          np.int32)
      runs = {}
      runs["effjax"], tok_eff, compile_s = effjax_runner(params, cfg, prompts, new)
      if not args.no_xla_attention:  # Its own baseline: the same engine, attention in XLA.
        runs["effjax_xla_attention"], tok_xla_attn, _ = effjax_runner(
            params, cfg.replace(attention_impl="xla"), prompts, new)
      if not args.no_xla_matmul:  # The same engine, weight matmuls in XLA.
        runs["effjax_xla_matmul"], tok_xla_mm, _ = effjax_runner(
            params, cfg.replace(matmul_impl="xla"), prompts, new)
      if not args.no_unpacked:  # The same engine, the kernel on row-major weights.
        runs["effjax_unpacked"], tok_unpacked, _ = effjax_runner(
            params, cfg, prompts, new, pack=False)
      if hf_model is not None:
        runs["hf"], tok_hf = hf_runner(hf_model, prompts, new)
      medians = interleaved_medians(runs, repeats, warmup=False)  # runners come warmed up
      t_eff = medians["effjax"]
      row = {"model": name, "params_M": cfg.num_params() / 1e6,
             "weight_MB": cfg.num_params() * 4 / 1e6, "batch": batch,
             "effjax_tok_s": batch * new / t_eff, "effjax_s": t_eff,
             "effjax_compile_s": compile_s, "_cfg": cfg}
      if "effjax_xla_attention" in medians:
        row.update({"effjax_xla_attention_tok_s": batch * new / medians["effjax_xla_attention"],
                    "kernel_speedup": medians["effjax_xla_attention"] / t_eff,
                    "xla_attention_tokens_identical_fraction": float(
                        (tok_eff == tok_xla_attn).mean())})
      if "effjax_xla_matmul" in medians:
        row.update({"effjax_xla_matmul_tok_s": batch * new / medians["effjax_xla_matmul"],
                    "matmul_kernel_speedup": medians["effjax_xla_matmul"] / t_eff,
                    "xla_matmul_tokens_identical_fraction": float(
                        (tok_eff == tok_xla_mm).mean())})
      if "effjax_unpacked" in medians:
        row.update({"effjax_unpacked_tok_s": batch * new / medians["effjax_unpacked"],
                    "packing_speedup": medians["effjax_unpacked"] / t_eff,
                    "unpacked_tokens_identical": bool((tok_eff == tok_unpacked).all())})
      if hf_model is not None:
        t_hf = medians["hf"]
        agree = (tok_eff == tok_hf)
        row.update({"hf_tok_s": batch * new / t_hf, "hf_s": t_hf, "speedup": t_hf / t_eff,
                    "rows_token_identical": int(agree.all(axis=1).sum()),
                    "tokens_identical_fraction": float(agree.mean())})
      log(json.dumps({k: v for k, v in row.items() if k != "_cfg"}))
      results.append(row)
    if not args.no_bf16 and name == "large":
      cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
      params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
      prompts = np.random.default_rng(1).integers(0, 256, (1, args.prompt_len)).astype(np.int32)
      run16, tok16, _ = effjax_runner(params16, cfg16, prompts, new)
      runs16 = {"bf16": run16}
      if not args.no_xla_matmul:  # Its own baseline: bfloat16 weight matmuls in XLA.
        runs16["bf16_xla_matmul"], tok16_xla, _ = effjax_runner(
            params16, cfg16.replace(matmul_impl="xla"), prompts, new)
      med16 = interleaved_medians(runs16, repeats, warmup=False)
      t16 = med16["bf16"]
      row = {"model": name + "_bf16", "batch": 1, "effjax_tok_s": new / t16, "effjax_s": t16,
             "_cfg": cfg16}
      if "bf16_xla_matmul" in med16:
        row.update({"effjax_xla_matmul_tok_s": new / med16["bf16_xla_matmul"],
                    "matmul_kernel_speedup": med16["bf16_xla_matmul"] / t16,
                    "xla_matmul_tokens_identical_fraction": float((tok16 == tok16_xla).mean())})
      log(json.dumps({k: v for k, v in row.items() if k != "_cfg"}))
      results.append(row)

  # The roofline uses the best machine figures seen at the start and at the end of the run.
  machine = best_of(machine, measure_machine(args.quick))
  log(f"machine (best of start and end): {machine}")
  for r in results:
    floor = roofline_seconds(r.pop("_cfg"), r["batch"], args.prompt_len, new, machine)
    r.update({"roofline_s": floor, "effjax_roofline_fraction": floor / r["effjax_s"]})
    if "hf_s" in r:  # The fraction of the roofline that the ratio asks for in this run.
      need = 2.0 if r["batch"] == 1 else 3.0
      r["goal_needs_roofline_fraction"] = floor / (r["hf_s"] / need)
  goals = {}
  for r in results:
    if "speedup" in r:
      need = 2.0 if r["batch"] == 1 else 3.0
      goals[f"{r['model']}_b{r['batch']}_speedup>={need}"] = r["speedup"] >= need
  large1 = [r for r in results if r["model"] == "large" and r["batch"] == 1]
  if large1:
    goals["large_b1_roofline>=0.7"] = large1[0]["effjax_roofline_fraction"] >= 0.7
  summary = {
      "benchmark": "decode", "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "torch": torch.__version__, **machine},
      "prompt_len": args.prompt_len, "new_tokens": new, "repeats": repeats,
      "results": results, "decode_attention_per_layer": attention, "goals_met": goals,
      "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
