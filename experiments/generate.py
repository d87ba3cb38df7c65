r"""Streams text from a trained effjax LM or a Hugging Face Llama directory.

From a training workdir (reads `WORKDIR/config.json` and the latest checkpoint):

  python -m experiments.generate --workdir=/tmp/lm_small --prompt "def main(" \
      --max_new_tokens=200 --temperature=0.8 --top_p=0.95

With the experiment config file instead of the workdir's config.json (same model):

  python -m experiments.generate --config=configs/lm/stdlib.py --workdir=/tmp/lm_small --prompt "x"

From a transformers `save_pretrained` directory (config.json + safetensors; `tokenizer.json` if present,
else the byte tokenizer):

  python -m experiments.generate --hf_dir=/path/to/llama --prompt "Hello"

Text goes to stdout as it is made; timing goes to stderr.
"""

from __future__ import annotations

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
_PACK = flags.DEFINE_bool("pack_weights", True, "Decode float32 models too large for the CPU's "
                          "cache from packed weight copies (effjax.models.lm.pack_weights: faster, "
                          "twice the weights' memory); --nopack_weights to keep one copy.")


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
  from effjax.generate.loading import load_from_workdir
  from effjax.interop import hf_llama
  from effjax.models.lm import pack_weights

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
  if _PACK.value:
    params = pack_weights(params, cfg)  # Once: the few-row kernel's layout for every step.
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
