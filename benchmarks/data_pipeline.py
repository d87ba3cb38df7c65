"""Data pipeline throughput: is a tiny model's training step ever waiting for data?

Measures, in one run, on the full stdlib corpus (built offline into a temporary data dir) and on 20,000
synthetic lm1b-like short documents (50-250 bytes, where per-document overhead dominates):
  * effjax: `effjax.data.pipeline.train_iterator` (per-epoch shuffle, pack, row-window shuffle, batch);
  * peer: grain's own building blocks for the same job (`ConcatThenSplitIterDataset` packing and
    `WindowShuffleIterDataset`), fed the same tokenized documents;
  * the goal: one jitted forward+backward+SGD step of `lm/tiny` on the same batch shape.
Reports seconds per batch of each (median, and mean: the mean includes the periodic window refills, so
it is the throughput figure), the peer/effjax ratio of means, and whether the data stage's mean is
under 10% of the tiny step. Also the cost of restoring the iterator from a saved state.

    python benchmarks/data_pipeline.py --quick

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from effjax.data import config as config_lib  # noqa: E402
from effjax.data import pipeline  # noqa: E402


def _per_batch(it, n: int) -> list[float]:
  next(it)  # Warm: threads started, first documents read.
  out = []
  for _ in range(n):
    t = time.perf_counter()
    next(it)
    out.append(time.perf_counter() - t)
  return out


def _grain_peer(source, seq_len: int, batch_size: int, seed: int, window: int):
  """The same job with grain's stock transforms (no JSON-safe state, per-element index shuffle)."""
  import grain
  docs = grain.MapDataset.source(source).shuffle(seed).repeat(None)
  docs = docs.map(lambda r: {"tokens": pipeline.tokenizer.document_ids(r["text"])})
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed)
  return iter(ds.batch(batch_size, drop_remainder=True))


def _tiny_step_seconds(seq_len: int, batch_size: int, batch: dict, n: int) -> float:
  import jax
  import jax.numpy as jnp
  from effjax.models import lm, registry
  config = registry.get("lm/tiny", max_len=max(256, seq_len))
  params = lm.init_params(config, jax.random.PRNGKey(0))["params"]
  model = lm.LM(config)

  def loss_fn(p, b):
    out = model.apply({"params": p}, b["inputs"], positions=b["positions"],
                      segment_ids=b["segment_ids"])
    logp = jax.nn.log_softmax(out.logits)  # [B, T, V]
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]  # [B, T]
    return (nll * b["mask"]).sum() / jnp.maximum(b["mask"].sum(), 1.0)

  @jax.jit
  def step(p, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    return jax.tree.map(lambda w, d: w - 1e-3 * d, p, g), loss

  b = {k: jnp.asarray(v) for k, v in batch.items()}
  params, loss = step(params, b)
  jax.block_until_ready(loss)
  times = []
  for _ in range(n):
    t = time.perf_counter()
    params, loss = step(params, b)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer batches (under 2 minutes on 2 cores)")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch_size", type=int, default=8)
  args = ap.parse_args()
  n = 300 if args.quick else 2000
  T, B, seed, window = args.seq_len, args.batch_size, 0, 256

  cfg = config_lib.default_data_config()
  cfg.data_dir = tempfile.mkdtemp(prefix="effjax_bench_tfds_")
  cfg.shuffle_window = window
  t0 = time.perf_counter()
  info = pipeline.corpus_info(cfg)  # Builds the full corpus.
  build_s = time.perf_counter() - t0

  effjax_t = _per_batch(pipeline.train_iterator(cfg, seq_len=T, batch_size=B, seed=seed), n)
  source, _ = pipeline.open_source(cfg, "train")
  peer_t = _per_batch(_grain_peer(source, T, B, seed, window), n)

  # lm1b-like short documents (50-250 bytes), where per-document overhead dominates.
  rng = np.random.default_rng(0)
  short = [{"text": bytes(rng.integers(97, 123, size=int(rng.integers(50, 250))).astype(np.uint8))}
           for _ in range(20000)]
  short_effjax_t = _per_batch(iter(pipeline.make_train_dataset(
      short, seq_len=T, batch_size=B, seed=seed, shuffle_window=window)), n)
  short_peer_t = _per_batch(_grain_peer(short, T, B, seed, window), n)

  it = pipeline.train_iterator(cfg, seq_len=T, batch_size=B, seed=seed)
  for _ in range(100):
    next(it)
  state = pipeline.iterator_state(it)
  t0 = time.perf_counter()
  fresh = pipeline.train_iterator(cfg, seq_len=T, batch_size=B, seed=seed)
  pipeline.restore_iterator(fresh, state)
  batch = next(fresh)
  restore_s = time.perf_counter() - t0

  step_s = _tiny_step_seconds(T, B, batch, 20 if args.quick else 100)
  med = lambda xs: float(np.median(xs))
  result = {
      "benchmark": "data_pipeline",
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "python": platform.python_version()},
      "corpus": {"train_docs": info["splits"]["train"]["docs"],
                 "train_bytes": info["splits"]["train"]["bytes"], "sha256": info["sha256"][:16],
                 "build_s": round(build_s, 3)},
      "batch": [B, T], "batches_timed": n,
      "effjax_median_s": med(effjax_t), "effjax_mean_s": float(np.mean(effjax_t)),
      "grain_peer_median_s": med(peer_t), "grain_peer_mean_s": float(np.mean(peer_t)),
      "peer_over_effjax_mean": float(np.mean(peer_t) / np.mean(effjax_t)),
      "effjax_tokens_per_s": B * T / float(np.mean(effjax_t)),
      "short_docs_effjax_mean_s": float(np.mean(short_effjax_t)),
      "short_docs_grain_peer_mean_s": float(np.mean(short_peer_t)),
      "short_docs_peer_over_effjax_mean": float(np.mean(short_peer_t) / np.mean(short_effjax_t)),
      "restore_s": restore_s,
      "tiny_step_median_s": step_s,
      "data_over_step_mean": float(np.mean(effjax_t) / step_s),
      "goal_data_under_10pct_of_tiny_step": bool(np.mean(effjax_t) < 0.1 * step_s),
      "note": f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
