r"""Medusa-2: heads first, then heads and backbone jointly (LM loss + 0.2 x head loss).

  python -m experiments.train_medusa --config=configs/medusa/medusa2.py \
      --workdir=/tmp/effjax/medusa2 --config.backbone_workdir=/tmp/effjax/lm_stdlib

  Hardware: 2 CPU cores. Runtime: not measured at full size (about 3x Medusa-1's time per joint
  step, since the backbone trains); the :tiny variant runs in the tests in about 10 s.
  Result: WORKDIR/medusa.json (heads) and WORKDIR/medusa_backbone (the tuned backbone).

The first `heads_warmup_steps` train the heads alone (as Medusa-1), so the joint stage does not start
from random-quality heads whose large loss would disturb the backbone; the heads then learn at
`head_lr_mult` x the backbone's learning rate. Variants as in medusa1.py (:tiny; :corpus is
the default here).
"""

from configs.medusa import medusa1


def get_config(arg=None):
  """Medusa-1's config of variant `arg`, switched to the two-stage Medusa-2 schedule."""
  c = medusa1.get_config(arg)
  c.mode = "medusa2"
  # The joint stage's LM loss takes hard next-token labels: on the backbone's own greedy outputs
  # that would teach it its own argmax (Medusa-2 self-distils with a KL to the original model
  # instead, not built here), so Medusa-2 trains on the corpus.
  c.data.source = "corpus"
  c.heads_warmup_steps = c.num_steps // 2
  c.num_steps = c.num_steps + c.heads_warmup_steps
  c.optim.lr = c.optim.lr / 4 if arg != "tiny" else c.optim.lr
  return c
