"""Medusa decoding speed on CPU: autoregressive vs Medusa (greedy, typical) vs speculative decoding.

All on the same trained target (lm/small trained by `experiments.train --config=configs/lm/stdlib.py`):

  * `ar`: `effjax.generate.generate`, greedy (and sampled at the typical runs' temperature);
  * `medusa_greedy_t{16,32,64}`: Medusa-1 heads trained here on the frozen target (corpus crops),
    trees built by `best_tree` from the heads' measured per-rank accuracy; greedy verification, whose
    output is checked to equal `ar`'s token for token;
  * `medusa_typical_t32`: typical acceptance (epsilon 0.09, delta 0.3) at temperature 0.7;
  * `spec_greedy_g4`: `effjax.speculative.speculative_generate` with the draft (lm/draft), gamma 4.

The same 4 prompts (64-byte crops of held-out corpus files) at batch 1 (one after another) and batch 4;
no EOS stop, so every row generates max_new tokens. Medians over repeats (after one compiling call);
speedup = ar median time / method median time (sampled runs against sampled ar). Also a tree of 8,
since on CPU a tree pass is compute-bound and small trees may pay off best.
The goal (from the issue): Medusa >= 2x wall-clock over autoregressive at batch 1.

    python benchmarks/medusa.py --target_workdir=/tmp/effjax/lm_stdlib \
        --draft_workdir=/tmp/effjax/lm_draft            # full run
    python benchmarks/medusa.py --quick                   # under 2 minutes; see --help

Without a target checkpoint, --quick falls back to a random lm/tiny (figures then only show the
machinery works; acceptance is meaningless). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from effjax.generate import SamplingParams  # noqa: E402
from effjax.generate.engine import generate as ar_generate  # noqa: E402
from effjax.medusa import HeadsConfig, best_tree, decode_metrics  # noqa: E402
from effjax.medusa import generate as medusa_generate  # noqa: E402
from effjax.medusa import train as mtrain  # noqa: E402
from effjax.models import registry  # noqa: E402
from effjax.models.lm import init_params, pack_weights  # noqa: E402


def _load(workdir, name):
  from effjax.train.checkpoint import load_params
  cfg = registry.get(name)
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return cfg, load_params(os.path.abspath(workdir), abstract)


def _merge(outs):
  """One output from several single-prompt runs: [B] fields concatenated, counters summed."""
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])
                      if np.ndim(xs[0]) else sum(np.asarray(x) for x in xs), *outs)


def _timed(fn, prompt_sets, repeats):
  """Runs fn(prompts) for each prompt set; returns (merged output, median seconds of all sets)."""
  run = lambda: [fn(p) for p in prompt_sets]
  jax.block_until_ready([o.tokens for o in run()])  # compile + warm
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    outs = run()
    jax.block_until_ready([o.tokens for o in outs])
    times.append(time.perf_counter() - t)
  return _merge(outs), statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--target_workdir", default="/tmp/effjax/lm_stdlib")
  ap.add_argument("--draft_workdir", default="/tmp/effjax/lm_draft")
  ap.add_argument("--head_steps", type=int, default=None)
  ap.add_argument("--max_new", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--tree_sizes", default=None, help="comma-separated, e.g. 16,32,64")
  ap.add_argument("--num_heads", type=int, default=4)
  args = ap.parse_args()
  q = args.quick
  head_steps = args.head_steps or (20 if q else 100)
  max_new = args.max_new or (48 if q else 128)
  repeats = args.repeats or (2 if q else 5)
  sizes = [int(s) for s in (args.tree_sizes or ("16,64" if q else "8,16,32,64")).split(",")]
  prompt_len = 64

  have_target = os.path.isdir(os.path.join(args.target_workdir, "checkpoints"))
  if have_target:
    cfg, params = _load(args.target_workdir, "lm/small")
  elif q:
    cfg = registry.get("lm/tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    print(f"no target in {args.target_workdir}: random lm/tiny smoke run", file=sys.stderr)
  else:
    raise SystemExit(f"no trained target in {args.target_workdir}/checkpoints; train it with "
                     "python -m experiments.train --config=configs/lm/stdlib.py "
                     f"--workdir={args.target_workdir} (or pass --quick)")
  have_draft = have_target and os.path.isdir(os.path.join(args.draft_workdir, "checkpoints"))

  streams = mtrain.corpus_tokens(None if have_target else 40)
  t0 = time.perf_counter()
  hc = HeadsConfig.for_lm(cfg, num_heads=args.num_heads)
  optim = mtrain.default_optim()
  optim.lr = 3e-3
  _, heads, hist = mtrain.train(params, cfg, hc,
                                mtrain.crop_batches(streams["train"], 16, 128, seed=0),
                                steps=head_steps, optim=optim, log_every=max(head_steps // 4, 1))
  head_train_s = time.perf_counter() - t0
  val = mtrain.crop_batches(streams["validation"], 16, 128, seed=1)
  acc = mtrain.evaluate_heads(params, heads, cfg, hc, [next(val) for _ in range(4)])
  rank_acc = np.asarray(acc["rank_accuracy"])
  params = pack_weights(params, cfg)  # Decoding only from here: packed once, as a loader would.

  prompt_it = mtrain.crop_batches(streams["validation"], 4, prompt_len, seed=2)
  prompts4 = next(prompt_it)
  results, figures = [], {}
  for batch in (1, 4):
    # Batch 1 decodes the 4 prompts one after another (less variance than a single prompt).
    sets = [prompts4[i:i + 1] for i in range(4)] if batch == 1 else [prompts4]
    run_ar = lambda p, s=SamplingParams(): ar_generate(params, cfg, p, max_new_tokens=max_new,
                                                       sampling=s)
    ar_out, ar_t = _timed(run_ar, sets, repeats)
    rows = [("ar", ar_t, {})]
    samp = SamplingParams(temperature=0.7)
    _, ar_s_t = _timed(lambda p: run_ar(p, samp), sets, repeats)
    rows.append(("ar_t0.7", ar_s_t, {}))
    for size in sizes:
      tree = best_tree(rank_acc, size)
      out, t = _timed(lambda p: medusa_generate(params, heads, cfg, p, max_new_tokens=max_new,
                                                tree=tree, heads_config=hc), sets, repeats)
      m = decode_metrics(out)
      m["lossless"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ar_out.tokens)))
      rows.append((f"medusa_greedy_t{size}", t, m))
    tree = best_tree(rank_acc, 32 if 32 in sizes or not q else sizes[0])
    out, t = _timed(lambda p: medusa_generate(params, heads, cfg, p, max_new_tokens=max_new,
                                              tree=tree, heads_config=hc, sampling=samp),
                    sets, repeats)
    rows.append((f"medusa_typical_t{tree.size}", t, decode_metrics(out)))
    if have_draft:
      from effjax.speculative.decode import speculative_generate
      from effjax.speculative.metrics import summarize
      dcfg, dparams = _load(args.draft_workdir, "lm/draft")
      dparams = pack_weights(dparams, dcfg)
      out, t = _timed(lambda p: speculative_generate(params, cfg, dparams, dcfg, p, gamma=4,
                                                     max_new_tokens=max_new), sets, repeats)
      m = summarize(out.metrics, out.lengths)
      m = {k: m[k] for k in ("tau", "target_passes_per_token", "per_position_acceptance")}
      m["lossless"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ar_out.tokens)))
      rows.append(("spec_greedy_g4", t, m))
    for name, t, m in rows:
      # Sampled runs are compared with sampled autoregressive decoding at the same temperature.
      ref = ar_s_t if name.startswith(("ar_t", "medusa_typical")) else ar_t
      row = {"batch": batch, "method": name, "median_s": round(t, 4),
             "tokens_per_s": round(4 * max_new / t, 1), "speedup_vs_ar": round(ref / t, 3)}
      row.update({k: (round(v, 3) if isinstance(v, float) else
                      [round(x, 3) for x in v] if isinstance(v, list) else v)
                  for k, v in m.items() if k in ("tau", "target_passes_per_token",
                                                  "per_position_acceptance", "lossless")})
      results.append(row)
      print(json.dumps(row), file=sys.stderr)
      figures[f"b{batch}_{name}_speedup"] = row["speedup_vs_ar"]
  best_b1 = max(r["speedup_vs_ar"] for r in results
                if r["batch"] == 1 and r["method"].startswith("medusa_greedy"))
  summary = {
      "benchmark": "medusa", "command": " ".join(["python"] + sys.argv),
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "jax": jax.__version__, "backend": jax.default_backend()},
      "target": "lm/small (trained)" if have_target else "lm/tiny (random, smoke)",
      "draft": "lm/draft (trained)" if have_draft else None,
      "max_new_tokens": max_new, "prompt_len": prompt_len, "repeats": repeats,
      "head_train_steps": head_steps, "head_train_s": round(head_train_s, 1),
      "head_top1": [round(a, 3) for a in acc["head_top1"]],
      "head_top5": [round(a, 3) for a in acc["head_top5"]],
      "results": results, "figures": figures,
      "best_medusa_greedy_speedup_b1": best_b1, "goal_2x_at_b1_met": best_b1 >= 2.0,
      "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
