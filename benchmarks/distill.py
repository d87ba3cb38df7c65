"""Distillation benchmark: encoder speed of the 3-layer DistilBERT-style student against its 6-layer
all-MiniLM-L6-v2 teacher (issue 6, 4b), and the speculative-draft table (4a).

Encoder (always): sentence embeddings of real WordNet definitions (or built-in sentences when
WordNet is missing), batches of 1 and 32, forward only (jitted, inputs already tokenized) and end to
end (WordPiece tokenization included). Medians of interleaved runs, so load drifts hit both models
alike. Speed depends only on the architecture, so the student's weights are the teacher-layer init
unless `--student_workdir` holds the distilled ones. sentence-transformers (torch, same machine) is
timed on the same batches as a peer. Goal: student >= 1.8x faster than the teacher.

Drafts (when `--drafts_workdir` holds a finished `experiments.distill --config=configs/distill/
drafts.py` run): reloads the target and every draft from their checkpoints and measures acceptance
alpha, TAR and measured / predicted speedup against the target afresh, with the gain over the
undistilled draft (DistillSpec reports +10-45%).

Usage: python benchmarks/distill.py [--quick] [--drafts_workdir=/tmp/effjax/drafts]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

from bench_timing import interleaved_medians  # noqa: E402
from effjax.distill import student_init  # noqa: E402
from effjax.eval import wordnet_retrieval as wr  # noqa: E402
from effjax.interop import hf_bert  # noqa: E402
from effjax.models.bert import BertEncoder  # noqa: E402

FALLBACK = ["a protective cloth covering for an injured eye",
            "the trait of refusing to repent",
            "a differential equation that describes the passage of harmonic waves through a medium",
            "large African viper that inflates its body when alarmed"]


def _sentences(n: int) -> tuple[list[str], str]:
  if wr.wordnet_available():
    task = wr.build_task(max(n, 64), seed=1)
    return list(task.queries[:n]), "WordNet noun definitions"
  return [FALLBACK[i % len(FALLBACK)] for i in range(n)], "built-in sentences (no WordNet)"


def encoder_section(quick: bool, student_workdir: str | None) -> dict:
  t_cfg, t_params, tok = hf_bert.load_minilm()
  layer_map = student_init.every_other_layer(t_cfg.num_layers, align="last")
  s_cfg, s_params = student_init.init_student_from_teacher(t_params, t_cfg, layer_map)
  weights = "teacher-layer init"
  if student_workdir and os.path.isdir(os.path.join(student_workdir, "checkpoints")):
    from effjax.distill import teacher as teacher_lib
    from effjax.train import checkpoint as ckpt_lib
    s_params = ckpt_lib.load_params(student_workdir, teacher_lib.abstract_params(s_cfg))
    weights = f"distilled ({student_workdir})"
  fwd = {name: jax.jit(lambda p, i, m, c=cfg: BertEncoder(c).apply(p, i, m).embedding)
         for name, cfg in (("teacher", t_cfg), ("student", s_cfg))}
  params = {"teacher": t_params, "student": s_params}
  repeats = 7 if quick else 21
  out = {"weights": weights, "layer_map": list(layer_map), "batches": {}}
  peer = None
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    from sentence_transformers import SentenceTransformer
    peer = SentenceTransformer(str(hf_bert.minilm_dir()), device="cpu")
  except ImportError:
    pass
  for bs in (1, 32):
    texts, source = _sentences(bs)
    ids, mask = tok.encode_batch(texts)
    fns = {}
    for name in ("teacher", "student"):
      fns[f"{name}_forward"] = (lambda n=name: jax.block_until_ready(
          fwd[n](params[n], ids, mask)))
      fns[f"{name}_end_to_end"] = (lambda n=name: jax.block_until_ready(
          fwd[n](params[n], *tok.encode_batch(texts))))
    if peer is not None:
      fns["sentence_transformers_teacher"] = lambda: peer.encode(texts, batch_size=bs)
    med = interleaved_medians(fns, repeats)
    row = {f"{k}_ms": v * 1e3 for k, v in med.items()}
    row["speedup_forward"] = med["teacher_forward"] / med["student_forward"]
    row["speedup_end_to_end"] = med["teacher_end_to_end"] / med["student_end_to_end"]
    row["tokens_per_row"] = int(mask.sum(1).max())
    out["batches"][str(bs)] = row
    out["sentences"] = source
  out["goal_speedup"] = 1.8
  out["goal_met"] = all(r["speedup_forward"] >= 1.8 for r in out["batches"].values())
  return out


def drafts_section(workdir: str, quick: bool) -> dict:
  import ml_collections
  from effjax.distill import draft_task
  from effjax.distill import teacher as teacher_lib
  from effjax.train import checkpoint as ckpt_lib
  results = os.path.join(workdir, "drafts_results.json")
  if not os.path.exists(results):
    return {"skipped": f"no finished drafts run in {workdir} (run experiments.distill with "
                       "configs/distill/drafts.py first)"}
  with open(os.path.join(workdir, "pretrain", "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  t_cfg, t_params = teacher_lib.load_teacher(config.teacher)
  s_cfg = teacher_lib.model_config(config.student)
  drafts = {m: ckpt_lib.load_params(os.path.join(workdir, m), teacher_lib.abstract_params(s_cfg))
            for m in config.methods}
  with config.unlocked():
    if quick:
      config.spec_eval.num_prompts = min(int(config.spec_eval.num_prompts), 4)
      config.spec_eval.timing_reps = 3
  rows = draft_task.evaluate_drafts(drafts, t_cfg, t_params, s_cfg, config,
                                    draft_task._eval_batches(config))
  return {"rows": rows, "target": config.teacher.to_dict(), "draft_model": config.student.model,
          "spec_eval": config.spec_eval.to_dict()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--drafts_workdir", default="/tmp/effjax/drafts")
  ap.add_argument("--student_workdir", default="/tmp/effjax/minilm_l3")
  ap.add_argument("--skip_drafts", action="store_true")
  args = ap.parse_args()
  t0 = time.perf_counter()
  result = {"benchmark": "distill", "command": " ".join(["python"] + sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "backend": jax.default_backend()},
            "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores"}
  result["encoder"] = encoder_section(args.quick, args.student_workdir)
  if not args.skip_drafts:
    result["drafts"] = drafts_section(args.drafts_workdir, args.quick)
  result["seconds"] = time.perf_counter() - t0
  print(json.dumps(result, default=float))


if __name__ == "__main__":
  main()
