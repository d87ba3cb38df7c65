r"""Streams text from a trained effjax LM or a Hugging Face Llama directory.

From a training workdir (reads `WORKDIR/config.json` and the latest checkpoint):

  python -m experiments.generate --workdir=/tmp/lm_small --prompt "def main(" \
      --max_new_tokens=200 --temperature=0.8 --top_p=0.95

With the experiment config file instead of the workdir's config.json (same model):

  python -m experiments.generate --config=configs/lm/small.py --workdir=/tmp/lm_small --prompt "x"

From a transformers `save_pretrained` directory (config.json + safetensors; `tokenizer.json` if present,
else the byte tokenizer):

  python -m experiments.generate --hf_dir=/path/to/llama --prompt "Hello"

Text goes to stdout as it is made; timing goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file the workdir was trained with (optional: "
    "WORKDIR/config.json is used otherwise).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A transformers LlamaForCausalLM directory.")
_MODEL = flags.DEFINE_string("model", None, "Registry variant (e.g. lm/small) when the config "
                             "does not name one.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (1.0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")


def _plain(obj):
  """ConfigDict / FrozenConfigDict -> plain dict (JSON-like)."""
  if hasattr(obj, "to_dict"):
    return obj.to_dict()
  return obj


def lm_config_from_experiment(cfg: dict, model_name: str | None = None):
  """The LMConfig an experiment config describes.

  Accepted shapes (the trainer's `config.json` or an experiment config): `model: "lm/small"`
  (with optional `model_overrides: {...}`), `model: {name: "lm/small", <overrides>}`, or
  `model: {<LMConfig fields>}`; the same under `lm` or `student`.
  """
  from effjax.models import LMConfig, registry
  import dataclasses
  fields = {f.name for f in dataclasses.fields(LMConfig)}

  def clean(d):
    d = {k: v for k, v in dict(d).items() if k in fields}
    if isinstance(d.get("rope_scaling"), list):
      d["rope_scaling"] = tuple(d["rope_scaling"])
    return d

  if model_name:
    return registry.get(model_name, **clean(cfg.get("model_overrides") or {}))
  for key in ("model", "lm", "student"):
    spec = cfg.get(key)
    if isinstance(spec, str):
      return registry.get(spec, **clean(cfg.get(f"{key}_overrides") or {}))
    if isinstance(spec, dict):
      spec = _plain(spec)
      name = spec.get("name") or spec.get("variant")
      if name:
        return registry.get(name, **clean(spec))
      if "d_model" in spec:
        return LMConfig(**clean(spec))
  raise ValueError("cannot tell which model this config describes (no `model: \"lm/...\"` "
                   "entry); pass --model=lm/<variant>")


def load_from_workdir(workdir: str, config_obj=None, model_name=None, step=None):
  """(params, LMConfig) from an effjax training workdir, via effjax.train.checkpoint."""
  import jax
  from effjax.models import init_params
  from effjax.train import checkpoint as ckpt_lib
  if config_obj is not None:
    cfg = _plain(config_obj)
  else:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found; pass --config=<the experiment config> or "
                              "--hf_dir for a transformers directory")
    with open(path) as fh:
      cfg = json.load(fh)
  lm_cfg = lm_config_from_experiment(cfg, model_name)
  abstract = jax.eval_shape(lambda: init_params(lm_cfg, jax.random.key(0)))
  try:
    params = ckpt_lib.load_params(workdir, abstract, step)
  except ckpt_lib.CheckpointMismatchError:
    # Some trainers store the bare tree rather than {'params': ...}.
    params = {"params": ckpt_lib.load_params(workdir, abstract["params"], step)}
  return params, lm_cfg


class _HFTokenizer:
  def __init__(self, path):
    from tokenizers import Tokenizer
    self._tok = Tokenizer.from_file(path)

  def encode(self, text):
    return self._tok.encode(text).ids

  def decode(self, ids):
    return self._tok.decode(list(ids))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every read at INFO.
  import jax
  from effjax.data.tokenizer import ByteTokenizer
  from effjax.generate import SamplingParams, stream_text
  from effjax.interop import hf_llama

  if bool(_HF_DIR.value) == bool(_WORKDIR.value):
    raise app.UsageError("give exactly one of --workdir (effjax checkpoint) or --hf_dir "
                         "(transformers directory)")
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  eos = None
  if _HF_DIR.value:
    params, cfg = hf_llama.load_hf_dir(_HF_DIR.value, **overrides)
    eos = hf_llama.read_hf_config(_HF_DIR.value).get("eos_token_id")
    tok_path = os.path.join(_HF_DIR.value, "tokenizer.json")
    if os.path.isfile(tok_path):
      tokenizer = _HFTokenizer(tok_path)
      prompt_ids = tokenizer.encode(_PROMPT.value)
    elif cfg.vocab_size >= ByteTokenizer.vocab_size:
      tokenizer = ByteTokenizer()
      prompt_ids = tokenizer.encode(_PROMPT.value, add_bos=True)
    else:
      raise app.UsageError(f"{_HF_DIR.value} has no tokenizer.json and its vocabulary "
                           f"({cfg.vocab_size}) is too small for the byte tokenizer")
  else:
    params, cfg = load_from_workdir(_WORKDIR.value, _CONFIG.value, _MODEL.value, _STEP.value)
    if overrides:
      cfg = cfg.replace(**overrides)
    tokenizer = ByteTokenizer()
    prompt_ids = tokenizer.encode(_PROMPT.value, add_bos=True)
    eos = tokenizer.eos_id
  if not prompt_ids:
    raise app.UsageError("the prompt encodes to no tokens; pass --prompt with some text")
  cache_len = len(prompt_ids) + _MAX_NEW.value
  if cache_len > cfg.max_len:
    cfg = cfg.replace(max_len=cache_len)  # RoPE extrapolates; the cache just needs the room.
  sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  sys.stdout.write(_PROMPT.value)
  sys.stdout.flush()
  start, count = time.perf_counter(), 0
  for piece in stream_text(params, cfg, prompt_ids, tokenizer.decode,
                           max_new_tokens=_MAX_NEW.value, sampling=sampling,
                           rng=jax.random.key(_SEED.value), eos_id=eos):
    count += 1
    sys.stdout.write(piece)
    sys.stdout.flush()
  sys.stdout.write("\n")
  print(f"[{count} text pieces in {time.perf_counter() - start:.2f} s, compilation included]",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
