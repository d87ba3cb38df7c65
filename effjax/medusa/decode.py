"""Medusa decoding: one tree-attention pass per step, the whole generation inside one `jax.jit`.

Each step (Cai et al. 2024):

1. The *root* is the token the LM chose last step (the prefill's first token at the start); it is not
   yet in the cache. The heads, read at the root's predecessor, proposed top-k tokens for the next
   `depth` positions; the tree's choices pick which (head, rank) pairs become candidate nodes.
2. One cached LM call runs the T = tree.size tokens at positions `length + depth`, with
   `new_token_mask` = the tree's ancestor mask (each node sees the prefix, its ancestors and itself).
3. Verification scores every root-to-leaf path: greedy accepts a node while it equals the argmax of
   its parent's logits (lossless: the output is plain greedy's), typical acceptance accepts it while
   p(x) > min(epsilon, delta * exp(-H(p))). The longest accepted path wins.
4. The accepted nodes' keys/values, scattered among the tree slots, are gathered into contiguous slots
   from the old length (`compact_cache`), and the length is set to old + accepted + 1.
5. The LM's own prediction at the last accepted node is the *bonus* token (the next root), and the
   heads at that node propose the next tree.

A step emits accepted + 1 tokens. Rows accept different lengths and stop independently (EOS or
`max_new_tokens`); a finished row keeps its cache length and its tokens, so later passes rewrite stale
slots only.

Letters: B batch, T tree size (root included), L root-to-leaf paths, P = depth + 1 path length,
K heads, R top-k ranks read, S cache slots, V vocabulary, D model width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from effjax.generate.engine import (_check_inputs, _variables, bucket_length, prefill,
                                    prompt_block)
from effjax.generate.sampling import GREEDY, SamplingParams, logits_to_probs, sample
from effjax.medusa.heads import HeadsConfig, apply_heads, check_compatible, infer_config
from effjax.medusa.tree import DEFAULT_CHOICES, MedusaTree
from effjax.models.lm import LM, KVCache, LMConfig, init_cache


@dataclasses.dataclass(frozen=True)
class TypicalParams:
  """Typical acceptance thresholds: accept x when p(x) > min(epsilon, delta * exp(-H(p))).

  Defaults are Medusa's (posterior_threshold=0.09, posterior_alpha=0.3). Used when the sampling
  temperature is > 0; greedy decoding verifies greedily.
  """

  epsilon: float = 0.09
  delta: float = 0.3

  def __post_init__(self):
    if not 0.0 <= self.epsilon <= 1.0 or self.delta < 0.0:
      raise ValueError(f"TypicalParams(epsilon={self.epsilon}, delta={self.delta}): epsilon must "
                       "be in [0, 1] and delta >= 0")


def typical_accept(probs: jax.Array, tokens: jax.Array, params: TypicalParams) -> jax.Array:
  """Whether each candidate token is typical under the target distribution.

  Args:
    probs: [..., V] target probabilities (already tempered / truncated).
    tokens: [...] int candidate tokens.
    params: thresholds.

  Returns:
    [...] bool: p(token) > min(epsilon, delta * exp(-entropy(p))).
  """
  probs = probs.astype(jnp.float32)
  logp = jnp.log(jnp.where(probs > 0, probs, 1.0))
  entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)  # [...]
  threshold = jnp.minimum(params.epsilon, params.delta * jnp.exp(-entropy))
  p_tok = jnp.take_along_axis(probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return p_tok > threshold


def accept_lengths(ok: jax.Array) -> jax.Array:
  """[..., P-1] bool per path position -> [...] int32 length of the all-true prefix."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def compact_cache(cache: KVCache, old_lengths: jax.Array, path_nodes: jax.Array,
                  num_kept: jax.Array) -> KVCache:
  """Moves the accepted path's tree slots to contiguous slots and commits the new length.

  The tree pass wrote node i of row b at slot `old_lengths[b] + i`; the accepted nodes `path_nodes`
  (root first) must end up at `old_lengths[b] + 0, 1, ...`. All P entries are gathered before any is
  written, so overlapping moves are safe; entries past `num_kept` land beyond the new length (stale).

  Args:
    cache: the cache after the tree pass.
    old_lengths: [B] int32 lengths before the tree pass.
    path_nodes: [B, P] int32 tree node indices of the chosen path (negative padding is allowed past
      `num_kept`).
    num_kept: [B] int32 nodes to keep (accepted candidates + the root).

  Returns:
    The cache with the path compacted and `lengths = old_lengths + num_kept`.
  """
  src = old_lengths[:, None] + jnp.maximum(path_nodes, 0)  # [B, P]
  src = jnp.minimum(src, cache.max_len - 1)
  kv_heads = cache.kv_heads
  src = jnp.repeat(src, kv_heads, axis=0)  # [B*K, P]: the cache blocks are heads-major per row
  dst = jnp.repeat(old_lengths, kv_heads)[:, None] + jnp.arange(src.shape[1])[None, :]  # [B*K, P]
  blocks = jnp.arange(src.shape[0])[:, None]

  def move(buf):  # [B*K, S, H]
    picked = jnp.take_along_axis(buf, src[:, :, None], axis=1)  # [B*K, P, H]
    return buf.at[blocks, dst].set(picked, mode="drop", unique_indices=True)

  return KVCache(k=tuple(move(x) for x in cache.k), v=tuple(move(x) for x in cache.v),
                 lengths=(old_lengths + num_kept).astype(jnp.int32))


@flax.struct.dataclass
class MedusaState:
  """The decode loop's carry, all fixed-size.

  Attributes:
    cache: KV cache holding every emitted token except `root`.
    tokens: [B, N] int32 emitted tokens (N = max_new_tokens + depth + 1, room for a last full step).
    num_generated: [B] int32 tokens emitted so far.
    root: [B] int32 last emitted token, the next tree's root.
    candidates: [B, K, R] int32 the heads' top-R tokens for the positions after the root.
    done: [B] bool.
    passes: [B] int32 tree passes run while the row was active.
    accept_counts: [B, P] int32 histogram of accepted candidates per pass (0..depth).
    step: [] int32.
  """

  cache: KVCache
  tokens: jax.Array
  num_generated: jax.Array
  root: jax.Array
  candidates: jax.Array
  done: jax.Array
  passes: jax.Array
  accept_counts: jax.Array
  step: jax.Array


@flax.struct.dataclass
class MedusaOutput:
  """Result of `generate`, with the same first fields as `effjax.generate.GenerateOutput`.

  Attributes:
    tokens: [B, max_new_tokens] int32; `pad_id` after a row's EOS (included) or end.
    lengths: [B] int32 generated tokens per row.
    finished: [B] bool the row stopped at EOS.
    num_passes: [B] int32 target forward passes (prefill + tree passes).
    accept_counts: [B, depth + 1] int32 how many tree passes accepted 0, 1, ..., depth candidates.
  """

  tokens: jax.Array
  lengths: jax.Array
  finished: jax.Array
  num_passes: jax.Array
  accept_counts: jax.Array


def decode_metrics(out: MedusaOutput) -> dict:
  """Figures named as `effjax.speculative.metrics.summarize` names them.

  * `tar`: accepted candidates per tree pass; `tau` = tar + 1 (the bonus token counted).
  * `target_passes_per_token`: tree passes per generated token (prefill not counted, as in
    speculative decoding); 1.0 is autoregressive.
  * `per_position_acceptance`: [depth] fraction of passes whose accepted path reached head k's node
    (so head k's acceptance, counting the heads before it).
  * `rounds`: tree passes summed over rows; `generated_tokens`.
  """
  counts = np.asarray(out.accept_counts, np.float64).sum(axis=0)  # [P]
  passes = max(counts.sum(), 1.0)
  depth = counts.shape[0] - 1
  tar = float((counts * np.arange(depth + 1)).sum() / passes)
  tokens = float(np.asarray(out.lengths).sum())
  return {"tar": tar, "tau": tar + 1.0,
          "per_position_acceptance": [float(counts[k + 1:].sum() / passes) for k in range(depth)],
          "target_passes_per_token": float(counts.sum()) / max(tokens, 1.0),
          "rounds": int(counts.sum()), "generated_tokens": int(tokens)}


def _top_candidates(head_params, heads_config, hidden, depth, top_k):
  """hidden [B, D] -> [B, depth, R] top-R tokens of the first `depth` heads."""
  logits = apply_heads(head_params, heads_config, hidden)[:, :depth]  # [B, depth, V]
  return jax.lax.top_k(logits, top_k)[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "heads_config", "tree", "sampling",
                                             "typical", "buf_len", "cache_len"))
def _generate_jit(params, head_params, prompts, prompt_lengths, max_new, eos_id, pad_id, rng, *,
                  config: LMConfig, heads_config: HeadsConfig, tree: MedusaTree,
                  sampling: SamplingParams, typical: TypicalParams, buf_len: int,
                  cache_len: int) -> MedusaOutput:
  b = prompts.shape[0]
  t, depth, top_k = tree.size, tree.depth, tree.top_k
  depths = jnp.asarray(tree.depths)  # [T]
  ranks = jnp.asarray(tree.ranks)  # [T]
  tree_mask = jnp.broadcast_to(jnp.asarray(tree.attn_mask), (b, t, t))  # [B, T, T]
  retrieve = tree.retrieve  # [L, P] numpy (static)
  ret = jnp.asarray(np.maximum(retrieve, 0))  # [L, P]
  ret_valid = jnp.asarray(retrieve >= 0)  # [L, P]
  variables = _variables(params)
  model = LM(config)

  cache = init_cache(config, b, cache_len)
  cache, logits, hidden = prefill(params, config, prompts, prompt_lengths, cache)
  first = sample(jax.random.fold_in(rng, 0), logits, sampling)  # [B]
  tokens = jnp.full((b, buf_len), pad_id, jnp.int32).at[:, 0].set(first)  # [B, N]
  state = MedusaState(
      cache=cache, tokens=tokens, num_generated=jnp.ones((b,), jnp.int32), root=first,
      candidates=_top_candidates(head_params, heads_config, hidden, depth, top_k),
      done=(first == eos_id) | (max_new <= 1), passes=jnp.zeros((b,), jnp.int32),
      accept_counts=jnp.zeros((b, depth + 1), jnp.int32), step=jnp.int32(1))

  def cond(s: MedusaState):
    return ~jnp.all(s.done)

  def body(s: MedusaState) -> MedusaState:
    # 1. Tree tokens: the root, then candidates[depth - 1, rank] for every other node.
    picked = s.candidates[:, jnp.maximum(depths - 1, 0), ranks]  # [B, T]
    tree_tokens = jnp.where(depths[None] == 0, s.root[:, None], picked)  # [B, T]
    old_len = s.cache.lengths  # [B]
    positions = old_len[:, None] + depths[None]  # [B, T]
    # 2. One pass over the whole tree.
    out = model.apply(variables, tree_tokens, positions, s.cache, new_token_mask=tree_mask)
    path_tokens = tree_tokens[:, ret]  # [B, L, P]
    # 3. Verify each path: node j+1 against the distribution at node j.
    if sampling.greedy:
      choice = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)  # [B, T]
      ok = choice[:, ret[:, :-1]] == path_tokens[:, :, 1:]  # [B, L, P-1]
      ok &= ret_valid[None, :, 1:]
      n = accept_lengths(ok)  # [B, L]
      best = jnp.argmax(n, axis=1)  # [B]
    else:
      probs = logits_to_probs(out.logits, sampling)  # [B, T, V]
      path_probs = probs[:, ret[:, :-1]]  # [B, L, P-1, V]
      ok = typical_accept(path_probs, path_tokens[:, :, 1:], typical) & ret_valid[None, :, 1:]
      n = accept_lengths(ok)  # [B, L]
      # Among the longest accepted paths, prefer the most likely one (Medusa's tie-break).
      p_tok = jnp.take_along_axis(path_probs, path_tokens[:, :, 1:, None], axis=-1)[..., 0]
      logp = jnp.log(jnp.maximum(p_tok, 1e-30))  # [B, L, P-1]
      kept = jnp.arange(depth)[None, None, :] < n[:, :, None]
      score = jnp.sum(jnp.where(kept, logp, 0.0), axis=-1)  # [B, L]
      longest = n == jnp.max(n, axis=1, keepdims=True)
      best = jnp.argmax(jnp.where(longest, score, -jnp.inf), axis=1)  # [B]
    acc = jnp.take_along_axis(n, best[:, None], axis=1)[:, 0]  # [B]
    nodes = ret[best]  # [B, P]
    last_node = jnp.take_along_axis(nodes, acc[:, None], axis=1)[:, 0]  # [B]
    # 5. The bonus token and the next candidates come from the last accepted node.
    last_logits = jnp.take_along_axis(out.logits, last_node[:, None, None], axis=1)[:, 0]  # [B, V]
    bonus = sample(jax.random.fold_in(rng, s.step), last_logits, sampling)  # [B]
    last_hidden = jnp.take_along_axis(out.hidden_states, last_node[:, None, None], axis=1)[:, 0]
    candidates = _top_candidates(head_params, heads_config, last_hidden, depth, top_k)
    # 4. Compact the accepted path's cache entries; the root plus `acc` candidates stay.
    cache = compact_cache(out.cache, old_len, nodes, acc + 1)
    # Emitted tokens: accepted candidates, then the bonus, at the row's output cursor.
    chosen = jnp.take_along_axis(path_tokens, best[:, None, None], axis=1)[:, 0, 1:]  # [B, P-1]
    slot = jnp.arange(depth + 1)[None, :]  # [1, P]
    emit = jnp.where(slot < acc[:, None], jnp.pad(chosen, ((0, 0), (0, 1))),
                     jnp.where(slot == acc[:, None], bonus[:, None], pad_id))  # [B, P]
    is_eos = (emit == eos_id) & (slot <= acc[:, None])
    first_eos = jnp.argmax(is_eos, axis=1)  # [B]
    hit_eos = jnp.any(is_eos, axis=1)
    num_new = jnp.where(hit_eos, first_eos + 1, acc + 1)  # [B]
    emit = jnp.where(slot < num_new[:, None], emit, pad_id)
    active = ~s.done
    written = jax.vmap(lambda row, e, c: jax.lax.dynamic_update_slice(row, e, (c,)))(
        s.tokens, emit, s.num_generated)
    num_generated = s.num_generated + jnp.where(active, num_new, 0)
    done = s.done | hit_eos | (num_generated >= max_new)
    counts = s.accept_counts + jax.nn.one_hot(acc, depth + 1, dtype=jnp.int32) * active[:, None]
    keep = lambda new, old: jnp.where(
        active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    cache = cache.replace(lengths=keep(cache.lengths, old_len))
    return MedusaState(cache=cache, tokens=keep(written, s.tokens), num_generated=num_generated,
                       root=keep(bonus, s.root), candidates=keep(candidates, s.candidates),
                       done=done, passes=s.passes + active.astype(jnp.int32),
                       accept_counts=counts, step=s.step + 1)

  state = jax.lax.while_loop(cond, body, state)
  lengths = jnp.minimum(state.num_generated, max_new)
  cols = jnp.arange(buf_len)[None, :]
  tokens = jnp.where(cols < lengths[:, None], state.tokens, pad_id)
  finished = jnp.any((tokens == eos_id) & (cols < lengths[:, None]), axis=1)
  return MedusaOutput(tokens=tokens, lengths=lengths, finished=finished,
                      num_passes=state.passes + 1, accept_counts=state.accept_counts)


def generate(params, head_params, config: LMConfig, prompts, prompt_lengths=None, *,
             max_new_tokens: int, tree: Optional[MedusaTree] = None,
             heads_config: Optional[HeadsConfig] = None, sampling: SamplingParams = GREEDY,
             typical: TypicalParams = TypicalParams(), rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, pad_id: int = 0, cache_len: Optional[int] = None,
             bucket: bool = True) -> MedusaOutput:
  """Medusa generation of up to `max_new_tokens` per row, in one compiled program.

  Arguments follow `effjax.generate.generate`; greedy `sampling` gives exactly plain greedy's tokens.

  Args:
    params: LM variables (`{'params': ...}` or the bare tree).
    head_params: Medusa head variables for this backbone (`effjax.medusa.init_heads` / training).
    config: the LM config (static).
    prompts: [B, P] int token ids, right-padded.
    prompt_lengths: [B] real lengths (default: all P).
    max_new_tokens: tokens to generate per row.
    tree: candidate tree (default: Medusa's 64-token default tree, cut to the heads' depth).
    heads_config: head shape (default: read from `head_params`).
    sampling: greedy (lossless greedy verification) or temperature/top-k/top-p (typical acceptance).
    typical: typical-acceptance thresholds when sampling.
    rng: PRNG key for sampling.
    eos_id: token that ends a row (None: never stop early).
    pad_id: filler after a row's end.
    cache_len: KV cache slots; must hold prompt + max_new_tokens + tree.size.
    bucket: pad the prompt block and cache to powers of two so similar calls share a compilation.

  Returns:
    MedusaOutput; `decode_metrics(out)` gives tau, passes per token and per-head acceptance.
  """
  check_compatible(head_params, config, heads_config)
  if heads_config is None:
    heads_config = infer_config(head_params).replace(matmul_precision=config.matmul_precision)
  if tree is None:
    tree = MedusaTree.from_choices(
        [c for c in DEFAULT_CHOICES if len(c) <= heads_config.num_heads])
  if tree.depth > heads_config.num_heads:
    raise ValueError(f"the tree is {tree.depth} deep but there are only {heads_config.num_heads} "
                     "heads; build the tree with max_depth=num_heads or train more heads")
  if tree.top_k > config.vocab_size:
    raise ValueError(f"the tree reads top-{tree.top_k} ranks but the vocabulary has "
                     f"{config.vocab_size} tokens")
  prompts_np = np.asarray(prompts)
  if prompt_lengths is None:
    prompt_lengths = np.full((prompts_np.shape[0],) if prompts_np.ndim == 2 else (0,),
                             prompts_np.shape[-1] if prompts_np.ndim else 0, np.int32)
  lengths_np = np.asarray(prompt_lengths).astype(np.int32)
  # The engine's checks (shapes, ids, lengths); the cache bound is checked below with the tree.
  needed = _check_inputs(config, prompts_np, lengths_np, max_new_tokens, cache_len=1 << 62)
  # Worst case: the last active pass starts at prompt + max_new - 2 and writes tree.size slots.
  needed += tree.size
  limit = config.max_len if cache_len is None else cache_len
  if needed > limit:
    what = "config.max_len" if cache_len is None else "cache_len"
    raise ValueError(
        f"the Medusa tree has {tree.size} tokens (root included) but the cache cannot take them: "
        f"prompt {int(lengths_np.max())} + max_new_tokens {max_new_tokens} + tree {tree.size} = "
        f"{needed} > {limit} slots ({what}); raise {what}, use a smaller tree or fewer new tokens")
  rnd = bucket_length if bucket else (lambda n: int(n))
  if cache_len is None:
    cache_len = min(rnd(needed), config.max_len)
  p = min(rnd(int(lengths_np.max())), cache_len)
  block = prompt_block(prompts_np, lengths_np, p)
  buf_len = rnd(max_new_tokens + tree.depth + 1)
  rng = jax.random.key(0) if rng is None else rng
  out = _generate_jit(params, head_params, jnp.asarray(block), jnp.asarray(lengths_np),
                      jnp.int32(max_new_tokens), jnp.int32(-1 if eos_id is None else eos_id),
                      jnp.int32(pad_id), rng, config=config, heads_config=heads_config,
                      tree=tree, sampling=sampling, typical=typical, buf_len=buf_len,
                      cache_len=int(cache_len))
  return MedusaOutput(tokens=out.tokens[:, :max_new_tokens], lengths=out.lengths,
                      finished=out.finished, num_passes=out.num_passes,
                      accept_counts=out.accept_counts)
