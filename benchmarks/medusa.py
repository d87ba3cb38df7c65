"""Medusa decoding speed on CPU: autoregressive vs Medusa (greedy, typical) vs speculative decoding.

All on the same trained target (lm/small trained by `experiments.train --config=configs/lm/stdlib.py`):

  * `ar`: `effjax.generate.generate`, greedy (and sampled at the typical runs' temperature);
  * `medusa_greedy_t{N}`: Medusa-1 heads trained here on the frozen target, by default on
    self-distillation data (the target's own greedy continuations of training-corpus prompts;
    `--head_data=corpus` for corpus crops), trees of N tokens built by `best_tree` from the heads'
    per-rank accuracy measured on held-out data of the same kind; greedy verification, whose output
    is checked to equal `ar`'s token for token;
  * `medusa_greedy_tuned`: the tree size `effjax.medusa.tune.tune_tree` picks by timing Medusa
    decoding of 4 other held-out crops (calibration) with each candidate size on this machine;
  * `medusa_typical_t{N}`: typical acceptance (epsilon 0.09, delta 0.3) at temperature 0.7, on the
    tuned tree;
  * `spec_greedy_{scratch_g4,distilled_g8}`: `effjax.speculative.speculative_generate` with the
    corpus-trained draft (gamma 4) and the distilled draft (gamma 8), when their workdirs exist.

The same 4 prompts (64-byte crops of held-out corpus files) at batch 1 (one after another) and batch 4;
no EOS stop, so every row generates max_new tokens. Medians over repeats (after one compiling call);
speedup = ar median time / method median time (sampled runs against sampled ar). On CPU a tree pass
is compute-bound, so small trees pay off best; hence the tuned row.
The goal (from the issue): Medusa >= 2x wall-clock over autoregressive at batch 1.

    python benchmarks/medusa.py --target_workdir=/tmp/effjax/lm_stdlib \
        --draft_workdir=/tmp/effjax/lm_draft --distilled_workdir=/tmp/effjax/lm_draft_distilled
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
from effjax.medusa.tune import tune_tree  # noqa: E402
from effjax.models import registry  # noqa: E402
from effjax.models.lm import init_params, pack_weights  # noqa: E402
from effjax.speculative.decode import speculative_generate  # noqa: E402
from effjax.speculative.metrics import summarize  # noqa: E402

TUNE_SIZES = (4, 6, 8, 10, 12, 16, 24, 32)  # Candidates for the tuned tree (root included).
SD_PROMPT_LEN = 32  # Self-distillation: corpus prompts this long, continued by the target to 128.


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
  ap.add_argument("--draft_workdir", default="/tmp/effjax/lm_draft",
                  help="corpus-trained draft (lm/draft) for the speculative comparison")
  ap.add_argument("--distilled_workdir", default="/tmp/effjax/lm_draft_distilled",
                  help="distilled draft (lm/draft) for the speculative comparison")
  ap.add_argument("--head_steps", type=int, default=None)
  ap.add_argument("--head_data", choices=("self_distill", "corpus"), default="self_distill",
                  help="train the heads on the target's own greedy continuations or corpus crops")
  ap.add_argument("--max_new", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--tree_sizes", default=None, help="comma-separated, e.g. 16,32,64")
  ap.add_argument("--num_heads", type=int, default=6)
  args = ap.parse_args()
  q = args.quick
  head_steps = args.head_steps or (20 if q else 300)
  max_new = args.max_new or (48 if q else 128)
  repeats = args.repeats or (2 if q else 5)
  sizes = [int(s) for s in (args.tree_sizes or ("8,16" if q else "8,16,32,64")).split(",")]
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
  drafts = {name: d for name, d in (("scratch_g4", (args.draft_workdir, 4)),
                                    ("distilled_g8", (args.distilled_workdir, 8)))
            if have_target and os.path.isdir(os.path.join(d[0], "checkpoints"))}

  streams = mtrain.corpus_tokens(None if have_target else 40)
  t0 = time.perf_counter()
  hc = HeadsConfig.for_lm(cfg, num_heads=args.num_heads)
  optim = mtrain.default_optim()
  optim.lr = 3e-3
  if args.head_data == "self_distill":
    # Medusa's self-distillation: the target's own greedy continuations of training prompts.
    sd = lambda stream, n, seed: mtrain.self_distill_data(params, cfg, stream, num_seqs=n,
                                                          prompt_len=SD_PROMPT_LEN, seq_len=128,
                                                          seed=seed)
    train_batches = mtrain.array_batches(sd(streams["train"], 64 if q else 512, 0), 16, seed=0)
    val_batches = list(sd(streams["validation"], 64, 1).reshape(4, 16, 128))
  else:
    train_batches = mtrain.crop_batches(streams["train"], 16, 128, seed=0)
    val = mtrain.crop_batches(streams["validation"], 16, 128, seed=1)
    val_batches = [next(val) for _ in range(4)]
  _, heads, hist = mtrain.train(params, cfg, hc, train_batches, steps=head_steps, optim=optim,
                                log_every=max(head_steps // 4, 1))
  head_train_s = time.perf_counter() - t0  # Self-distillation data included.
  acc = mtrain.evaluate_heads(params, heads, cfg, hc, val_batches,
                              start=SD_PROMPT_LEN - 1 if args.head_data == "self_distill" else 0)
  rank_acc = np.asarray(acc["chain_rank_accuracy"])
  params = pack_weights(params, cfg)  # Decoding only from here: packed once, as a loader would.

  prompt_it = mtrain.crop_batches(streams["validation"], 4, prompt_len, seed=2)
  prompts4 = next(prompt_it)
  # The tuned tree is chosen on other random held-out crops, so it is not fitted to the measured
  # prompts.
  calibration = next(mtrain.crop_batches(streams["validation"], 4, prompt_len, seed=3))
  results, figures, tunings = [], {}, {}
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
    greedy = lambda tree: (lambda p: medusa_generate(params, heads, cfg, p, max_new_tokens=max_new,
                                                     tree=tree, heads_config=hc))
    calib = [calibration[i:i + batch] for i in range(0, 4, batch)]
    tuned, tuning = tune_tree(params, heads, cfg, rank_acc, calib, TUNE_SIZES, heads_config=hc)
    tunings[batch] = tuning
    for name, tree in ([(f"medusa_greedy_t{size}", best_tree(rank_acc, size)) for size in sizes]
                       + [("medusa_greedy_tuned", tuned)]):
      out, t = _timed(greedy(tree), sets, repeats)
      m = decode_metrics(out)
      m["lossless"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ar_out.tokens)))
      m["tree_size"] = tree.size
      rows.append((name, t, m))
    out, t = _timed(lambda p: medusa_generate(params, heads, cfg, p, max_new_tokens=max_new,
                                              tree=tuned, heads_config=hc, sampling=samp),
                    sets, repeats)
    rows.append((f"medusa_typical_t{tuned.size}", t, decode_metrics(out)))
    for d_name, (d_dir, gamma) in drafts.items():
      dcfg, dparams = _load(d_dir, "lm/draft")
      dparams = pack_weights(dparams, dcfg)
      out, t = _timed(lambda p: speculative_generate(params, cfg, dparams, dcfg, p, gamma=gamma,
                                                     max_new_tokens=max_new), sets, repeats)
      m = summarize(out.metrics, out.lengths)
      m = {k: m[k] for k in ("tau", "target_passes_per_token", "per_position_acceptance")}
      m["lossless"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ar_out.tokens)))
      rows.append((f"spec_greedy_{d_name}", t, m))
    for name, t, m in rows:
      # Sampled runs are compared with sampled autoregressive decoding at the same temperature.
      ref = ar_s_t if name.startswith(("ar_t", "medusa_typical")) else ar_t
      row = {"batch": batch, "method": name, "median_s": round(t, 4),
             "tokens_per_s": round(4 * max_new / t, 1), "speedup_vs_ar": round(ref / t, 3)}
      row.update({k: (round(v, 3) if isinstance(v, float) else
                      [round(x, 3) for x in v] if isinstance(v, list) else v)
                  for k, v in m.items() if k in ("tau", "target_passes_per_token", "tree_size",
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
      "drafts": {name: d[0] for name, d in drafts.items()},
      "head_data": args.head_data,
      "tree_tuning": {f"batch{b}": {k: ({s: round(x, 3) for s, x in v.items()}
                                        if isinstance(v, dict) else v) for k, v in t.items()}
                      for b, t in tunings.items()},  # Calibration seconds and tau per size.
      "max_new_tokens": max_new, "prompt_len": prompt_len, "repeats": repeats,
      "head_train_steps": head_steps, "head_train_s": round(head_train_s, 1),
      "head_top1": [round(a, 3) for a in acc["head_top1"]],
      "head_top5": [round(a, 3) for a in acc["head_top5"]],
      "head_chain_top1": [round(a[0], 3) for a in acc["chain_rank_accuracy"]],
      "results": results, "figures": figures,
      "best_medusa_greedy_speedup_b1": best_b1, "goal_2x_at_b1_met": best_b1 >= 2.0,
      "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
