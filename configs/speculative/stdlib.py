r"""Speculative decoding of the stdlib LM (lm/small) with a small draft (lm/draft), on CPU.

Train the target and the draft with the trainer's configs first (same corpus, same byte tokenizer):

  python -m experiments.train --config=configs/lm/stdlib.py --workdir=/tmp/effjax/lm_stdlib
  python -m experiments.train --config=configs/lm/stdlib.py:draft --workdir=/tmp/effjax/lm_draft

then run every gamma, temperature and batch size against the target's own autoregressive decoding:

  python -m experiments.speculative --config=configs/speculative/stdlib.py --workdir=/tmp/effjax/spec

It prints a table (alpha, TAR, tau, target passes per token, cost ratio c, predicted and measured
speedup, and for greedy rows whether the output equals plain greedy) and writes
speculative_results.json and the token-level view speculative_view.html into the workdir.

  Hardware: 2 CPU cores (idle). Runtime: 5.0 min for the `:distilled` variant below (2 drafts x 7
  gamma settings x 2 temperatures x batch 1 and 4, with the main job's checkpoints). Result
  (2026-11-29): batch 1 is the first held-out prompt alone; greedy, the distilled draft reaches
  2.42x at gamma 8 (alpha 0.95, tau 8.0) and the scratch draft 1.69x at gamma 3; at T = 1, 1.49x
  and 1.07x; batch 4 greedy 1.52x (distilled, gamma 3). Every greedy row equals plain greedy.
  Speedups depend on the prompts: benchmarks/speculative.py averages 4 prompts and records 1.89x
  for the same distilled draft (benchmarks/RESULTS.md).

Variants (the arg after the colon):

  python -m experiments.speculative --config=configs/speculative/stdlib.py:distilled --workdir=/tmp/effjax/spec_distilled
    Adds the distilled draft of configs/distill/drafts.py (run that first) beside the draft trained
    from scratch, so the table compares the two on the same prompts.

  python -m experiments.speculative --config=configs/speculative/stdlib.py:tiny --workdir=/tmp/effjax/spec_tiny
    Random lm/tiny target and a one-layer random draft, one gamma, tiny sizes: a smoke run for the
    tests (seconds); its speedups mean nothing.

Point at other checkpoints with `--config.target.checkpoint=DIR --config.drafts.scratch.checkpoint=DIR`.
"""

import ml_collections

_VARIANTS = ("default", "distilled", "tiny")


def _lm(model, checkpoint, **overrides):
  return ml_collections.ConfigDict(dict(model=model, overrides=overrides, checkpoint=checkpoint))


def get_config(arg=None):
  """Returns the config of variant `arg` (None or one of `_VARIANTS`)."""
  arg = arg or "default"
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/speculative/stdlib.py; choose one of "
                     f"{_VARIANTS}")
  c = ml_collections.ConfigDict()
  c.task = "speculative"
  c.target = _lm("lm/small", "/tmp/effjax/lm_stdlib")
  c.drafts = ml_collections.ConfigDict({"scratch": _lm("lm/draft", "/tmp/effjax/lm_draft")})
  c.gammas = (1, 2, 3, 4, 6, 8)
  c.adaptive = True  # Adds one adaptive-gamma row (gamma in 1..max(gammas)) per setting.
  c.temperatures = (0.0, 1.0)
  c.top_p = 1.0
  c.batch_sizes = (1, 4)
  c.prompt_len = 64
  c.max_new_tokens = 128
  c.timing_reps = 3
  c.cost_iters = 30  # Timed decode steps per model for the cost ratio c (0: parameter ratio).
  c.view_rows = 2
  c.view_gamma = 4
  c.view_temperature = 0.0
  c.prompt_docs = 200  # Held-out stdlib files read for prompts (per split, in path order).
  c.seed = 0
  if arg == "distilled":
    c.drafts.distilled = _lm("lm/draft", "/tmp/effjax/drafts/onpolicy_tvd")
  if arg == "tiny":
    c.target = _lm("lm/tiny", "random:0")
    c.drafts = ml_collections.ConfigDict({"scratch": _lm("lm/tiny", "random:1", num_layers=1)})
    c.gammas = (3,)
    c.adaptive = False
    c.batch_sizes = (2,)
    c.prompt_len = 8
    c.max_new_tokens = 12
    c.timing_reps = 1
    c.cost_iters = 0  # No timing: the parameter-count ratio stands in for c.
    c.view_rows = 2
    c.view_gamma = 3
    c.temperatures = (0.0,)
    c.view_temperature = 1.0
    c.prompt_docs = 20
  return c
