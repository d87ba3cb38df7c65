"""On-policy distillation (GKD, Agarwal et al. 2024; DistillSpec, Zhou et al. 2023): the student
writes, the teacher grades.

Each step the student samples a continuation of each prompt with its own KV cache (a `lax.scan`
inside the jitted train step, on stop-gradient parameters), then teacher and student score the
whole sequence in one forward each, and a divergence between their next-token distributions is
minimised on the generated positions only. Training on the student's own prefixes removes the
train/inference mismatch of offline KD: a speculative draft is judged on the contexts it will
itself produce.

Letters: B batch, P prompt length, G generated tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.distill import losses
from effjax.models.lm import LM, LMConfig, init_cache


def sample_continuations(params, cfg: LMConfig, prompts: jax.Array, gen_len: int,
                         rng: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Samples `gen_len` tokens after full-length prompts [B, P]; returns [B, P + G] int32.

  Temperature 0 is greedy. The parameters are not differentiated through.
  """
  params = jax.lax.stop_gradient(params)
  b, p = prompts.shape
  model = LM(cfg)
  out = model.apply(params, prompts, cache=init_cache(cfg, b, p + gen_len))
  first_logits = out.logits[:, -1]  # [B, V]

  def pick(key, logits):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  def step(carry, key):
    cache, logits = carry
    tok = pick(key, logits)  # [B]
    nxt = model.apply(params, tok[:, None], cache=cache)
    return (nxt.cache, nxt.logits[:, 0]), tok

  keys = jax.random.split(rng, gen_len)
  _, toks = jax.lax.scan(step, (out.cache, first_logits), keys)  # toks [G, B]
  return jnp.concatenate([prompts.astype(jnp.int32), toks.T], axis=1)  # [B, P + G]


def on_policy_loss(student_params, teacher_params, student_cfg: LMConfig, teacher_cfg: LMConfig,
                   prompts: jax.Array, rng: jax.Array, *, divergence: str, gen_len: int,
                   sample_temperature: float = 1.0, kd_temperature: float = 1.0):
  """One on-policy distillation loss.

  Args:
    student_params, teacher_params: LM variables (the teacher is never differentiated).
    student_cfg, teacher_cfg: their configs (same vocabulary).
    prompts: [B, P] int32 full-length prompts.
    rng: sampling key.
    divergence: one of `losses.DIVERGENCES`.
    gen_len: G, tokens the student writes per prompt.
    sample_temperature: the student's sampling temperature (1.0: its own distribution).
    kd_temperature: temperature of the divergence.

  Returns:
    (loss, metrics) with the divergence over the G generated positions.
  """
  seq = sample_continuations(student_params, student_cfg, prompts, gen_len, rng,
                             sample_temperature)  # [B, P + G]
  inputs = seq[:, :-1]  # [B, P + G - 1]; position t predicts seq[:, t + 1]
  p = prompts.shape[1]
  t_logits = LM(teacher_cfg).apply(jax.lax.stop_gradient(teacher_params), inputs).logits
  s_logits = LM(student_cfg).apply(student_params, inputs).logits  # [B, P + G - 1, V]
  mask = (jnp.arange(inputs.shape[1]) >= p - 1)[None, :].repeat(inputs.shape[0], 0)  # [B, P+G-1]
  loss = losses.divergence(divergence, t_logits, s_logits, mask, temperature=kd_temperature)
  # 1 - TVD at temperature 1 is the speculative acceptance rate alpha on these contexts.
  alpha = 1.0 - losses.total_variation(t_logits, s_logits, mask)
  return loss, {"alpha": alpha, "tokens": mask.sum().astype(jnp.float32)}
