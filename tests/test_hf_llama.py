"""Hugging Face Llama interop: parity with transformers, exact round trips, clear refusals."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from effjax.generate import engine  # noqa: E402
from effjax.interop import hf_llama  # noqa: E402
from effjax.models import LM, random_params, registry  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_model(num_kv_heads: int, scaled: bool, tied: bool = False, seed: int = 0):
  """A tiny random-weight LlamaForCausalLM, float32, eager attention."""
  torch.manual_seed(seed)
  kw = {"rope_scaling": dict(LLAMA3_SCALING)} if scaled else {}
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
      max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, initializer_range=0.1, attn_implementation="eager",
      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
  return transformers.LlamaForCausalLM(cfg).eval()


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, ids):
  return LM(cfg).apply(params, ids).logits  # [B, T, V]




def _ids(batch, length, vocab=96, seed=0):
  return torch.from_numpy(np.random.default_rng(seed).integers(3, vocab, (batch, length)))


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("scaled", [False, True], ids=["rope", "llama3_rope"])
def test_logits_and_greedy_generation_match_transformers(num_kv_heads, scaled):
  model = _hf_model(num_kv_heads, scaled)
  params, cfg = hf_llama.from_hf_model(model, matmul_precision="highest")
  assert cfg.num_kv_heads == num_kv_heads
  assert (cfg.rope_scaling is not None) == scaled
  ids = _ids(2, 48)  # past original_max_position_embeddings=16, so the scaling matters
  with torch.inference_mode():
    want = model(ids).logits.numpy()
  got = np.asarray(_logits(cfg, params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  prompt = ids[:, :20]
  with torch.inference_mode():
    hf_out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
  ours = engine.generate(params, cfg, prompt.numpy(), max_new_tokens=24)
  np.testing.assert_array_equal(np.asarray(ours.tokens), hf_out[:, 20:].numpy())


def test_rope_scaling_is_really_applied():
  """Guards the parity test: the same weights with and without Llama-3 scaling must differ."""
  params, cfg = hf_llama.from_hf_model(_hf_model(2, scaled=True), matmul_precision="highest")
  ids = jnp.asarray(_ids(1, 48))
  scaled = _logits(cfg, params, ids)
  plain = _logits(cfg.replace(rope_scaling=None), params, ids)
  assert float(jnp.abs(scaled - plain).max()) > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [None, 40_000], ids=["single", "sharded"])
def test_import_export_import_round_trip_is_exact(tmp_path, tied, shard):
  model = _hf_model(2, scaled=True, tied=tied, seed=1)
  params, cfg = hf_llama.from_hf_model(model)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  loaded, cfg_dir = hf_llama.load_hf_dir(str(tmp_path / "hf"))
  assert cfg_dir == cfg
  hf_llama.save_hf_dir(loaded, cfg, str(tmp_path / "out"), max_shard_bytes=shard)
  if shard:
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
  again, cfg_again = hf_llama.load_hf_dir(str(tmp_path / "out"))
  assert cfg_again == cfg
  for tree in (loaded, again):
    flat_a, flat_b = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(tree)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, a), (_, b) in zip(flat_a, flat_b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  # transformers reads our export back to the same weights and logits.
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           attn_implementation="eager").eval()
  for name, w in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), w.numpy(), err_msg=name)


def test_effjax_model_exports_to_an_equivalent_transformers_model():
  cfg = registry.get("lm/tiny", matmul_precision="highest", rope_scaling=(4.0, 1.0, 4.0, 32))
  params = random_params(cfg, 3)
  model = hf_llama.to_hf_model(params, cfg)
  ids = _ids(2, 40, vocab=cfg.vocab_size, seed=4)
  with torch.inference_mode():
    want = model(ids).logits.numpy()
  got = np.asarray(_logits(cfg, params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_as_bfloat16(tmp_path):
  model = _hf_model(2, scaled=False).to(torch.bfloat16)
  model.save_pretrained(tmp_path, safe_serialization=True)
  params, cfg = hf_llama.load_hf_dir(str(tmp_path))
  assert cfg.param_dtype == "bfloat16"
  wq = params["params"]["layer_0"]["attn"]["wq"]
  assert wq.dtype == jnp.bfloat16
  ref = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T.reshape(64, 4, 16)
  np.testing.assert_array_equal(np.asarray(wq, np.float32), ref)


def test_other_architecture_is_refused(tmp_path):
  torch.manual_seed(0)
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32))
  gpt2.save_pretrained(tmp_path, safe_serialization=True)
  with pytest.raises(ValueError, match="only LlamaForCausalLM"):
    hf_llama.load_hf_dir(str(tmp_path))


@pytest.mark.parametrize("edit, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "yarn"),
])
def test_unsupported_llama_features_are_refused(edit, match):
  c = hf_llama.hf_config_dict(registry.get("lm/tiny"))
  c.update(edit)
  with pytest.raises(ValueError, match=match):
    hf_llama.config_from_hf(c)


def test_missing_files_and_mismatched_shapes_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    hf_llama.load_hf_dir(str(tmp_path))
  params, cfg = hf_llama.from_hf_model(_hf_model(2, scaled=False))
  hf_llama.save_hf_dir(params, cfg, str(tmp_path))
  c = json.loads((tmp_path / "config.json").read_text())
  c["intermediate_size"] += 8
  (tmp_path / "config.json").write_text(json.dumps(c))
  with pytest.raises(ValueError, match="does not match the weights"):
    hf_llama.load_hf_dir(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    hf_llama.load_hf_dir(str(tmp_path))
