"""The main job: train the target -> distil a draft -> train Medusa heads -> benchmark -> report.

Each step runs in its own folder under the workdir and, when it finishes, writes `DONE.json` holding
its summary and a hash of the config it ran with. A rerun skips finished steps (and redoes a step
whose config changed); a step killed half-way resumes from its own Orbax checkpoints. All logic is
here and importable, so the notebook and the tests drive the same code as `experiments/study.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from typing import Any, Callable, Optional

import jax
import ml_collections

from effjax.study import bench as bench_lib
from effjax.study import report as report_lib

log = logging.getLogger(__name__)

STEPS = ("target", "drafts", "medusa", "bench")


def _hash(cfg: Any) -> str:
  text = cfg.to_json_best_effort(sort_keys=True) if hasattr(cfg, "to_json_best_effort") else (
      json.dumps(cfg, sort_keys=True, default=str))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _done_path(workdir: str, step: str) -> str:
  return os.path.join(workdir, step, "DONE.json")


def _read_marker(path: str) -> Optional[dict]:
  """A marker file's JSON; None if it is absent, {} if it cannot be read (a kill mid-write)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)  # Atomic: a kill leaves either no marker or a whole one.


def run_step(workdir: str, step: str, cfg: Any, fn: Callable[[str], dict]) -> dict:
  """Runs `fn(step_dir)` unless a finished run with the same config is cached; returns its summary.

  The summary carries `config_hash`, which later steps put in their own configs, so retraining a
  step reruns everything built on it. A killed run of the same config resumes in place from its
  checkpoints. Anything else in the step's directory (a run of another config, or of unknown
  config) is moved aside to `<step>.old-<hash>`, never deleted, and the step starts clean: old
  checkpoints would not fit the new config. Switching back to a config whose finished run was moved
  aside restores it instead of training again.
  """
  step_dir = os.path.join(workdir, step)
  done, started = _done_path(workdir, step), os.path.join(step_dir, "STARTED.json")
  digest = _hash(cfg)

  def finished(directory):  # The summary if `directory` holds a finished run of this config.
    marker = _read_marker(os.path.join(directory, "DONE.json"))
    return marker["summary"] if marker and marker.get("config_hash") == digest else None

  summary = finished(step_dir)
  if summary is not None:
    log.info("[study] %s: done already (%s), skipping", step, done)
    return dict(summary, config_hash=digest)
  marker = _read_marker(done) or _read_marker(started)
  occupied = os.path.isdir(step_dir) and bool(os.listdir(step_dir))
  if occupied and (marker or {}).get("config_hash") != digest:
    aside = f"{step_dir}.old-{(marker or {}).get('config_hash') or 'unknown'}"
    suffix = 1
    while os.path.exists(aside + (f"-{suffix}" if suffix > 1 else "")):
      suffix += 1
    aside += f"-{suffix}" if suffix > 1 else ""
    os.replace(step_dir, aside)
    log.info("[study] %s: the directory holds another config's run; kept in %s", step, aside)
  previous = f"{step_dir}.old-{digest}"
  if not os.path.exists(step_dir) and finished(previous) is not None:
    os.replace(previous, step_dir)
    log.info("[study] %s: restored this config's finished run from %s", step, previous)
    return dict(finished(step_dir), config_hash=digest)
  os.makedirs(step_dir, exist_ok=True)
  _write_json(started, {"config_hash": digest})
  start = time.time()
  log.info("[study] %s: running in %s", step, step_dir)
  summary = fn(step_dir)
  summary = dict(summary, seconds=round(time.time() - start, 1))
  _write_json(done, {"config_hash": digest, "summary": summary})
  return dict(summary, config_hash=digest)


def _read_curve(step_dir: str) -> list[dict]:
  """The (step, loss, eval_loss) points of a training run's metrics.jsonl, wherever it lies."""
  points = []
  for root, _, files in os.walk(step_dir):
    if "metrics.jsonl" in files:
      with open(os.path.join(root, "metrics.jsonl")) as f:
        for line in f:
          row = json.loads(line)
          p = {"step": row["step"]}
          for key, out in (("loss", "loss"), ("val_loss", "eval_loss")):
            if key in row:
              p[out] = row[key]
          if len(p) > 1:
            points.append(p)
      break
  merged: dict[int, dict] = {}
  for p in points:
    merged.setdefault(p["step"], {}).update(p)
  return [merged[s] for s in sorted(merged)]


def _train_lm(config: ml_collections.ConfigDict) -> Callable[[str], dict]:
  def fn(step_dir: str) -> dict:
    from effjax.train import lm_task
    result = lm_task.run(config, step_dir)
    return {"workdir": step_dir, "final": _final_metrics(result)}
  return fn


def _final_metrics(result) -> dict:
  """Last training and evaluation figures of a `FitResult` (evaluation keys win)."""
  out = {}
  for value in (result.train_metrics, result.eval_metrics):
    out.update({k: float(v) for k, v in (value or {}).items() if hasattr(v, "__float__")})
  return out


def _distil_drafts(config: ml_collections.ConfigDict, target_dir: str) -> Callable[[str], dict]:
  def fn(step_dir: str) -> dict:
    from effjax.distill import draft_task
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.teacher.checkpoint = target_dir
    out = draft_task.run(cfg, step_dir)
    return {"workdir": step_dir, "rows": out["rows"], "train_seconds": out["train_seconds"],
            "methods": list(cfg.methods)}
  return fn


def _train_medusa(config: ml_collections.ConfigDict, target_dir: str) -> Callable[[str], dict]:
  def fn(step_dir: str) -> dict:
    from effjax.medusa import experiment
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.backbone_workdir = target_dir
    info = experiment.run(cfg, step_dir)
    final = {f"head{k}_top1": float(v) for k, v in enumerate(info.get("head_top1", []))}
    final.update({f"head{k}_top5": float(v) for k, v in enumerate(info.get("head_top5", []))})
    return {"workdir": step_dir, "final": final, "best_trees": info.get("best_trees")}
  return fn


def _training_section(trained: dict) -> dict:
  """Curves and final figures of every trained model (each draft method separately)."""
  out = {}
  for name, info in trained.items():
    if name == "drafts":
      for method in info["methods"]:
        out[f"draft_{method}"] = {"curve": _read_curve(os.path.join(info["workdir"], method)),
                                  "final": {}}
      for row in info.get("rows", []):
        key = f"draft_{row.get('draft')}"
        if key in out:
          out[key]["final"] = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    else:
      out[name] = {"curve": _read_curve(info["workdir"]), "final": info.get("final", {}),
                   "seconds": info.get("seconds")}
  return out


def machine_info() -> dict:
  return {"platform": platform.platform(), "processor": platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "python": platform.python_version()}


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every step; returns the report's results dict (also written to disk)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  target = run_step(workdir, "target", config.target, _train_lm(config.target))
  trained = {"target": target}
  if config.get("drafts") is not None:
    trained["drafts"] = run_step(
        workdir, "drafts", {"cfg": config.drafts.to_dict(), "teacher": target["workdir"],
                            "teacher_run": target["config_hash"]},
        _distil_drafts(config.drafts, target["workdir"]))
  if config.get("medusa") is not None:
    trained["medusa"] = run_step(workdir, "medusa", {"cfg": config.medusa.to_dict(),
                                                     "backbone": target["workdir"],
                                                     "backbone_run": target["config_hash"]},
                                 _train_medusa(config.medusa, target["workdir"]))
  bench_key = {"bench": config.bench.to_dict(), "trained": {k: v.get("workdir") for k, v in
                                                           trained.items()},
               "runs": {k: v["config_hash"] for k, v in trained.items()}}
  decoding = run_step(workdir, "bench", bench_key,
                      lambda d: bench_lib.run(config, trained, d))
  results = {
      "machine": machine_info(),
      "training": _training_section(trained),
      "decoding": decoding["rows"],
      "token_view_html": decoding.get("token_view_html", ""),
      "token_view_text": decoding.get("token_view_text", ""),
      "notes": decoding.get("notes", []),
  }
  paths = report_lib.write_report(results, os.path.join(workdir, "report"))
  results["paths"] = paths
  return results
