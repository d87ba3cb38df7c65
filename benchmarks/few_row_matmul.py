r"""The C++ few-row matmul (effjax/ops/few_row_matmul.py) against XLA:CPU and torch, on CPU.

Two views, each timed in alternation (medians):

1. One matmul, [M, 256] x [256, 768] float32, cycling through 43 weight matrices (the number of
   weight matrices in one lm/small step, so they come from the last-level cache as in decoding, not
   from L2) with each result feeding the next call: the kernel on row-major weights, on packed ones
   read in L1-sized blocks as the LM reads them (`few_row_matmul.pack`, packed once before timing,
   `stream=True`: `kernel_over_packed` is the two together), XLA's dot, and torch.matmul (2
   threads), for M = 1, 2, 5, 9, 17, 33, 65.
2. One cached lm/small decode step with T new tokens per row (1 = decoding; 2-9 = speculative
   verification; 17-65 = Medusa trees) at batch 1 and 4, `matmul_impl="auto"` (the kernel, with
   the weights packed by `lm.pack_weights(force=True)`, and row-major; both read in blocks since
   lm/small streams, 2026-11-30 09:30) against `"xla"`, and T tokens' cost in one-token steps:
   what the speculative speedup formula assumes is 1.

  python benchmarks/few_row_matmul.py           # ~3 min
  python benchmarks/few_row_matmul.py --quick   # ~40 s
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

from benchmarks.bench_timing import interleaved_medians  # noqa: E402
from effjax.models import lm, registry  # noqa: E402
from effjax.ops import few_row_matmul  # noqa: E402
from effjax.speculative import metrics  # noqa: E402

NUM_WEIGHTS = 43


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def matmul_rows(rows, repeats):
  import torch
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  weights = [rng.standard_normal((256, 768)).astype(np.float32) / 16 for _ in range(NUM_WEIGHTS)]
  jw = [jnp.asarray(w) for w in weights]
  tw = [torch.from_numpy(w) for w in weights]

  def chain(mm):
    def run(x, ws):
      for w in ws:
        x = mm(x, w)[:, :256]  # Each call depends on the last, as the layers of a step do.
      return x
    return jax.jit(run)

  kernel = chain(few_row_matmul.matmul)
  packed = chain(lambda x, w: few_row_matmul.matmul(x, w, packed=True, stream=True))
  jw_packed = [few_row_matmul.pack(w) for w in jw]
  xla = chain(lambda x, w: jnp.matmul(x, w, precision="highest"))
  out = []
  for m in rows:
    x = rng.standard_normal((m, 256)).astype(np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)

    def torch_run():
      with torch.inference_mode():
        y = tx
        for w in tw:
          y = torch.matmul(y, w)[:, :256]
      return y
    fns = {"kernel": lambda: kernel(jx, jw).block_until_ready(),
           "kernel_packed": lambda: packed(jx, jw_packed).block_until_ready(),
           "xla": lambda: xla(jx, jw).block_until_ready(), "torch": torch_run}
    med = interleaved_medians(fns, repeats)
    row = {"rows": m, **{f"{k}_us": round(v / NUM_WEIGHTS * 1e6, 1) for k, v in med.items()},
           "xla_over_kernel": round(med["xla"] / med["kernel"], 2),
           "kernel_over_packed": round(med["kernel"] / med["kernel_packed"], 2),
           "torch_over_packed": round(med["torch"] / med["kernel_packed"], 2)}
    log(json.dumps(row))
    out.append(row)
  return out


def step_costs(tokens, batches, iters):
  cfg = registry.get("lm/small")
  params = lm.random_params(cfg, 0)
  # Once, as a loader would (forced, so the row set is the same whatever the streaming limit).
  packed = jax.block_until_ready(lm.pack_weights(params, cfg, force=True))
  runs = {"packed": (packed, cfg), "auto": (params, cfg),
          "xla": (params, cfg.replace(matmul_impl="xla"))}
  out = []
  for batch in batches:
    base = {}
    for t in tokens:
      times = {}
      for name, (variables, config) in runs.items():  # Alternating per T (medians inside).
        times[name] = metrics.step_time(variables, config, batch=batch, context=64,
                                        cache_len=64 + 8 * max(tokens) + 8, iters=iters,
                                        tokens_per_step=t, steps=8)
      if t == 1:
        base = dict(times)
      row = {"batch": batch, "tokens_per_row": t,
             "packed_ms": round(times["packed"] * 1e3, 3),
             "kernel_ms": round(times["auto"] * 1e3, 3), "xla_ms": round(times["xla"] * 1e3, 3),
             "xla_over_kernel": round(times["xla"] / times["auto"], 2),
             "kernel_over_packed": round(times["auto"] / times["packed"], 2),
             "packed_in_one_token_steps": round(times["packed"] / base["packed"], 2),
             "kernel_in_one_token_steps": round(times["auto"] / base["auto"], 2),
             "xla_in_one_token_steps": round(times["xla"] / base["xla"], 2)}
      log(json.dumps(row))
      out.append(row)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  if few_row_matmul.unavailable_reason() is not None:
    raise SystemExit(f"the kernel is unavailable: {few_row_matmul.unavailable_reason()}")
  rows = (1, 5, 9) if args.quick else (1, 2, 5, 9, 17, 33, 65)
  tokens = (1, 5, 9) if args.quick else (1, 2, 5, 9, 17, 33, 65)
  result = {
      "benchmark": "few_row_matmul",
      "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__},
      "matmul_256x768": matmul_rows(rows, 5 if args.quick else 15),
      "lm_small_step": step_costs(tokens, (1,) if args.quick else (1, 4), 5 if args.quick else 9),
      "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
