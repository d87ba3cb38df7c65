r"""The main job: the whole inference-efficiency study on the embedded CPython-stdlib corpus.

  python -m experiments.study --config=configs/study/stdlib.py --workdir=runs/study

Steps (each cached in WORKDIR/<step>/DONE.json; a rerun skips finished steps, a killed step resumes
from its checkpoints): train the target (lm/small) -> distil drafts (lm/draft: a corpus-trained
baseline, one distilled on-policy for sampling, one on the target's greedy text for greedy
decoding) -> train Medusa-1 heads on the frozen target -> benchmark
autoregressive vs speculative (greedy and temperature 1, several gamma, batch 1 and 4) vs Medusa
(greedy and typical) -> report (WORKDIR/report/report.html, report.json, PNG plots).

  On an AMD EPYC (Zen 4) VM (2026-11-30 19:16 UTC, fresh clone, 10.6 min): batch 1 greedy
  speculative 1.51x with the greedy-text draft (gamma 8, tau 8.0), Medusa-1 1.51x: verification
  passes cost 2.7-2.9 one-token steps there (benchmarks/RESULTS.md, "A new machine"). The figures
  below are an Intel Xeon VM's.
  Latest there (2026-11-30, three drafts): 13.1 min alone in a fresh clone at 17:51 UTC; batch 1 greedy
  speculative 2.53x with the greedy-text draft (gamma 8, tau 7.6), 2.07x with the scratch one
  (gamma 6), Medusa-1 2.77x. At 15:57: 13.4 min (install 1.3 min, target 2.7, drafts 3.3, Medusa
  2.3, benchmark + report 3.9); 2.50x / 2.14x / 2.53x.
  Hardware: 2 CPU cores (idle). Runtime: 11.3 min in a fresh clone at 07:29, install (1.2 min)
  included: target 148 s, drafts 145 s, Medusa 123 s, benchmark + report 3.2 min; 14.1 min at
  10:39 on a slower machine (target 169 s, drafts 177 s, Medusa 154 s, benchmark + report 4 min);
  8.4 min at 06:11 with corpus-trained Medusa heads, a fixed tree and a faster machine; a rerun takes 2 s (every step
  cached; a step whose config changed runs again in a fresh directory, the old one kept beside it).
  Result (2026-11-30 07:29 UTC; benchmarks/RESULTS.md): target 2.81 validation bits per byte; at
  batch 1 (4 prompts in turn) Medusa-1 greedy 2.70x over autoregressive (six heads trained on the
  target's own greedy continuations, tree of 8 tokens picked by timing trees of 4-32, tau 6.8),
  typical acceptance at T = 1 2.50x over sampled autoregressive decoding at T = 1; greedy
  speculative decoding 2.25x (scratch draft, gamma 8, tau 6.1), 1.46x with the distilled draft
  (gamma 4); exact sampling at temperature 1 up to 1.72x (distilled draft, gamma 4). A second
  fresh clone at 08:14 (11.9 min) measured the same rows at 2.58x / 2.51x / 1.72x / 1.18x / 1.55x,
  and one at 10:39 (lm/small streamed and packed) 3.32x / 2.27x / 2.25x / 1.47x / 1.23x, with
  Medusa at batch 4 1.91x.
  On a CPU the (gamma + 1)-token verification pass cost 0.9-1.5 target steps at batch 1 in the
  07:29 run (up to 2.2 in others) and 1.3-3.4 at batch 4, which the report's second prediction
  accounts for.

Variants:

  python -m experiments.study --config=configs/study/stdlib.py:tiny --workdir=/tmp/study_tiny
    Every step at smoke size (tiny models, a few steps): seconds to a minute; the tests run it.

  python -m experiments.study --config=configs/study/stdlib.py:accelerator --workdir=runs/study_big
    The same pipeline at a larger scale for a GPU/TPU (lm/base target, longer training, bigger
    batches). Hardware: one accelerator. Runtime and result: not measured yet (no accelerator here).
"""

import importlib.util
import os

import ml_collections

_VARIANTS = ("default", "tiny", "accelerator")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _config_of(relpath: str, arg=None) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(_HERE), relpath)
  spec = importlib.util.spec_from_file_location("study_sub_" + relpath.replace("/", "_")[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  """Returns the study config of variant `arg` (None or one of `_VARIANTS`)."""
  arg = arg or "default"
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/study/stdlib.py; choose one of "
                     f"{_VARIANTS}")
  c = ml_collections.ConfigDict()
  c.task = "study"
  c.target = _config_of("lm/stdlib.py", "tiny" if arg == "tiny" else None)
  c.drafts = _config_of("distill/drafts.py", "tiny" if arg == "tiny" else None)
  # A corpus-trained baseline and two distilled drafts, one per decoding mode (DistillSpec: the
  # best distillation data depends on how the target decodes): on-policy TVD on the draft's own
  # samples at T = 1, for sampling; sequence-level KD on the target's greedy continuations, for
  # greedy decoding. The greedy-text draft is benchmarked on greedy rows only (at T = 1 it accepts
  # little: tau 2.2 at gamma 4 in drafts_results.json's evaluation).
  c.drafts.methods = ("scratch", "onpolicy_tvd", "seqkd")
  c.drafts.seqkd.temperature = 0.0
  c.medusa = _config_of("medusa/medusa1.py", "tiny" if arg == "tiny" else None)
  c.bench = ml_collections.ConfigDict(dict(
      prompt_len=64, max_new_tokens=128, batch_sizes=(1, 4), samplings=("greedy", "t=1"),
      gammas=(1, 2, 4, 6, 8), repeats=3, seed=0,
      # 0: of medusa_tree_sizes, the one that decodes calibration prompts fastest here.
      medusa_tree_size=0, medusa_tree_sizes=(4, 6, 8, 12, 16, 32),
      # Drafts benchmarked on some samplings only (any draft not named here: on all of them).
      draft_samplings={"seqkd": ("greedy",)}))
  for sub in (c.target, c.drafts, c.medusa):
    sub.progress_bar = True
  if arg == "tiny":
    c.medusa.allow_random_backbone = False
    c.bench.update(dict(prompt_len=16, max_new_tokens=12, batch_sizes=(1,), gammas=(2,),
                        medusa_tree_sizes=(4, 8), repeats=1))
    for sub in (c.target, c.drafts, c.medusa):
      sub.progress_bar = False
  if arg == "accelerator":
    c.target.model = "lm/base"
    c.target.num_steps = 20000
    c.target.batch_size = 64
    c.target.seq_len = 512
    c.drafts.teacher.model = "lm/base"
    c.drafts.student.model = "lm/small"
    c.drafts.pretrain_steps = 4000
    c.drafts.num_steps = 2000
    c.medusa.backbone = "lm/base"
    c.medusa.num_steps = 2000
    c.bench.medusa_tree_sizes = (8, 16, 32, 64)  # Tree passes cost ~one step on an accelerator.
    c.bench.batch_sizes = (1, 4, 16)
  return c
