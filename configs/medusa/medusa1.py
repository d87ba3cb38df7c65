r"""Medusa-1: six heads (one residual block each) on the frozen stdlib target (lm/small).

  python -m experiments.train --config=configs/lm/stdlib.py --workdir=/tmp/effjax/lm_stdlib
  python -m experiments.train_medusa --config=configs/medusa/medusa1.py \
      --workdir=/tmp/effjax/medusa1 --config.backbone_workdir=/tmp/effjax/lm_stdlib

Data: self-distillation (Medusa's recipe when the backbone's training data is not at hand): 512
corpus prompts of 32 bytes continued greedily by the backbone to 128 bytes, so the heads learn what
the backbone will say when decoding. Accuracies are measured on held-out continuations of the same
kind, from the last prompt token on, and `chain_rank_accuracy` (each head scored only where the
heads before it were right) feeds the tree builder.

  Hardware: 2 CPU cores (idle). Runtime: 123 s as the main job's Medusa step in a fresh clone
  (2026-11-30 07:35 UTC: the data ~10 s, 300 steps of batch 16 x 128 bytes, evaluation). Result
  (that run's WORKDIR/medusa.json): heads 0-5 top-1 0.93 / 0.92 / 0.91 / 0.91 / 0.92 / 0.91 on
  held-out continuations, 0.93-0.99 given the earlier heads were right; on corpus text 0.36 / 0.31
  / 0.28 / 0.26 / 0.25 / 0.24 (the :corpus variant's heads: 0.40 / 0.35 / 0.32 / 0.31 for four
  heads). This small target's greedy continuations fall into loops within a few bytes (runs of
  spaces, "0", "the "), which is what makes them this predictable. Training uses every position,
  the prompts' corpus bytes included; accuracies count only what the backbone wrote. Decoding with
  these heads: benchmarks/RESULTS.md, "Medusa" (batch 1 greedy 2.5-2.95x with a tree of 8).

Variants:
  :tiny       lm/tiny with a random backbone (no checkpoint needed), 40 documents, 4 steps:
              the smoke run the tests use (seconds).
  :corpus     heads trained on corpus crops instead of the backbone's own continuations.
"""

import ml_collections

from effjax import sharding

_VARIANTS = ("default", "tiny", "corpus")


def get_config(arg=None):
  """Returns the config of variant `arg` (None or "default", "tiny", "corpus")."""
  arg = arg or "default"
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/medusa/medusa1.py; choose one of "
                     f"{_VARIANTS}")
  c = ml_collections.ConfigDict()
  c.mode = "medusa1"
  c.backbone = "lm/small"
  c.backbone_overrides = ml_collections.ConfigDict()
  c.backbone_workdir = ""  # The trained target's workdir; required unless allow_random_backbone.
  c.allow_random_backbone = False
  c.heads = ml_collections.ConfigDict(dict(num_heads=6, num_layers=1))
  c.loss_decay = 0.8  # lambda_k = 0.8^k
  c.heads_warmup_steps = 0  # Medusa-2 only.
  c.head_lr_mult = 4.0  # Medusa-2 only.
  c.head_loss_weight = 0.2  # Medusa-2 only.
  c.data = ml_collections.ConfigDict(dict(
      source="self_distill", val_fraction=0.05, max_docs=None, batch_size=16, seq_len=128,
      num_seqs=512, prompt_len=32, temperature=0.0))
  c.num_steps = 300
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=20, weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.99,
      final_lr_fraction=0.1))
  c.eval_every = 100
  c.eval_batches = 8
  c.log_every = 20
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  c.seed = 0
  c.progress_bar = False
  c.async_checkpoints = False
  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh_shape = (-1, 1, 1)
  c.sharding.rules = sharding.DEFAULT_RULES
  if arg == "corpus":
    c.data.source = "corpus"
  if arg == "tiny":
    c.backbone = "lm/tiny"
    c.heads.num_heads = 4
    c.allow_random_backbone = True
    c.data.max_docs = 40
    c.data.batch_size = 4
    c.data.seq_len = 32
    c.data.num_seqs = 8
    c.data.prompt_len = 8
    c.num_steps = 4
    c.optim.warmup_steps = 1
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint_every = 4
  return c
