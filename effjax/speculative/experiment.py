"""The speculative-decoding experiment: trained target and drafts, every gamma, a table and a view.

`run(config, workdir)` loads the target and each draft (Orbax workdirs written by
`experiments/train.py`, or `random:SEED` for smoke runs), takes prompts from held-out CPython-stdlib
files, and for every draft x temperature x batch size x gamma (plus adaptive gamma) measures the
speculative decoder against the target's own autoregressive decoding (`effjax.generate.generate`, the
same engine, same prompts, median of `timing_reps`). It reports TAR, tau, alpha, per-position
acceptance, target passes per token, the measured cost ratio c, and the predicted speedup next to the
measured one; greedy rows also say whether the output equals plain greedy (it must). It writes
`speculative_results.json` and the token-level view `speculative_view.html` into the workdir.

`experiments/speculative.py` is the command-line front end; `benchmarks/speculative.py` reuses the
loaders and timers here.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from effjax.data.tokenizer import ByteTokenizer
from effjax.generate.engine import generate
from effjax.generate.sampling import SamplingParams
from effjax.models import registry
from effjax.models.lm import LMConfig, init_params, pack_weights
from effjax.speculative import metrics as metrics_lib
from effjax.speculative import view
from effjax.speculative.decode import check_pair, speculative_generate

log = logging.getLogger("effjax.speculative")

TABLE_COLUMNS = ["draft", "T", "batch", "gamma", "alpha", "tar", "tau", "passes_per_tok",
                 "cost_ratio", "pred_speedup", "speedup", "spec_ms", "ar_ms", "lossless"]


def load_lm(spec, where: str = "config.target") -> tuple[LMConfig, Any]:
  """(config, params) of an LM declared as {model, overrides, checkpoint}.

  `checkpoint` is a training workdir (its newest checkpoint is read) or "random:SEED" (smoke runs).
  """
  for field in ("model", "checkpoint"):
    if field not in spec:
      raise ValueError(f"{where}.{field} is missing; declare an LM as "
                       "{model: 'lm/small', overrides: {}, checkpoint: '/path/to/workdir'}")
  cfg = registry.get(spec["model"], **dict(spec.get("overrides", None) or {}))
  source = str(spec["checkpoint"])
  if source.startswith("random:"):
    seed = int(source.split(":", 1)[1])
    return cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))
  if not os.path.isdir(source):
    raise FileNotFoundError(f"{where}.checkpoint={source!r} is not a directory; train it first "
                            "(python -m experiments.train --config=configs/lm/stdlib.py[:draft] "
                            f"--workdir={source}) or use 'random:0' for a smoke run")
  from effjax.train.checkpoint import load_params  # Lazy: Orbax is slow to import.
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # {'params': ...}
  return cfg, load_params(os.path.abspath(source), abstract)


def corpus_prompts(num: int, prompt_len: int, seed: int = 0, val_fraction: float = 0.05,
                   max_docs: Optional[int] = 200) -> tuple[np.ndarray, list[str]]:
  """[num, prompt_len] byte-token windows from held-out stdlib files, and their text.

  Windows start at a seeded offset inside one document, so every prompt is real, unseen code.
  """
  from effjax.data.stdlib_corpus import load_corpus
  docs, _ = load_corpus(val_fraction=val_fraction, max_docs=max_docs)
  docs = [d for d in docs if d.split != "train" and len(d.text.encode("utf-8")) > prompt_len + 1]
  if not docs:
    raise ValueError(f"no held-out stdlib document is longer than prompt_len={prompt_len}; lower it")
  rng = np.random.default_rng(seed)
  out, texts = np.zeros((num, prompt_len), np.int32), []
  for i in range(num):
    data = docs[int(rng.integers(len(docs)))].text.encode("utf-8")
    start = int(rng.integers(len(data) - prompt_len))
    out[i] = np.frombuffer(data[start:start + prompt_len], np.uint8)
    texts.append(data[start:start + prompt_len].decode("utf-8", errors="replace"))
  return out, texts


def median_time(fn: Callable[[], Any], reps: int) -> float:
  """Median wall seconds of `fn()` over `reps` runs after one warm-up (compilation) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(max(1, reps)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
          "jax": jax.__version__}


def measure(target, t_cfg, draft, d_cfg, prompts, *, gamma, max_new_tokens, sampling, rng, reps,
            adaptive=False, cost_ratio=None, verify_cost=1.0, ar_time=None,
            ar_tokens=None) -> dict:
  """One table row: speculative vs autoregressive time and the loop's metrics."""
  run = lambda: speculative_generate(target, t_cfg, draft, d_cfg, prompts,
                                     gamma=gamma, max_new_tokens=max_new_tokens, sampling=sampling,
                                     rng=rng, adaptive=adaptive, cost_ratio=cost_ratio,
                                     verify_cost=verify_cost)
  spec_t = median_time(lambda: run().tokens, reps)
  out = run()
  if ar_time is None:
    ar_time = median_time(lambda: generate(target, t_cfg, prompts, max_new_tokens=max_new_tokens,
                                           sampling=sampling, rng=rng).tokens, reps)
  row = metrics_lib.summarize(out.metrics, out.lengths, cost_ratio=cost_ratio,
                              verify_cost=verify_cost if adaptive else None,
                              measured_speedup=ar_time / spec_t)
  row.update(spec_ms=spec_t * 1e3, ar_ms=ar_time * 1e3)
  if ar_tokens is not None:
    row["lossless"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ar_tokens)))
  return row


def run(config, workdir: str) -> dict:
  """Runs the whole experiment; returns (and writes) the results dict."""
  os.makedirs(workdir, exist_ok=True)
  t_cfg, target = load_lm(config.target, "config.target")
  drafts = {name: load_lm(spec, f"config.drafts.{name}") for name, spec in config.drafts.items()}
  # Decoding only from here: the few-row kernel's packed weights, made once.
  target = pack_weights(target, t_cfg)
  drafts = {name: (d_cfg, pack_weights(d, d_cfg)) for name, (d_cfg, d) in drafts.items()}
  tok = ByteTokenizer()
  for name, (d_cfg, _) in drafts.items():
    check_pair(t_cfg, d_cfg, max(config.gammas), target_tokenizer=tok, draft_tokenizer=tok)
  max_batch = max(config.batch_sizes)
  all_prompts, texts = corpus_prompts(max(max_batch, config.view_rows), config.prompt_len,
                                      seed=config.seed, max_docs=config.prompt_docs)
  rng = jax.random.key(config.seed)
  rows = []
  for batch in config.batch_sizes:
    prompts = all_prompts[:batch]
    if config.cost_iters > 0:
      costs = {name: metrics_lib.measure_cost_ratio(
          target, t_cfg, d_params, d_cfg, batch=batch, context=config.prompt_len,
          cache_len=config.prompt_len + config.max_new_tokens + 16, iters=config.cost_iters)
          for name, (d_cfg, d_params) in drafts.items()}
    else:  # Smoke runs: the parameter-count ratio stands in for the measured c.
      costs = {name: {"cost_ratio": d_cfg.num_params() / t_cfg.num_params()}
               for name, (d_cfg, _) in drafts.items()}
    verify_cost = 1.0  # The adaptive rule's price of a verification pass, measured when timing.
    if config.adaptive and config.cost_iters > 0:
      verify_cost = metrics_lib.verify_cost_ratio(
          target, t_cfg, max(config.gammas), batch=batch, context=config.prompt_len,
          cache_len=config.prompt_len + config.max_new_tokens + 16, iters=config.cost_iters)
    for temp in config.temperatures:
      sampling = SamplingParams(temperature=float(temp), top_p=float(config.top_p))
      ar_out = generate(target, t_cfg, prompts, max_new_tokens=config.max_new_tokens,
                        sampling=sampling, rng=rng)
      ar_time = median_time(lambda: generate(
          target, t_cfg, prompts, max_new_tokens=config.max_new_tokens, sampling=sampling,
          rng=rng).tokens, config.timing_reps)
      for name, (d_cfg, d_params) in drafts.items():
        c = costs[name]["cost_ratio"]
        settings = [(g, False) for g in config.gammas]
        if config.adaptive:
          settings.append((max(config.gammas), True))
        for gamma, adaptive in settings:
          row = measure(target, t_cfg, d_params, d_cfg, prompts, gamma=gamma,
                        max_new_tokens=config.max_new_tokens, sampling=sampling, rng=rng,
                        reps=config.timing_reps, adaptive=adaptive, cost_ratio=c,
                        verify_cost=verify_cost, ar_time=ar_time,
                        ar_tokens=ar_out.tokens if sampling.greedy else None)
          row.update(draft=name, T=float(temp), batch=batch,
                     gamma=f"{gamma}a" if adaptive else gamma,
                     pred_speedup=row.get("predicted_speedup", float("nan")),
                     speedup=row["measured_speedup"],
                     passes_per_tok=row["target_passes_per_token"])
          if "lossless" not in row:
            row["lossless"] = "n/a"
          rows.append(row)
          log.info("%s", {k: row[k] for k in TABLE_COLUMNS})
  table = metrics_lib.format_table(rows, TABLE_COLUMNS)
  print(table, flush=True)

  # The token-level view: one recorded run per draft at `view_gamma`.
  sections = []
  for name, (d_cfg, d_params) in drafts.items():
    sampling = SamplingParams(temperature=float(config.view_temperature))
    out = speculative_generate(target, t_cfg, d_params, d_cfg, all_prompts[:config.view_rows],
                               gamma=config.view_gamma, max_new_tokens=config.max_new_tokens,
                               sampling=sampling, rng=rng, record_rounds=True)
    print(f"\n--- draft {name} (gamma {config.view_gamma}, T {config.view_temperature}) ---\n"
          + view.render_terminal(out.rounds, 0, prompt=texts[0]), flush=True)
    sections.append(dict(record=out.rounds, prompts=texts[:config.view_rows],
                         heading=f"draft {name}: gamma {config.view_gamma}, "
                                 f"temperature {config.view_temperature}",
                         summary=metrics_lib.summarize(out.metrics, out.lengths)))
  html_path = os.path.join(workdir, "speculative_view.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(view.render_html_sections(sections))
  results = {"config": json.loads(config.to_json()), "machine": machine(), "rows": rows,
             "view_html": html_path}
  path = os.path.join(workdir, "speculative_results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1, default=float)
  print(f"\nwrote {path} and {html_path}", flush=True)
  return results
