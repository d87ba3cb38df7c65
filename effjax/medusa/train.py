"""Training Medusa heads: losses, per-head accuracy, Medusa-1 / Medusa-2 steps and a small driver.

* Medusa-1: the backbone is frozen (its hidden states are a `stop_gradient` and its parameters get
  `optax.set_to_zero`), the heads learn sum_k 0.8^k CE_k.
* Medusa-2: heads first (Medusa-1 steps), then jointly: LM loss + `head_loss_weight` * head loss,
  with the heads at a higher learning rate (`head_lr_mult`) than the backbone.

Head k (0-based) at position t predicts token t + 2 + k. Data: crops of the CPython-stdlib corpus, or
self-distillation (the backbone's own continuations of corpus prompts), so heads learn what the
backbone will actually say. Everything is callable from Python with small step counts (`train`);
`experiments/train_medusa.py` only parses flags and writes the workdir.

Letters: B batch, T sequence, K heads, V vocabulary, D model width, R ranks tracked.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effjax.data.tokenizer import BOS_ID
from effjax.medusa.heads import HeadsConfig, MedusaHeads, init_heads
from effjax.models.lm import LM, LMConfig, init_params

log = logging.getLogger(__name__)
RANKS_TRACKED = 10


def loss_weights(num_heads: int, decay: float = 0.8) -> np.ndarray:
  """lambda_k = decay^k for heads k = 0..K-1 (Medusa's 0.8^k: nearer heads matter more)."""
  if num_heads < 1 or not 0.0 < decay <= 1.0:
    raise ValueError(f"loss_weights(num_heads={num_heads}, decay={decay}): need num_heads >= 1 and "
                     "0 < decay <= 1")
  return decay ** np.arange(num_heads, dtype=np.float64)


def head_terms(head_logits: jax.Array, tokens: jax.Array, mask: Optional[jax.Array] = None):
  """Per-head cross-entropy and target ranks.

  Args:
    head_logits: [B, T, K, V] logits of the heads at every position.
    tokens: [B, T] int token ids the logits were computed from.
    mask: [B, T] valid-token mask (default: all valid).

  Returns:
    (ce [K] mean cross-entropy, rank_hist [K, R] fraction of targets at rank r, count [K] targets);
    head k's target at position t is tokens[t + 2 + k].
  """
  b, t, k_heads, _ = head_logits.shape
  mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  ces, hists, counts = [], [], []
  for k in range(k_heads):
    logits, target, rank, valid = _head_targets(head_logits, tokens, mask, k)
    valid = valid.astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)  # [B, T']
    ces.append(jnp.sum(ce * valid) / n)
    hists.append(_rank_histogram(rank, valid) / n)  # [R]
    counts.append(valid.sum())
  return jnp.stack(ces), jnp.stack(hists), jnp.stack(counts)


def _head_targets(head_logits, tokens, mask, k: int):
  """Head k's logits [B, T', V] (T' = T - 2 - k), targets tokens[t + 2 + k] [B, T'], the targets'
  ranks [B, T'] (0 = top-1) and the positions whose input and target are both valid [B, T']."""
  t, shift = head_logits.shape[1], 2 + k
  if shift >= t:
    raise ValueError(f"sequence length {t} is too short for head {k} (needs > {shift} tokens)")
  logits = head_logits[:, :t - shift, k].astype(jnp.float32)  # [B, T', V]
  target = tokens[:, shift:]  # [B, T']
  tgt_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)  # [B, T', 1]
  rank = jnp.sum(logits > tgt_logit, axis=-1)  # [B, T']
  return logits, target, rank, mask[:, :t - shift] & mask[:, shift:]


def _rank_histogram(rank, weight):
  """[R] weighted count of ranks 0..R-1 (ranks beyond are dropped)."""
  onehot = jax.nn.one_hot(jnp.minimum(rank, RANKS_TRACKED), RANKS_TRACKED + 1)[..., :-1]
  return jnp.sum(onehot * weight[..., None], axis=(0, 1))


def chain_rank_terms(head_logits: jax.Array, tokens: jax.Array, mask: Optional[jax.Array] = None):
  """Per-head rank histograms counted only where every earlier head's top-1 token was right.

  Why: a tree node is reached only when its ancestors were accepted, and heads are right or wrong
  together (on a repetitive stretch all of them are right), so the marginal accuracies of
  `head_terms` undercount deep paths: on the main job's held-out self-distilled text, heads 1-5
  with marginal top-1 0.91-0.93 are right 0.98-0.99 of the time given that the heads before them
  were, so a 6-deep chain is worth ~5.4 tokens where the product of marginals says ~4.7. Used as the
  per-rank accuracy of `best_tree`, these conditional figures make a node's value the chance that
  its path is right with the heads' correlation along the top-1 chain taken into account.

  Returns:
    (rank_hist [K, R] fraction at rank r among the conditioned positions, count [K] positions).
  """
  b, t, k_heads, _ = head_logits.shape
  mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  hists, counts, ranks = [], [], []
  for k in range(k_heads):
    _, _, rank, valid = _head_targets(head_logits, tokens, mask, k)
    n_pos = rank.shape[1]
    for earlier in ranks:  # Heads 0..k-1 at the same positions (their rows are longer).
      valid = valid & (earlier[:, :n_pos] == 0)
    ranks.append(rank)
    valid = valid.astype(jnp.float32)
    n = valid.sum()
    hists.append(_rank_histogram(rank, valid) / jnp.maximum(n, 1.0))
    counts.append(n)
  return jnp.stack(hists), jnp.stack(counts)


def medusa_loss(head_logits, tokens, mask=None, decay: float = 0.8):
  """sum_k decay^k CE_k, plus metrics (per-head CE, top-1 and top-5 accuracy)."""
  ce, hist, _ = head_terms(head_logits, tokens, mask)
  weights = jnp.asarray(loss_weights(ce.shape[0], decay), jnp.float32)
  loss = jnp.sum(weights * ce)
  return loss, {"head_ce": ce, "head_top1": hist[:, 0], "head_top5": hist[:, :5].sum(-1)}


def lm_loss(logits, tokens, mask=None):
  """Next-token cross-entropy of the backbone (Medusa-2 keeps the LM's own quality)."""
  b, t = tokens.shape
  mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  valid = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                       tokens[:, 1:])
  return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1.0)


def _forward(params, tokens, lm_config, heads_config, train_backbone: bool):
  out = LM(lm_config).apply(params["lm"], tokens)
  hidden = out.hidden_states if train_backbone else jax.lax.stop_gradient(out.hidden_states)
  head_logits = MedusaHeads(heads_config).apply(params["heads"], hidden)  # [B, T, K, V]
  return out.logits, head_logits


def make_step(lm_config: LMConfig, heads_config: HeadsConfig, tx: optax.GradientTransformation,
              *, joint: bool, decay: float = 0.8, head_loss_weight: float = 1.0) -> Callable:
  """A jitted `step(params, opt_state, tokens, mask) -> (params, opt_state, metrics)`.

  `params` is `{'lm': lm_variables, 'heads': head_variables}`. With `joint=False` (Medusa-1, and the
  first stage of Medusa-2) the loss is the head loss alone and no gradient reaches the backbone;
  `tx` must also freeze it (see `make_optimizer`). With `joint=True` the loss is
  lm_loss + head_loss_weight * head_loss.
  """

  def loss_fn(params, tokens, mask):
    logits, head_logits = _forward(params, tokens, lm_config, heads_config, joint)
    h_loss, metrics = medusa_loss(head_logits, tokens, mask, decay)
    if joint:
      l_loss = lm_loss(logits, tokens, mask)
      metrics["lm_loss"] = l_loss
      return l_loss + head_loss_weight * h_loss, metrics
    return h_loss, metrics

  @jax.jit
  def step(params, opt_state, tokens, mask):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["loss"] = loss
    return params, opt_state, metrics

  return step


def make_optimizer(optim_cfg, num_steps: int, params, *, joint: bool, head_lr_mult: float = 1.0):
  """AdamW (effjax.train.optim) on the heads; the backbone frozen, or at lr / head_lr_mult if joint."""
  from effjax.train.optim import make_optimizer as base_optimizer
  labels = {"lm": jax.tree.map(lambda _: "lm", params["lm"]),
            "heads": jax.tree.map(lambda _: "heads", params["heads"])}
  heads_cfg = ml_collections.ConfigDict(dict(optim_cfg))
  heads_cfg.lr = float(optim_cfg.lr) * (head_lr_mult if joint else 1.0)
  heads_tx, _ = base_optimizer(heads_cfg, num_steps)
  lm_tx = base_optimizer(optim_cfg, num_steps)[0] if joint else optax.set_to_zero()
  return optax.multi_transform({"lm": lm_tx, "heads": heads_tx}, labels)


# ------------------------------------------------------------------------------------------------
# Data.


def corpus_tokens(max_docs: Optional[int] = None, val_fraction: float = 0.05) -> dict:
  """The CPython-stdlib corpus as byte-token streams {'train', 'validation'}, documents BOS-separated."""
  from effjax.data.stdlib_corpus import SPLITS, load_corpus
  docs, _ = load_corpus(val_fraction=val_fraction, max_docs=max_docs)
  out = {}
  for split in SPLITS:
    parts = []
    for d in docs:
      if d.split == split:
        parts.append(np.array([BOS_ID], np.int32))
        parts.append(np.frombuffer(d.text.encode("utf-8"), np.uint8).astype(np.int32))
    if not parts:
      raise ValueError(f"no documents in split {split!r}; raise val_fraction / max_docs")
    out[split] = np.concatenate(parts)
  return out


def crop_batches(stream: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
  """Endless [B, T] random crops of a token stream (deterministic for a seed)."""
  if len(stream) <= seq_len:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len={seq_len}")
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
    yield np.stack([stream[s:s + seq_len] for s in starts])


def self_distill_data(lm_params, lm_config: LMConfig, prompt_stream: np.ndarray, *, num_seqs: int,
                      prompt_len: int, seq_len: int, temperature: float = 0.0, seed: int = 0,
                      chunk: int = 32) -> np.ndarray:
  """[num_seqs, seq_len] sequences: corpus prompts continued by the backbone itself.

  Why: heads trained on the backbone's own outputs match what it will generate at decode time
  (Medusa's self-distillation), even when the original training data is unavailable.
  """
  from effjax.generate.engine import generate
  from effjax.generate.sampling import SamplingParams
  if not 0 < prompt_len < seq_len:
    raise ValueError(f"prompt_len={prompt_len} must be in (0, seq_len={seq_len})")
  crops = crop_batches(prompt_stream, chunk, prompt_len, seed)
  out, rng = [], jax.random.key(seed)
  while sum(len(o) for o in out) < num_seqs:
    prompts = next(crops)
    rng, sub = jax.random.split(rng)
    gen = generate(lm_params, lm_config, prompts, max_new_tokens=seq_len - prompt_len,
                   sampling=SamplingParams(temperature=temperature), rng=sub)
    out.append(np.concatenate([prompts, np.asarray(gen.tokens)], axis=1))
  return np.concatenate(out)[:num_seqs]


def array_batches(data: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless shuffled [B, T] batches from a fixed [N, T] array."""
  rng = np.random.default_rng(seed)
  while True:
    yield data[rng.integers(0, len(data), size=batch_size)]


# ------------------------------------------------------------------------------------------------
# Evaluation and the driver.


@functools.partial(jax.jit, static_argnames=("lm_config", "heads_config"))
def _eval_batch(lm_params, head_params, tokens, *, lm_config, heads_config, start=0):
  params = {"lm": lm_params, "heads": head_params}
  _, head_logits = _forward(params, tokens, lm_config, heads_config, False)
  mask = jnp.broadcast_to(jnp.arange(tokens.shape[1]) >= start, tokens.shape)  # [B, T]
  ce, hist, count = head_terms(head_logits, tokens, mask)
  chain_hist, chain_count = chain_rank_terms(head_logits, tokens, mask)
  return ce, hist, count, chain_hist, chain_count


def evaluate_heads(lm_params, head_params, lm_config: LMConfig, heads_config: HeadsConfig,
                   batches, *, start: int = 0) -> dict:
  """Per-head top-1 / top-5 accuracy and CE, and per-rank accuracies [K, R] for `best_tree`.

  Args:
    batches: iterable of [B, T] token arrays.
    start: score only heads at positions >= start (e.g. the last prompt token of self-distilled
      sequences, so the heads are judged on what the backbone wrote, as when decoding).

  Returns:
    {"head_top1", "head_top5", "head_ce": [K] lists, "rank_accuracy": [K][R] marginal per-rank
    accuracy, "chain_rank_accuracy": [K][R] the same where every earlier head's top-1 was right
    (`chain_rank_terms`; the better input to `best_tree`), "chain_count": [K] positions behind it}.
  """
  ce_sum = hist_sum = count_sum = chain_sum = chain_n = 0.0
  for tokens in batches:
    ce, hist, count, chain_hist, chain_count = _eval_batch(
        lm_params, head_params, jnp.asarray(tokens), lm_config=lm_config,
        heads_config=heads_config, start=start)
    count, chain_count = np.asarray(count), np.asarray(chain_count)
    ce_sum = ce_sum + np.asarray(ce) * count
    hist_sum = hist_sum + np.asarray(hist) * count[:, None]
    count_sum = count_sum + count
    chain_sum = chain_sum + np.asarray(chain_hist) * chain_count[:, None]
    chain_n = chain_n + chain_count
  if np.isscalar(count_sum):
    raise ValueError("evaluate_heads got no batches")
  rank_acc = hist_sum / np.maximum(count_sum, 1)[:, None]  # [K, R]
  chain_acc = chain_sum / np.maximum(chain_n, 1)[:, None]  # [K, R]
  return {"head_top1": rank_acc[:, 0].tolist(), "head_top5": rank_acc[:, :5].sum(-1).tolist(),
          "head_ce": (ce_sum / np.maximum(count_sum, 1)).tolist(),
          "rank_accuracy": rank_acc.tolist(),
          "chain_rank_accuracy": chain_acc.tolist(), "chain_count": chain_n.tolist()}


def default_optim() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=20, weight_decay=0.0, clip_norm=1.0,
                                        b1=0.9, b2=0.99, final_lr_fraction=0.1))


def train(lm_params, lm_config: LMConfig, heads_config: HeadsConfig, batches: Iterator,
          *, mode: str = "medusa1", steps: int = 100, heads_warmup_steps: int = 0,
          optim: Optional[ml_collections.ConfigDict] = None, head_lr_mult: float = 4.0,
          head_loss_weight: float = 0.2, decay: float = 0.8, head_params=None, seed: int = 0,
          log_every: int = 50, on_metrics: Optional[Callable[[int, dict], None]] = None):
  """Trains Medusa heads (and, for Medusa-2, the backbone) for `steps` steps.

  Args:
    lm_params: backbone variables `{'params': ...}` (e.g. a trained target).
    lm_config: backbone config.
    heads_config: head shape (`HeadsConfig.for_lm(lm_config, ...)`).
    batches: iterator of [B, T] int token arrays.
    mode: "medusa1" (backbone frozen) or "medusa2" (heads first, then joint).
    steps: total steps (for Medusa-2, the joint stage runs steps - heads_warmup_steps).
    heads_warmup_steps: Medusa-2's heads-only stage.
    optim: `config.optim` (lr, warmup_steps, weight_decay, clip_norm, b1, b2); default `default_optim`.
    head_lr_mult: Medusa-2 joint stage: heads' lr = lr * head_lr_mult.
    head_loss_weight: Medusa-2 joint stage: weight of the head loss next to the LM loss.
    decay: lambda_k = decay^k.
    head_params: start from these heads (default: fresh, projections copied from the LM head).
    seed: PRNG seed for head initialisation.
    log_every: log metrics every this many steps.
    on_metrics: callback(step, metrics dict of floats / lists).

  Returns:
    (lm_params, head_params, history list of metric dicts).
  """
  if mode not in ("medusa1", "medusa2"):
    raise ValueError(f"mode={mode!r}; choose 'medusa1' (frozen backbone) or 'medusa2' (joint)")
  if mode == "medusa1" and heads_warmup_steps:
    raise ValueError("heads_warmup_steps is a Medusa-2 setting; Medusa-1 trains heads only anyway")
  if not 0 <= heads_warmup_steps <= steps:
    raise ValueError(f"heads_warmup_steps={heads_warmup_steps} must be in [0, steps={steps}]")
  optim = default_optim() if optim is None else optim
  if head_params is None:
    head_params = init_heads(heads_config, lm_params, lm_config, jax.random.PRNGKey(seed))
  params = {"lm": lm_params, "heads": head_params}
  stages = [(False, steps)] if mode == "medusa1" else [(False, heads_warmup_steps),
                                                        (True, steps - heads_warmup_steps)]
  history, step_no = [], 0
  for joint, n in stages:
    if n == 0:
      continue
    tx = make_optimizer(optim, n, params, joint=joint, head_lr_mult=head_lr_mult)
    opt_state = tx.init(params)
    step = make_step(lm_config, heads_config, tx, joint=joint, decay=decay,
                     head_loss_weight=head_loss_weight)
    t0, last = time.time(), step_no
    for _ in range(n):
      tokens = jnp.asarray(next(batches), jnp.int32)
      params, opt_state, metrics = step(params, opt_state, tokens, None)
      step_no += 1
      if step_no % log_every == 0 or step_no == steps:
        m = jax.tree.map(lambda x: np.asarray(x).tolist(), metrics)
        m.update(step=step_no, stage="joint" if joint else "heads",
                 steps_per_s=(step_no - last) / max(time.time() - t0, 1e-9))
        t0, last = time.time(), step_no
        history.append(m)
        log.info("medusa step %d: loss %.4f top1 %s", step_no, m["loss"],
                 np.round(m["head_top1"], 3).tolist())
        if on_metrics is not None:
          on_metrics(step_no, m)
  return params["lm"], params["heads"], history


def random_backbone(lm_config: LMConfig, seed: int = 0):
  """Random backbone variables, for smoke tests when no trained target exists."""
  return init_params(lm_config, jax.random.PRNGKey(seed))
