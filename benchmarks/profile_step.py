"""Where one cached decode step's time goes, op by op, on this machine's XLA backend.

Runs `steps` cached decode steps of an LM inside one jitted loop (the harness of
`effjax.speculative.metrics.step_time`), records them with `jax.profiler`, and prints the compiled
ops grouped by kind (XLA fusion name without its number) and the slowest single ops with their
output shapes. This is how the 2026-11-29 session found that XLA:CPU transposed the attention output
projection on every step and that the KV-cache transposes cost 16% of a `large` batch-1 step
(`benchmarks/RESULTS.md`, "Where the time goes on CPU").

Caveat: the profiler gives each op's duration per thread, so ops that XLA splits across both cores
count up to twice; use the shares to find suspects and confirm with wall-clock A/B runs
(`python benchmarks/decode.py --skip_hf`).

    python benchmarks/profile_step.py                                 # lm/small, batch 1, 1 token
    python benchmarks/profile_step.py --model=lm/small --tokens=9     # a gamma-8 verification pass
    python benchmarks/profile_step.py --model=lm/draft --fused        # a fused draft step
    python benchmarks/profile_step.py --batch=8 --cache_len=256 --context=192
    python benchmarks/profile_step.py --model=large --batch=8 --cache_len=320 --context=192
                                            # benchmarks/decode.py's 126 MB model

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from effjax.models import random_params, registry  # noqa: E402
from effjax.models.lm import init_cache, pack_weights  # noqa: E402
from effjax.speculative.metrics import DecodeSteps  # noqa: E402

# Array shapes ("f32[1,256]{1,0}") and tuple shapes ("(f32[4,2,32]{2,1,0}, f32[4,2]{1,0})", the
# attention kernel's output and LSE).
_OP_LINE = re.compile(
    r"\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+?)(?:\{[^}]*\})? (fusion|copy|dot|custom-call)\(")
_LAYOUT = re.compile(r"\{[^}]*\}")


def op_shapes(hlo_text: str) -> dict[str, str]:
  """Compiled op name -> output shape, for the ops the CPU runtime executes as thunks."""
  return {m.group(1): _LAYOUT.sub("", m.group(2))
          for m in map(_OP_LINE.match, hlo_text.splitlines()) if m}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="lm/small",
                  help="a registry name (effjax.models.registry), or small/large from decode.py")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--tokens", type=int, default=1, help="new tokens per step (gamma + 1 to verify)")
  ap.add_argument("--context", type=int, default=64, help="filled cache slots before the steps")
  ap.add_argument("--cache_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=4, help="steps per compiled loop")
  ap.add_argument("--loops", type=int, default=10, help="profiled loop calls")
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--fused", action="store_true",
                  help="run the step as a fused speculative draft does (effjax.ops.fused_lm_step)")
  ap.add_argument("--no_pack", action="store_true",
                  help="keep the weights row-major (default: lm.pack_weights, as loaders do)")
  args = ap.parse_args(argv)
  if args.context + args.steps * args.tokens > args.cache_len:
    ap.error("context + steps * tokens exceeds cache_len; raise --cache_len")

  if args.model in ("small", "large"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode import MODELS  # noqa: E402  (benchmarks/decode.py's two sizes)
    cfg = MODELS[args.model]
  else:
    cfg = registry.get(args.model)
  params = random_params(cfg, 0)
  if not args.no_pack:
    params = pack_weights(params, cfg)  # A no-op for models the L2 caches hold.
  cache = init_cache(cfg, args.batch, args.cache_len).with_lengths(
      jnp.full((args.batch,), args.context, jnp.int32))
  tokens = jnp.zeros((args.batch, args.tokens), jnp.int32)
  steps = DecodeSteps(params, cache, tokens, config=cfg, steps=args.steps, fused=args.fused)
  run = lambda: jax.block_until_ready(steps())
  run()  # Compile and warm up outside the trace.
  run()
  shapes = op_shapes(steps.lower().compile().as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.loops):
        run()
    trace_file = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in shapes:
      per_op[e["name"]] += e["dur"]  # microseconds
  n_steps = args.loops * args.steps
  per_op = {name: us / n_steps for name, us in per_op.items()}
  by_kind = collections.Counter()
  for name, us in per_op.items():
    by_kind[re.sub(r"[.\d]+$", "", name)] += us
  total = sum(per_op.values())

  print(f"{args.model}, batch {args.batch}, {args.tokens} new token(s), cache {args.cache_len}: "
        f"ops sum to {total:.0f} us per step (per-thread durations)")
  print(f"{'kind':40s} {'us/step':>9s} {'share':>6s}")
  for kind, us in by_kind.most_common(args.top):
    print(f"{kind:40s} {us:9.1f} {us / total:6.1%}")
  print(f"\nslowest ops:\n{'op':40s} {'us/step':>9s}  output")
  slowest = sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]
  for name, us in slowest:
    print(f"{name:40s} {us:9.1f}  {shapes[name]}")
  print(json.dumps({
      "benchmark": "profile_step", "command": "python " + " ".join(sys.argv),
      "model": args.model, "batch": args.batch, "tokens": args.tokens, "fused": args.fused,
      "packed": "packed_weights" in params,
      "cache_len": args.cache_len, "ops_us_per_step": round(total, 1),
      "by_kind_us": {k: round(v, 1) for k, v in by_kind.most_common()},
      "slowest": [{"op": n, "us": round(u, 1), "shape": shapes[n]} for n, u in slowest]}))


if __name__ == "__main__":
  main()
