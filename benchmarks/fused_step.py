r"""A speculative draft's decode step on CPU: XLA's ops against the fused C++ step.

`effjax.ops.fused_lm_step` runs a small LM's whole cached decode step as one call on two cores;
speculative decoding uses it for drafts. Here both run the same random-weight model (lm/draft by
default) for `--steps` cached one-token steps inside one compiled loop (as the decoding loops run
them: no host dispatch per step), timed in alternation, at batch 1 and 4; the ratio is the
fused step's speedup. Greedy speculative rows of `benchmarks/speculative.py` also time the loop
with the unfused draft, for the end-to-end effect.

  python benchmarks/fused_step.py                      # lm/draft, ~20 s
  python benchmarks/fused_step.py --model=lm/tiny

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_timing import interleaved_medians  # noqa: E402
from effjax.models import random_params, registry  # noqa: E402
from effjax.models.lm import init_cache  # noqa: E402
from effjax.ops import fused_lm_step  # noqa: E402
from effjax.speculative.metrics import DecodeSteps  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="lm/draft")
  ap.add_argument("--batches", default="1,4")
  ap.add_argument("--context", type=int, default=128, help="filled cache slots before the steps")
  ap.add_argument("--steps", type=int, default=64, help="steps per compiled loop")
  ap.add_argument("--repeats", type=int, default=30)
  args = ap.parse_args(argv)
  cfg = registry.get(args.model)
  reason = fused_lm_step.unsupported_reason(cfg)
  if reason is not None:
    sys.exit(f"the fused step does not serve {args.model}: {reason}")
  params = random_params(cfg, 0)
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    cache = init_cache(cfg, batch, args.context + args.steps).with_lengths(
        jnp.full((batch,), args.context, jnp.int32))
    tokens = jnp.zeros((batch, 1), jnp.int32)
    steps = DecodeSteps(params, cache, tokens, config=cfg, steps=args.steps)
    run = lambda fused: jax.block_until_ready(steps(fused=fused))
    sec = interleaved_medians({"xla": functools.partial(run, False),
                               "fused": functools.partial(run, True)}, args.repeats)
    row = {"batch": batch, "xla_us_per_step": round(sec["xla"] / args.steps * 1e6, 1),
           "fused_us_per_step": round(sec["fused"] / args.steps * 1e6, 1),
           "speedup": round(sec["xla"] / sec["fused"], 3)}
    rows.append(row)
    print(f"{args.model} batch {batch}: XLA {row['xla_us_per_step']} us/step, fused "
          f"{row['fused_us_per_step']} us/step, {row['speedup']}x", flush=True)
  print(json.dumps({"benchmark": "fused_step", "command": "python " + " ".join(sys.argv),
                    "model": args.model, "context": args.context, "steps": args.steps,
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                               f"jax {jax.__version__}", "rows": rows}))


if __name__ == "__main__":
  main()
