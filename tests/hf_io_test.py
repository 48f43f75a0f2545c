"""Parity with HF transformers (PyTorch, f32) through load_hf, export round trips, bad input.

Reference models are random tiny Qwen2/Qwen3 models built locally from configs (no hub),
with every weight re-drawn (HF inits biases to 0 and norms to 1, which would hide mapping
bugs in those tensors), saved with `save_pretrained` and read back with `load_hf`.
"""

import json
import os
import tempfile

from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
import torch
import transformers

from mar import models
from mar.models import hf_io
from mar.models import model as M

TOL = 1e-4
_WORST = {"diff": 0.0, "case": None}  # worst logit difference over all parity cases


def tearDownModule():
  logging.info("worst |logit diff| over parity cases: %.3g (%s)", _WORST["diff"], _WORST["case"])
  print(f"\nworst |logit diff| over parity cases: {_WORST['diff']:.3g} ({_WORST['case']})")


def tmpdir(test) -> str:
  """A temporary folder removed when `test` ends."""
  return test.enterContext(tempfile.TemporaryDirectory())


def hf_model(model_type="qwen3", tied=True, heads=4, kv_heads=2, head_dim=None, theta=1e6,
             hidden=32, layers=2, vocab=97, inter=48, seed=0):
  """A random f32 HF model with every parameter re-drawn."""
  cls_cfg, cls_model = {
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
  }[model_type]
  kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            tie_word_embeddings=tied, max_position_embeddings=256, rms_norm_eps=1e-6)
  if head_dim is not None:
    kw["head_dim"] = head_dim
  torch.manual_seed(seed)
  model = cls_model(cls_cfg(**kw)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "embed" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.15)
  return model


def hf_logits(model, tokens, mask=None):
  """HF reference; with a mask, explicit positions that skip left padding."""
  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask)
    kw["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw).logits.float().numpy()


def save_and_load(model, path, dtype=jnp.float32):
  model.save_pretrained(path)
  return models.load_hf(path, dtype=dtype)


_forward = jax.jit(M.forward, static_argnums=0)
_forward_cached = jax.jit(M.forward_cached, static_argnums=0)
_logits = jax.jit(M.logits_from_hidden, static_argnums=0)


def cached_logits(config, params, tokens, mask, prefill, max_len=16):
  """Prefill `prefill` tokens, then a 2-token chunk, then decode one token at a time."""
  b, t = tokens.shape
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  cache = M.init_cache(config, b, max_len)
  bounds = [0, prefill, min(prefill + 2, t)] + list(range(prefill + 3, t + 1))
  outs = []
  for s, e in zip(bounds[:-1], bounds[1:]):
    if e <= s:
      continue
    h, cache = _forward_cached(config, params, jnp.asarray(tokens[:, s:e]), jnp.asarray(pos[:, s:e]),
                               jnp.asarray(mask[:, s:e]), cache, jnp.full((b,), s, jnp.int32))
    outs.append(np.asarray(_logits(config, params, h)))
  return np.concatenate(outs, axis=1)


# name, model_type, tied, heads, kv_heads, head_dim (None = hidden / heads), rope_theta
PARITY_CASES = (
    ("qwen2_tied_gqa2", "qwen2", True, 4, 2, None, 1e4),
    ("qwen2_untied_mha_headdim16", "qwen2", False, 4, 4, 16, 1e6),
    ("qwen2_tied_gqa4_headdim12", "qwen2", True, 8, 2, 12, 5e6),
    ("qwen3_tied_gqa4_headdim16", "qwen3", True, 8, 2, 16, 1e6),
    ("qwen3_untied_gqa2_headdim24", "qwen3", False, 4, 2, 24, 5e6),
    ("qwen3_tied_mha", "qwen3", True, 2, 2, None, 1e4),
    ("qwen3_untied_mqa8", "qwen3", False, 8, 1, 8, 1e6),
)


class ParityTest(parameterized.TestCase):

  def assert_close(self, ref, out, case, what):
    diff = float(np.max(np.abs(ref - out)))
    if diff > _WORST["diff"]:
      _WORST.update(diff=diff, case=f"{case}/{what}")
    self.assertLess(diff, TOL, f"{case} {what}: max |diff| {diff:.3g}")

  @parameterized.named_parameters(*PARITY_CASES)
  def test_logits_match_transformers(self, model_type, tied, heads, kv_heads, head_dim, theta):
    case = self._testMethodName
    hf = hf_model(model_type, tied, heads, kv_heads, head_dim, theta)
    config, params = save_and_load(hf, tmpdir(self))
    self.assertEqual(config.model_type, model_type)
    self.assertEqual(config.rope_theta, theta)
    self.assertEqual(config.group_size, heads // kv_heads)
    self.assertEqual(config.tie_word_embeddings, tied)
    self.assertEqual("lm_head" in params, not tied)

    rng = np.random.RandomState(1)
    tokens = rng.randint(0, config.vocab_size, (3, 9))
    ref = hf_logits(hf, tokens)
    out = np.asarray(_forward(config, params, jnp.asarray(tokens)))
    self.assert_close(ref, out, case, "no padding")

    # Left padding: 0, 3 and 5 pad slots; only real positions are compared.
    mask = np.ones((3, 9), np.int32)
    mask[1, :3] = 0
    mask[2, :5] = 0
    real = mask.astype(bool)
    ref = hf_logits(hf, tokens, mask)
    out = np.asarray(_forward(config, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    self.assert_close(ref[real], out[real], case, "left padding")

    cached = cached_logits(config, params, tokens, mask, prefill=5)
    self.assert_close(ref[real], cached[real], case, "cached")
    self.assert_close(out[real], cached[real], case, "cached vs uncached")

  def test_bf16_checkpoint_loads_exactly(self):
    hf = hf_model("qwen2", tied=False).to(torch.bfloat16)
    path = tmpdir(self)
    hf.save_pretrained(path)
    config, params = models.load_hf(path, dtype=jnp.float32)
    self.assertEqual(config.torch_dtype, "bfloat16")
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*Dh, D]
    d, k, r, dh = config.hidden_size, config.num_kv_heads, config.group_size, config.head_dim
    np.testing.assert_array_equal(np.asarray(params["layers"]["qkv"][1, :, :, :r]),
                                  q.T.reshape(d, k, r, dh))
    config16, params16 = models.load_hf(path, dtype=jnp.bfloat16)
    self.assertEqual(config16.dtype, jnp.bfloat16)
    self.assertEqual(params16["embed"].dtype, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(params16["lm_head"], np.float32),
                                  np.asarray(params["lm_head"]))


class ExportTest(parameterized.TestCase):

  @parameterized.named_parameters(("qwen2_tied", "qwen2", True), ("qwen3_untied", "qwen3", False))
  def test_transformers_loads_export(self, model_type, tied):
    hf = hf_model(model_type, tied, heads=4, kv_heads=2, head_dim=16, theta=5e6)
    config, params = save_and_load(hf, tmpdir(self))
    out = tmpdir(self)
    models.save_hf(out, config, params)
    self.assertEqual(sorted(os.listdir(out)), ["config.json", "model.safetensors"])
    names = set(load_file(os.path.join(out, "model.safetensors")))
    self.assertEqual("lm_head.weight" in names, not tied)
    self.assertEqual(names | {"lm_head.weight"}, set(hf.state_dict()) | {"lm_head.weight"})

    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    self.assertEqual(type(back), type(hf))
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 7))
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(hf, tokens), atol=1e-6, rtol=0)
    ours = np.asarray(_forward(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(hf_logits(back, tokens), ours, atol=TOL, rtol=0)

  def test_sharded_export_with_index(self):
    hf = hf_model("qwen3", tied=False)
    config, params = save_and_load(hf, tmpdir(self))
    out = tmpdir(self)
    models.save_hf(out, config, params, max_shard_size=20_000)
    with open(os.path.join(out, hf_io.INDEX_FILE)) as f:
      index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    self.assertGreater(len(shards), 2)
    self.assertEqual(sorted(os.listdir(out)), sorted(shards + ["config.json", hf_io.INDEX_FILE]))
    for shard in shards:  # each shard within the limit unless it holds one large tensor
      tensors = load_file(os.path.join(out, shard))
      size = sum(t.nbytes for t in tensors.values())
      self.assertTrue(size <= 20_000 or len(tensors) == 1, (shard, size))
    self.assertEqual(index["metadata"]["total_size"],
                     sum(x.size * 4 for x in jax.tree.leaves(params)))

    _, again = models.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokens = np.random.RandomState(3).randint(0, config.vocab_size, (2, 5))
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(hf, tokens), atol=1e-6, rtol=0)

    # Re-exporting as one file removes the stale shards and index.
    models.save_hf(out, config, params)
    self.assertEqual(sorted(os.listdir(out)), ["config.json", "model.safetensors"])

  def test_bf16_export(self):
    config = models.QwenConfig.tiny("qwen2", vocab_size=64)
    params = models.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    out = tmpdir(self)
    models.save_hf(out, config, params)
    with open(os.path.join(out, "config.json")) as f:
      self.assertEqual(json.load(f)["torch_dtype"], "bfloat16")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    self.assertEqual(back.model.embed_tokens.weight.dtype, torch.bfloat16)
    config2, params2 = models.load_hf(out, dtype=jnp.bfloat16)
    self.assertEqual(config2.replace(dtype=config.dtype, torch_dtype=config.torch_dtype), config)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def _write_checkpoint(path, config=None):
  """Our export of a random tiny model; returns (path, tensors dict)."""
  config = config or models.QwenConfig.tiny("qwen3", vocab_size=64).replace(
      tie_word_embeddings=False, num_layers=2)
  params = models.init_params(config, jax.random.key(0))
  models.save_hf(path, config, params)
  return path, load_file(os.path.join(path, "model.safetensors"))


class BadInputTest(absltest.TestCase):

  def test_missing_folder(self):
    with self.assertRaisesRegex(FileNotFoundError, "/no/such/model: model folder does not exist"):
      models.load_hf("/no/such/model")

  def test_no_weights(self):
    path, _ = _write_checkpoint(tmpdir(self))
    os.remove(os.path.join(path, "model.safetensors"))
    with self.assertRaisesRegex(FileNotFoundError,
                                "no model.safetensors or model.safetensors.index.json"):
      models.load_hf(path)

  def test_missing_config(self):
    path, _ = _write_checkpoint(tmpdir(self))
    os.remove(os.path.join(path, "config.json"))
    with self.assertRaisesRegex(FileNotFoundError, f"{path}/config.json: no config.json"):
      models.load_hf(path)

  def test_unsupported_model_type(self):
    path, _ = _write_checkpoint(tmpdir(self))
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
      d = json.load(f)
    d["model_type"] = "llama"
    with open(cfg_path, "w") as f:
      json.dump(d, f)
    with self.assertRaisesRegex(ValueError, f"{cfg_path}: unsupported model_type 'llama'"):
      models.load_hf(path)

  def _rewrite(self, path, tensors):
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

  def test_corrupt_file(self):
    path, _ = _write_checkpoint(tmpdir(self))
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
      f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with self.assertRaisesRegex(ValueError, r"model.safetensors: not a readable safetensors file"):
      models.load_hf(path)

  def test_missing_tensor(self):
    path, tensors = _write_checkpoint(tmpdir(self))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    self._rewrite(path, tensors)
    with self.assertRaisesRegex(
        ValueError, r"missing tensor 'model.layers.1.mlp.up_proj.weight', expected shape "
        r"\(352, 128\); not in \['.*model.safetensors'\]"):
      models.load_hf(path)

  def test_extra_tensor(self):
    path, tensors = _write_checkpoint(tmpdir(self))
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    self._rewrite(path, tensors)
    with self.assertRaisesRegex(
        ValueError, r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"):
      models.load_hf(path)

  def test_extra_layer(self):
    path, tensors = _write_checkpoint(tmpdir(self))
    tensors["model.layers.2.input_layernorm.weight"] = np.ones((128,), np.float32)
    self._rewrite(path, tensors)
    with self.assertRaisesRegex(ValueError, r"'model.layers.2.input_layernorm.weight' is for "
                                r"layer 2 but config.json has num_hidden_layers=2"):
      models.load_hf(path)

  def test_bias_in_qwen3(self):
    path, tensors = _write_checkpoint(tmpdir(self))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((128,), np.float32)
    self._rewrite(path, tensors)
    with self.assertRaisesRegex(ValueError, r"unexpected tensor 'model.layers.0.self_attn.q_proj"
                                r".bias' for a qwen3 config"):
      models.load_hf(path)

  def test_shape_mismatch(self):
    path, tensors = _write_checkpoint(tmpdir(self))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((60, 128), np.float32)
    self._rewrite(path, tensors)
    with self.assertRaisesRegex(
        ValueError, r"model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has "
        r"shape \(60, 128\), expected \(64, 128\)"):
      models.load_hf(path)

  def test_config_disagrees_with_weights(self):
    path, _ = _write_checkpoint(tmpdir(self))
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
      d = json.load(f)
    d["intermediate_size"] = 300
    with open(cfg_path, "w") as f:
      json.dump(d, f)
    with self.assertRaisesRegex(ValueError, r"tensor 'model.layers.0.mlp.(gate|up|down)_proj."
                                r"weight' has shape \((352, 128|128, 352)\), expected"):
      models.load_hf(path)

  def test_index_names_missing_shard(self):
    config = models.QwenConfig.tiny("qwen2", vocab_size=64)
    params = models.init_params(config, jax.random.key(0))
    path = tmpdir(self)
    models.save_hf(path, config, params, max_shard_size=50_000)
    with open(os.path.join(path, hf_io.INDEX_FILE)) as f:
      shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    self.assertRegex(shard, r"model-00002-of-000\d\d.safetensors")
    os.remove(os.path.join(path, shard))
    with self.assertRaisesRegex(FileNotFoundError, r"model.safetensors.index.json: tensor '.*' is "
                                f"in '{shard}', which is missing"):
      models.load_hf(path)

  def test_tied_checkpoint_with_lm_head_is_accepted(self):
    config = models.QwenConfig.tiny("qwen3", vocab_size=64)  # tied
    params = models.init_params(config, jax.random.key(0))
    path = tmpdir(self)
    models.save_hf(path, config, params)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    self._rewrite(path, tensors)
    _, loaded = models.load_hf(path)
    self.assertNotIn("lm_head", loaded)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

  def test_save_rejects_wrong_params(self):
    config = models.QwenConfig.tiny("qwen3", vocab_size=64)
    params = models.init_params(config, jax.random.key(0))
    params["layers"]["qkv"] = params["layers"]["qkv"][:, :, :1]
    with self.assertRaisesRegex(ValueError, r"params: leaf 'layers/qkv' has shape "
                                r"\(2, 128, 1, 4, 32\), expected \(2, 128, 2, 4, 32\)"):
      models.save_hf(tmpdir(self), config, params)


if __name__ == "__main__":
  absltest.main()
