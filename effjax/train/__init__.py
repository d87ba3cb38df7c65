"""Training: one generic loop (`fit`) shared by LM pre-training, distillation, Medusa and drafts.

  loop.py        fit(config, workdir, init_fn=, loss_fn=, data=, frozen=, trainable_filter=)
  state.py       TrainState and its sharded creation (eval_shape, then jit with out_shardings)
  optim.py       AdamW, warmup + cosine, clipping, frozen-parameter masks
  checkpoint.py  Orbax CheckpointManager: keep N, auto-resume, corrupt fallback, strict shapes
  metrics.py     config.json, metrics.jsonl, TensorBoard, progress bar (process 0)
  lm_task.py     the LM task (configs/lm/*), registered as task "lm"
  tasks.py       task registry used by `python -m experiments.train`
"""

from effjax.train.loop import Data, FitResult, fit

__all__ = ["Data", "FitResult", "fit"]
