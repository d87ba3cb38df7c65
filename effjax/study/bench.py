"""The study's decoding benchmark: autoregressive vs speculative vs Medusa on the trained models.

Every method decodes the same prompts (validation documents the models never trained on) to the
same number of new tokens, with EOS stopping off so rows do equal work: `max(bench.batch_sizes)`
prompts, run as consecutive batches of the row's batch size (batch 1 decodes each prompt in turn;
one prompt alone decides too little). After one compiling warm-up, each method's `bench.repeats`
passes over them alternate with autoregressive passes at the same batch and sampling
(`metrics.paired_speedup_over_sets`): the speedup is the median of the paired ratios, wall-clock,
so a machine whose speed drifts within the run moves both sides of each ratio together. A compute
probe timed around every pair (`metrics.make_compute_probe`) gives each row the share of its pairs
that ran while the VM had lost compute (benchmarks/RESULTS.md, "Two states of the VM"), where
compute-bound rounds lose to memory-bound autoregressive decoding.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from effjax.data import stdlib_corpus
from effjax.data.tokenizer import ByteTokenizer
from effjax.generate import engine
from effjax.generate.sampling import SamplingParams
from effjax.models import registry
from effjax.models.lm import LMConfig, init_params, pack_weights

log = logging.getLogger(__name__)


def validation_prompts(num: int, length: int, val_fraction: float = 0.05) -> np.ndarray:
  """[num, length] byte ids: the middle `length` bytes of the first `num` validation documents."""
  docs, _ = stdlib_corpus.load_corpus(val_fraction=val_fraction)
  texts = [d.text.encode("utf-8") for d in docs if d.split == "validation"]
  texts = [t for t in texts if len(t) >= 2 * length][:num]
  if len(texts) < num:
    raise ValueError(f"only {len(texts)} validation documents have {2 * length} bytes; lower "
                     "bench.prompt_len or bench.batch_sizes")
  return np.stack([np.frombuffer(t[len(t) // 2 - length // 2:][:length], np.uint8) for t in texts]
                  ).astype(np.int32)


def load_lm(workdir: str, cfg: LMConfig):
  """Trained variables, with the few-row kernel's packed weights (this step only decodes)."""
  from effjax.train.checkpoint import load_params
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return pack_weights(load_params(workdir, abstract), cfg)


def _lm_config(train_cfg) -> LMConfig:
  from effjax.train import lm_task
  return lm_task.model_config(train_cfg)


def _medusa_tree(target, heads, target_cfg: LMConfig, info: dict, b, batch: int, calibration):
  """(tree, tuning table): `bench.medusa_tree_size` tokens, or 0 = the size that decodes the
  calibration prompts fastest here (`effjax.medusa.tune.tune_tree`)."""
  from effjax.medusa.tree import best_tree
  from effjax.medusa.tune import tune_tree
  rank_acc = np.asarray(info.get("chain_rank_accuracy", info["rank_accuracy"]))
  if b.medusa_tree_size:
    return best_tree(rank_acc, b.medusa_tree_size), None
  sets = [calibration[i:i + batch] for i in range(0, len(calibration) - batch + 1, batch)]
  tree, table = tune_tree(target, heads, target_cfg, rank_acc, sets, tuple(b.medusa_tree_sizes),
                          max_new_tokens=min(64, b.max_new_tokens))
  log.info("Medusa tree for batch %d: %d tokens (calibration seconds %s)", batch, tree.size,
           {k: round(v, 3) for k, v in table["seconds"].items()})
  return tree, table


def run(config, trained: dict, step_dir: str) -> dict:
  """Benchmarks every method on the trained models; returns {"rows": [...], "token_view_*": ...}."""
  from effjax.speculative import metrics as spec_metrics
  from effjax.speculative import view as spec_view
  from effjax.speculative.decode import speculative_generate
  b = config.bench
  timed = spec_metrics.median_seconds_over_sets
  target_cfg = _lm_config(config.target).replace(matmul_precision="default")
  target = load_lm(trained["target"]["workdir"], target_cfg)
  drafts = {}
  if "drafts" in trained:
    s_cfg = registry.get(config.drafts.student.model, **dict(config.drafts.student.overrides))
    for method in trained["drafts"]["methods"]:
      path = os.path.join(trained["drafts"]["workdir"], method)
      drafts[method] = (load_lm(path, s_cfg), s_cfg)
  prompts_all = validation_prompts(max(b.batch_sizes), b.prompt_len)
  n_new = b.max_new_tokens
  samplings = {"greedy": SamplingParams(), "t=1": SamplingParams(temperature=1.0)}
  rows, notes = [], []
  tok = ByteTokenizer()
  jobs = []
  draft_samplings = dict(b.get("draft_samplings", None) or {})  # Default: every sampling.
  for batch in b.batch_sizes:
    # Every autoregressive baseline of a batch size first: the rows after it pair with it.
    jobs += [("autoregressive", batch, s_name, None, None) for s_name in b.samplings]
    for s_name in b.samplings:
      for d_name in drafts:
        if s_name not in draft_samplings.get(d_name, b.samplings):
          continue
        for gamma in b.gammas:
          jobs.append(("speculative", batch, s_name, d_name, gamma))
      if "medusa" in trained and s_name == "greedy":
        jobs.append(("medusa", batch, "greedy", None, None))
        jobs.append(("medusa", batch, "typical", None, None))
  cost_ratios = {name: spec_metrics.measure_cost_ratio(target, target_cfg, p, c)["cost_ratio"]
                 for name, (p, c) in drafts.items()}
  # What one (gamma + 1)-token verification pass costs in target steps, per batch and gamma.
  verify_costs = {(batch, gamma): spec_metrics.verify_cost_ratio(target, target_cfg, gamma,
                                                                 batch=batch)
                  for batch in b.batch_sizes for gamma in (b.gammas if drafts else ())}
  ar_fns: dict = {}  # (batch, sampling) -> the autoregressive call every other row pairs with.
  probe = spec_metrics.make_compute_probe()
  reference_probes = [probe() for _ in range(3)]

  def paired(fn, prompt_sets, batch: int, s_name: str):
    """(method seconds, outputs of the warm-up, timing dict) against the autoregressive baseline
    of the same batch and sampling (typical acceptance, which samples at T = 1: that of T = 1,
    else greedy's)."""
    if s_name == "typical":
      s_name = "t=1" if (batch, "t=1") in ar_fns else "greedy"
    outs = [fn(p) for p in prompt_sets]  # Compiles; the metrics read these outputs.
    jax.block_until_ready([o.tokens for o in outs])  # Dispatch is asynchronous.
    timing = spec_metrics.paired_speedup_over_sets(ar_fns[(batch, s_name)], fn, prompt_sets,
                                                   b.repeats, probe)
    return timing["seconds"], outs, timing
  medusa_trees: dict = {}  # batch -> (tree, tuning table or None)
  if "medusa" in trained:
    from effjax.medusa import experiment as medusa_exp
    medusa_heads = medusa_exp.load_heads(trained["medusa"]["workdir"], target_cfg)  # Read once.
  view_html, view_text = "", ""
  rng = jax.random.PRNGKey(b.seed)
  for method, batch, s_name, d_name, gamma in tqdm(jobs, desc="bench", unit="run"):
    prompt_sets = [prompts_all[i:i + batch] for i in range(0, len(prompts_all) - batch + 1, batch)]
    sampling = samplings.get(s_name, SamplingParams())
    row = {"method": method, "sampling": s_name, "batch": batch, "gamma": gamma, "draft": d_name}
    timing = None
    if method == "autoregressive":
      ar_fn = lambda p, sampling=sampling: engine.generate(
          target, target_cfg, p, max_new_tokens=n_new, sampling=sampling, rng=rng)
      t, _ = timed(ar_fn, prompt_sets, b.repeats)
      ar_fns[(batch, s_name)] = ar_fn
      row.update(passes_per_token=1.0, speedup=1.0)
    elif method == "speculative":
      d_params, d_cfg = drafts[d_name]
      call = lambda p, record=False: speculative_generate(
          target, target_cfg, d_params, d_cfg, p, gamma=gamma, max_new_tokens=n_new,
          sampling=sampling, rng=rng, record_rounds=record)
      t, outs, timing = paired(call, prompt_sets, batch, s_name)
      summary = spec_metrics.summarize(*spec_metrics.merge_rows(outs),
                                       cost_ratio=cost_ratios[d_name],
                                       verify_cost=verify_costs[(batch, gamma)])
      row.update({k: summary.get(k) for k in ("tar", "tau", "alpha", "predicted_speedup",
                                              "verify_cost", "predicted_speedup_verify")})
      row["passes_per_token"] = summary.get("target_passes_per_token")
      row["per_position_acceptance"] = summary.get("per_position_acceptance")
      row["cost_ratio"] = cost_ratios[d_name]
      if (batch == 1 and s_name == "greedy" and gamma == max(b.gammas) and not view_html
          and d_name == list(drafts)[-1]):
        record = call(prompt_sets[0], record=True).rounds
        view_html = spec_view.render_html(record, rows=[0], token_str=tok.token_str)
        view_text = spec_view.render_terminal(record, 0, token_str=tok.token_str)
    else:
      from effjax.medusa import decode as medusa_decode
      heads, info = medusa_heads
      if batch not in medusa_trees:
        # Calibrated on the next validation documents, not on the prompts measured here.
        calibration = validation_prompts(2 * len(prompts_all), b.prompt_len)[len(prompts_all):]
        medusa_trees[batch] = _medusa_tree(target, heads, target_cfg, info, b, batch, calibration)
      tree, tuning = medusa_trees[batch]
      typical = medusa_decode.TypicalParams() if s_name == "typical" else None
      kwargs = dict(max_new_tokens=n_new, tree=tree, rng=rng)
      if typical is not None:
        kwargs.update(typical=typical, sampling=SamplingParams(temperature=1.0))
      t, outs, timing = paired(
          lambda p: medusa_decode.generate(target, heads, target_cfg, p, **kwargs), prompt_sets,
          batch, s_name)
      m = medusa_decode.decode_metrics(outs[0].replace(  # All sets' rows as one batch.
          accept_counts=np.concatenate([np.asarray(o.accept_counts) for o in outs]),
          lengths=np.concatenate([np.asarray(o.lengths) for o in outs])))
      row.update(tar=m.get("tar"), tau=m.get("tau"),
                 passes_per_token=m.get("target_passes_per_token"),
                 per_position_acceptance=m.get("per_position_acceptance"))
      row["tree_size"] = tree.size
      if tuning:
        row["tree_tuning"] = tuning
    row["seconds"] = t
    row["tokens_per_s"] = len(prompt_sets) * batch * n_new / t
    if timing is not None:
      row.update(speedup=timing["speedup"], baseline_seconds=timing["baseline_s"],
                 ratios=timing["ratios"], probe_s=timing["probe_s"])
    rows.append(row)
  # Which of the VM's states each row's pairs ran in, against the run's fastest probe.
  reference_s = min(reference_probes + [t for r in rows for t in r.get("probe_s", ())])
  for row in rows:
    if "ratios" in row:
      row["low_compute_share"] = spec_metrics.split_by_machine_state(
          row["ratios"], row["probe_s"], reference_s)["low_compute_share"]
  if not drafts:
    notes.append("no draft model was trained: speculative rows are missing")
  return {"rows": rows, "token_view_html": view_html, "token_view_text": view_text,
          "notes": notes, "cost_ratios": cost_ratios,
          "verify_costs": {f"batch{k[0]}_gamma{k[1]}": v for k, v in verify_costs.items()}}
