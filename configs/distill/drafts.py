r"""Speculative-decoding drafts distilled from the trained target LM (DistillSpec's comparison).

Needs the target first (configs/lm/stdlib.py, lm/small on the CPython-stdlib corpus):

  python -m experiments.train --config=configs/lm/stdlib.py --workdir=/tmp/effjax/lm_stdlib
  python -m experiments.distill --config=configs/distill/drafts.py --workdir=/tmp/effjax/drafts

Every draft is lm/draft (0.4M parameters), pretrained on the corpus for `pretrain_steps`, then given
`num_steps` more steps of one method: more corpus cross-entropy (`scratch`, the undistilled baseline),
offline forward KL, sequence-level KD on a target-written TFDS corpus, or on-policy KD with FKL, RKL
or TVD. The table (workdir/drafts_results.json) gives each draft's alpha, TAR, tau, predicted and
measured speedup against the target, and the gain over `scratch`.

  Hardware: 2 CPU cores (idle). Runtime: 7.2 min (pretraining 105 s, 41-63 s per method, the
  evaluation included). Result (2026-11-29, target from the main job): every distilled draft beats
  the undistilled `scratch` one; tau at gamma 4, greedy: scratch 3.46, offline FKL 4.41, seqKD 4.27,
  on-policy FKL / RKL / TVD 4.34 (+22-32% in tau, greedy and T = 1; table in benchmarks/RESULTS.md).

Variants:

  python -m experiments.distill --config=configs/distill/drafts.py:tiny --workdir=/tmp/effjax/drafts_tiny
    Random lm/tiny target ("random:0"), lm/tiny drafts with one layer, a few steps per method, 40
    corpus documents: a smoke run for the tests; its numbers mean nothing.

Point at another target with `--config.teacher.checkpoint=/path/to/workdir`.
"""

import ml_collections

from effjax import sharding
from effjax.data.config import default_data_config

_VARIANTS = ("default", "tiny")
METHODS = ("scratch", "offline_fkl", "seqkd", "onpolicy_fkl", "onpolicy_rkl", "onpolicy_tvd")


def get_config(arg=None):
  """Returns the config of variant `arg` (None or one of `_VARIANTS`)."""
  arg = arg or "default"
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/distill/drafts.py; choose one of "
                     f"{_VARIANTS}")
  c = ml_collections.ConfigDict()
  c.task = "distill_drafts"
  # The target is declared like the draft; it is loaded from its workdir and never trained.
  c.teacher = ml_collections.ConfigDict(dict(model="lm/small", overrides={},
                                             checkpoint="/tmp/effjax/lm_stdlib"))
  c.student = ml_collections.ConfigDict(dict(model="lm/draft", overrides={}, init="scratch"))
  c.methods = METHODS
  c.data = default_data_config()
  c.seq_len = 128
  c.batch_size = 16
  c.pretrain_steps = 400
  c.num_steps = 150  # per method, after pretraining
  c.kd = ml_collections.ConfigDict(dict(temperature=1.0))
  c.onpolicy = ml_collections.ConfigDict(dict(prompt_len=64, gen_len=32, sample_temperature=1.0))
  c.seqkd = ml_collections.ConfigDict(dict(num_sequences=1024, prompt_len=32, gen_len=96,
                                           temperature=1.0, gen_batch_size=64,
                                           continuation_only=True))
  c.spec_eval = ml_collections.ConfigDict(dict(num_prompts=8, prompt_len=64, max_new_tokens=64,
                                               gamma=4, temperatures=(0.0, 1.0), timing_reps=3))
  c.eval_batches = 8
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=40, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95,
      final_lr_fraction=0.1))
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 200
  c.keep_checkpoints = 1
  c.seed = 0
  c.progress_bar = False
  c.async_checkpoints = True
  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh_shape = (-1, 1, 1)
  c.sharding.rules = sharding.DEFAULT_RULES
  if arg == "tiny":
    c.teacher.model = "lm/tiny"
    c.teacher.checkpoint = "random:0"
    c.student.model = "lm/tiny"
    c.student.overrides = {"num_layers": 1}
    c.data.max_docs = 40
    c.seq_len = 32
    c.batch_size = 4
    c.pretrain_steps = 2
    c.num_steps = 2
    c.onpolicy.prompt_len = 8
    c.onpolicy.gen_len = 4
    c.seqkd.num_sequences = 8
    c.seqkd.prompt_len = 8
    c.seqkd.gen_len = 8
    c.seqkd.gen_batch_size = 8
    c.spec_eval.num_prompts = 2
    c.spec_eval.prompt_len = 8
    c.spec_eval.max_new_tokens = 8
    c.spec_eval.gamma = 2
    c.spec_eval.temperatures = (0.0,)
    c.spec_eval.timing_reps = 0
    c.eval_batches = 2
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.async_checkpoints = False
  return c
