"""Hugging Face Llama interop: import `LlamaForCausalLM` weights into effjax and export them back.

Why: users bring real checkpoints when they have them, and transformers is our numerical peer (parity
tests and the decode benchmark run the same weights in both). Only numpy and safetensors are needed to
read and write a `save_pretrained` directory; torch and transformers are imported lazily, only for
in-memory models.

Weight layout (transformers stores Linear weights as [out, in]; effjax keeps named head axes):

  model.embed_tokens.weight             [V, D]     -> embed [V, D]
  model.layers.i.self_attn.q_proj.weight [N*H, D]  -> layer_i/attn/wq [D, N, H]
  model.layers.i.self_attn.k_proj.weight [K*H, D]  -> layer_i/attn/wk [D, K, H]   (v_proj likewise)
  model.layers.i.self_attn.o_proj.weight [D, N*H]  -> layer_i/attn/wo [N, H, D]
  model.layers.i.mlp.gate_proj.weight    [F, D]    -> layer_i/mlp/gate [D, F]     (up_proj likewise)
  model.layers.i.mlp.down_proj.weight    [D, F]    -> layer_i/mlp/down [F, D]
  model.layers.i.input_layernorm.weight  [D]       -> layer_i/attn_norm/scale
  model.layers.i.post_attention_layernorm.weight   -> layer_i/mlp_norm/scale
  model.norm.weight                      [D]       -> final_norm/scale
  lm_head.weight                         [V, D]    -> lm_head [D, V] (absent when tied)

Both use the same `rotate_half` RoPE over the head layout above, so no q/k permutation is needed
(unlike Meta's original checkpoints). Key names are those of transformers 5.x.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models.lm import LMConfig

SUPPORTED_ROPE_TYPES = ("default", "llama3")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ---------------------------------------------------------------------------------------- config
def config_from_hf(hf_config: Any, **overrides) -> LMConfig:
  """An `LMConfig` from a transformers `LlamaConfig` or its `config.json` dict.

  Args:
    hf_config: `LlamaConfig` or dict.
    **overrides: LMConfig fields to set (e.g. `dtype="float32"`, `matmul_precision="highest"`).

  Raises:
    ValueError: the config is not a Llama causal LM, or uses a feature effjax's LM lacks.
  """
  c = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  archs = c.get("architectures") or []
  model_type = c.get("model_type")
  if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
    raise ValueError(f"this is a {archs or model_type!r} checkpoint (model_type={model_type!r}); "
                     "effjax imports only LlamaForCausalLM checkpoints. Convert the model to the "
                     "Llama architecture or pick a Llama checkpoint")
  for flag in ("attention_bias", "mlp_bias"):
    if c.get(flag):
      raise ValueError(f"{flag}=True is not supported: effjax's LM has no biases (Llama has none); "
                       "this checkpoint is not a standard Llama")
  if c.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={c['hidden_act']!r}; effjax's LM uses SwiGLU (silu) only")
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"RoPE type {rope_type!r} is not supported; effjax implements "
                     f"{SUPPORTED_ROPE_TYPES} (Llama-3 scaling or none)")
  theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
  scaling = None
  if rope_type == "llama3":
    scaling = (float(rope["factor"]), float(rope["low_freq_factor"]),
               float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
  heads = int(c["num_attention_heads"])
  dtype = _DTYPE_NAMES.get(str(c.get("dtype") or c.get("torch_dtype") or "float32"), "float32")
  kw = dict(
      vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]),
      num_layers=int(c["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(c.get("num_key_value_heads") or heads),
      head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
      mlp_dim=int(c["intermediate_size"]), max_len=int(c.get("max_position_embeddings", 2048)),
      rope_theta=theta, rope_scaling=scaling, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype)
  kw.update(overrides)
  return LMConfig(**kw)


def hf_config_dict(config: LMConfig, bos_token_id: Optional[int] = None,
                   eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None) -> dict:
  """The `config.json` dict of a transformers `LlamaForCausalLM` with `config`'s shapes."""
  rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
  if config.rope_scaling is not None:
    factor, low, high, old = config.rope_scaling
    rope = {"rope_type": "llama3", "rope_theta": float(config.rope_theta), "factor": float(factor),
            "low_freq_factor": float(low), "high_freq_factor": float(high),
            "original_max_position_embeddings": int(old)}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "max_position_embeddings": config.max_len,
      "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
      "rope_parameters": rope, "rope_theta": float(config.rope_theta),
      "rope_scaling": None if config.rope_scaling is None else rope,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
      "dtype": config.param_dtype,
  }


# --------------------------------------------------------------------------------------- weights
def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor; bf16 goes through float32 (numpy has no bf16 in torch)
    import torch
    t = x.detach().cpu()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
  return np.asarray(x)


def params_from_state_dict(state: Mapping[str, Any], config: LMConfig) -> dict:
  """effjax variables `{'params': ...}` from a transformers Llama state dict (numpy or torch).

  Raises:
    ValueError: a weight is missing or has the wrong shape for `config`.
  """
  d, n, k, h, f = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_dim)
  pdt = config.weight_dtype

  def get(name, shape):
    if name not in state:
      raise ValueError(f"weight {name!r} is missing from the checkpoint; is it a "
                       "LlamaForCausalLM saved by transformers 4.x/5.x?")
    w = _np(state[name])
    if tuple(w.shape) != shape:
      raise ValueError(f"weight {name!r} has shape {tuple(w.shape)} but the config implies "
                       f"{shape}; the config.json does not match the weights")
    return w

  def put(w):
    return jnp.asarray(w, dtype=pdt)

  p: dict[str, Any] = {"embed": put(get("model.embed_tokens.weight", (config.vocab_size, d)))}
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    att = pre + "self_attn."
    p[f"layer_{i}"] = {
        "attn_norm": {"scale": put(get(pre + "input_layernorm.weight", (d,)))},
        "mlp_norm": {"scale": put(get(pre + "post_attention_layernorm.weight", (d,)))},
        "attn": {
            "wq": put(get(att + "q_proj.weight", (n * h, d)).T.reshape(d, n, h)),
            "wk": put(get(att + "k_proj.weight", (k * h, d)).T.reshape(d, k, h)),
            "wv": put(get(att + "v_proj.weight", (k * h, d)).T.reshape(d, k, h)),
            "wo": put(get(att + "o_proj.weight", (d, n * h)).T.reshape(n, h, d)),
        },
        "mlp": {
            "gate": put(get(pre + "mlp.gate_proj.weight", (f, d)).T),
            "up": put(get(pre + "mlp.up_proj.weight", (f, d)).T),
            "down": put(get(pre + "mlp.down_proj.weight", (d, f)).T),
        },
    }
  p["final_norm"] = {"scale": put(get("model.norm.weight", (d,)))}
  if not config.tie_embeddings:
    p["lm_head"] = put(get("lm_head.weight", (config.vocab_size, d)).T)
  return {"params": p}


def state_dict_from_params(params, config: LMConfig) -> dict[str, np.ndarray]:
  """A transformers Llama state dict (numpy, contiguous) from effjax variables."""
  p = params["params"] if "params" in params else params
  d, n, k, h = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
  host = jax.device_get(p)
  c = lambda x: np.ascontiguousarray(np.asarray(x))
  sd = {"model.embed_tokens.weight": c(host["embed"]),
        "model.norm.weight": c(host["final_norm"]["scale"])}
  for i in range(config.num_layers):
    lay, pre = host[f"layer_{i}"], f"model.layers.{i}."
    a, m = lay["attn"], lay["mlp"]
    sd[pre + "input_layernorm.weight"] = c(lay["attn_norm"]["scale"])
    sd[pre + "post_attention_layernorm.weight"] = c(lay["mlp_norm"]["scale"])
    sd[pre + "self_attn.q_proj.weight"] = c(np.asarray(a["wq"]).reshape(d, n * h).T)
    sd[pre + "self_attn.k_proj.weight"] = c(np.asarray(a["wk"]).reshape(d, k * h).T)
    sd[pre + "self_attn.v_proj.weight"] = c(np.asarray(a["wv"]).reshape(d, k * h).T)
    sd[pre + "self_attn.o_proj.weight"] = c(np.asarray(a["wo"]).reshape(n * h, d).T)
    sd[pre + "mlp.gate_proj.weight"] = c(np.asarray(m["gate"]).T)
    sd[pre + "mlp.up_proj.weight"] = c(np.asarray(m["up"]).T)
    sd[pre + "mlp.down_proj.weight"] = c(np.asarray(m["down"]).T)
  if not config.tie_embeddings:
    sd["lm_head.weight"] = c(np.asarray(host["lm_head"]).T)
  return sd


# ------------------------------------------------------------------------------ in-memory models
def from_hf_model(model, **overrides) -> tuple[dict, LMConfig]:
  """(variables, config) from an in-memory transformers `LlamaForCausalLM`."""
  config = config_from_hf(model.config, **overrides)
  return params_from_state_dict(model.state_dict(), config), config


def to_hf_model(params, config: LMConfig, attn_implementation: str = "eager", **config_kw):
  """An in-memory transformers `LlamaForCausalLM` (float32, eval mode) holding these weights."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  cfg_dict = hf_config_dict(config, **config_kw)
  cfg_dict.pop("architectures")
  cfg_dict.pop("model_type")
  cfg_dict.pop("dtype")
  hf_config = LlamaConfig(**cfg_dict, attn_implementation=attn_implementation)
  model = LlamaForCausalLM(hf_config)
  sd = {name: torch.from_numpy(np.array(w, np.float32))
        for name, w in state_dict_from_params(params, config).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
  if missing or unexpected:
    raise ValueError(f"weight names do not match this transformers version: missing {missing}, "
                     f"unexpected {unexpected}")
  if config.tie_embeddings:
    model.tie_weights()
  return model.eval()


# ------------------------------------------------------------------------------------ directories
def read_hf_config(path: str) -> dict:
  """The `config.json` of a transformers directory, with a clear error when absent."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found; --hf_dir must be a directory written by "
                            "transformers' save_pretrained (config.json + *.safetensors)")
  with open(cfg_path) as fh:
    return json.load(fh)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  index = os.path.join(path, _SAFETENSORS_INDEX)
  if os.path.isfile(index):
    with open(index) as fh:
      files = sorted(set(json.load(fh)["weight_map"].values()))
  elif os.path.isfile(os.path.join(path, _SAFETENSORS_SINGLE)):
    files = [_SAFETENSORS_SINGLE]
  else:
    raise FileNotFoundError(f"no {_SAFETENSORS_SINGLE} or {_SAFETENSORS_INDEX} in {path}; save "
                            "the model with save_pretrained(..., safe_serialization=True)")
  state: dict[str, np.ndarray] = {}
  for name in files:
    state.update(load_file(os.path.join(path, name)))
  return state


def load_hf_dir(path: str, **overrides) -> tuple[dict, LMConfig]:
  """(variables, config) from a `save_pretrained` directory (sharded or single safetensors).

  Args:
    path: the directory.
    **overrides: LMConfig fields, e.g. `dtype="float32", param_dtype="float32"` to upcast.
  """
  config = config_from_hf(read_hf_config(path), **overrides)
  return params_from_state_dict(_read_safetensors(path), config), config


def save_hf_dir(params, config: LMConfig, path: str, max_shard_bytes: Optional[int] = None,
                **config_kw) -> None:
  """Writes `config.json` and safetensors that `LlamaForCausalLM.from_pretrained` loads.

  Args:
    params: effjax variables.
    config: their config.
    path: output directory (created).
    max_shard_bytes: split weights into shards of at most this size, with an index file, as
      transformers does for large models (None: one file).
    **config_kw: bos_token_id / eos_token_id / pad_token_id for config.json.
  """
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_config_dict(config, **config_kw), fh, indent=2)
  sd = state_dict_from_params(params, config)
  meta = {"format": "pt"}
  if max_shard_bytes is None:
    save_file(sd, os.path.join(path, _SAFETENSORS_SINGLE), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, w in sd.items():
    if shards[-1] and size + w.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = w
    size += w.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(path, _SAFETENSORS_INDEX), "w") as fh:
    json.dump({"metadata": {"total_size": sum(w.nbytes for w in sd.values())},
               "weight_map": weight_map}, fh, indent=2)
