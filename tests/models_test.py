"""Model config parsing, presets, critic head, remat and bf16 compute (no HF weights needed)."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from mar import models
from mar.models import config as config_lib
from mar.models import model as M
from mar.models import sharding

# The config.json of a released Qwen2.5 checkpoint: top-level rope_theta and torch_dtype.
QWEN25_MATH_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 4096,
    "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}

# The transformers-5 layout: rope_parameters and dtype.
QWEN3_TF5 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "max_position_embeddings": 32768,
    "attention_bias": False, "dtype": "bfloat16",
}


def tmpdir(test) -> str:
  """A temporary folder removed when `test` ends."""
  return test.enterContext(tempfile.TemporaryDirectory())


class ConfigTest(parameterized.TestCase):

  def test_real_checkpoint_layout(self):
    c = models.QwenConfig.from_hf_dict(QWEN25_MATH_1_5B)
    self.assertEqual(c, models.QwenConfig.qwen2_5_math_1_5b().replace(torch_dtype="bfloat16"))
    self.assertEqual((c.head_dim, c.group_size, c.rope_theta), (128, 6, 10000.0))
    self.assertTrue(c.qkv_bias)
    self.assertFalse(c.qk_norm)

  def test_transformers5_layout(self):
    c = models.QwenConfig.from_hf_dict(QWEN3_TF5)
    self.assertEqual(c, models.QwenConfig.qwen3_8b_base().replace(torch_dtype="bfloat16"))
    self.assertEqual(c.rope_theta, 1e6)
    self.assertTrue(c.qk_norm)
    self.assertFalse(c.qkv_bias)

  def test_rope_parameters_win_over_top_level(self):
    d = dict(QWEN3_TF5, rope_theta=10000.0)
    self.assertEqual(models.QwenConfig.from_hf_dict(d).rope_theta, 1e6)

  @parameterized.parameters(*sorted(models.PRESETS))
  def test_preset_round_trips(self, name):
    preset = models.PRESETS[name]()
    d = preset.to_hf_dict()
    self.assertEqual(models.QwenConfig.from_hf_dict(d).replace(torch_dtype=preset.torch_dtype),
                     preset)
    # transformers reads the same architecture from it (config only, no weights).
    hf = transformers.AutoConfig.for_model(**d)  # model_type picks the class
    self.assertEqual(hf.model_type, preset.model_type)
    self.assertEqual(
        (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
         hf.rope_parameters["rope_theta"], hf.tie_word_embeddings),
        (preset.num_layers, preset.num_heads, preset.num_kv_heads, preset.head_dim,
         preset.rope_theta, preset.tie_word_embeddings))

  def test_from_hf_dir_errors(self):
    path = tmpdir(self)
    with self.assertRaisesRegex(FileNotFoundError, f"{path}/config.json: no config.json"):
      models.QwenConfig.from_hf_dir(path)
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, f"{path}/config.json: invalid JSON"):
      models.QwenConfig.from_hf_dir(path)

  @parameterized.named_parameters(
      ("model_type", {"model_type": "llama"}, "unsupported model_type 'llama'"),
      ("missing_field", {"hidden_size": None}, "missing required field 'hidden_size'"),
      ("gqa", {"num_key_value_heads": 5}, "num_attention_heads=12 is not a multiple of "
       "num_key_value_heads=5"),
      ("rope_scaling", {"rope_scaling": {"type": "yarn", "factor": 4.0}},
       "rope scaling 'yarn' is not supported"),
  )
  def test_bad_config(self, edit, message):
    d = dict(QWEN25_MATH_1_5B, **edit)
    d = {k: v for k, v in d.items() if v is not None}
    with self.assertRaisesRegex(ValueError, "my/config.json: " + message):
      models.QwenConfig.from_hf_dict(d, source="my/config.json")

  def test_dtype_from_name(self):
    self.assertEqual(config_lib.dtype_from_name("bfloat16"), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "unknown dtype 'fp8'"):
      config_lib.dtype_from_name("fp8")


def _tiny(model_type="qwen3", tied=True):
  return models.QwenConfig.tiny(model_type, vocab_size=64).replace(
      tie_word_embeddings=tied, hidden_size=32, intermediate_size=48, num_heads=4,
      num_kv_heads=2, head_dim=16)


def _batch(config, b=2, t=7, seed=0):
  rng = np.random.RandomState(seed)
  tokens = jnp.asarray(rng.randint(0, config.vocab_size, (b, t)))
  mask = np.ones((b, t), bool)
  mask[1, :2] = False
  return tokens, jnp.asarray(mask)


class ModelTest(parameterized.TestCase):

  @parameterized.parameters("qwen2", "qwen3")
  def test_param_shapes_match_init_and_logical_axes(self, model_type):
    for tied in (True, False):
      config = _tiny(model_type, tied)
      params = models.init_params(config, jax.random.key(0))
      shapes = models.param_shapes(config)
      self.assertEqual(jax.tree.map(lambda x: x.shape, params), shapes)
      axes = sharding.param_logical_axes(config)
      ranks = jax.tree.map(len, axes, is_leaf=lambda x: isinstance(x, tuple))
      self.assertEqual(ranks, jax.tree.map(len, shapes, is_leaf=lambda x: isinstance(x, tuple)))

  def test_value_forward_is_hidden_times_head(self):
    config = _tiny("qwen2")
    backbone = models.init_params(config, jax.random.key(0), std=0.2)
    head = models.init_value_head(config, jax.random.key(1))
    self.assertEqual(head.shape, (config.hidden_size,))
    np.testing.assert_allclose(float(jnp.std(head)), 1 / (config.hidden_size + 1), rtol=0.35)
    tokens, mask = _batch(config)
    values = models.value_forward(config, {"backbone": backbone, "value_head": head}, tokens,
                                  attention_mask=mask)
    h = np.asarray(models.hidden_states(config, backbone, tokens, attention_mask=mask))
    self.assertEqual(values.shape, tokens.shape)
    np.testing.assert_allclose(np.asarray(values), h @ np.asarray(head), atol=1e-5, rtol=1e-5)

  def test_value_head_std_at_paper_width(self):
    # OpenRLHF: normal_(std=1/(H+1)); at H = 1536 (Qwen2.5-Math-1.5B) within 5 %.
    config = _tiny("qwen2").replace(hidden_size=1536)
    head = models.init_value_head(config, jax.random.key(3))
    np.testing.assert_allclose(float(jnp.std(head)), 1 / 1537, rtol=0.05)

  @parameterized.parameters("qwen2", "qwen3")
  def test_remat_same_logits_and_grads(self, model_type):
    config = _tiny(model_type, tied=False)
    params = models.init_params(config, jax.random.key(0), std=0.2)
    tokens, mask = _batch(config)

    def loss(p, c):
      logits = M.forward(c, p, tokens, attention_mask=mask)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1))

    results = {}
    for remat in (False, True):
      c = config.replace(remat=remat)
      logits = jax.jit(M.forward, static_argnums=0)(c, params, tokens, attention_mask=mask)
      grads = jax.jit(jax.grad(loss), static_argnums=1)(params, c)
      results[remat] = (logits, grads)
    np.testing.assert_allclose(results[True][0], results[False][0], atol=1e-6, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 results[True][1], results[False][1])
    self.assertGreater(float(jnp.abs(results[True][1]["layers"]["qkv"]).max()), 0)

  @parameterized.parameters("qwen2", "qwen3")
  def test_bf16_compute(self, model_type):
    config = _tiny(model_type)
    params = models.init_params(config, jax.random.key(0), std=0.2)
    tokens, mask = _batch(config)
    ref = M.forward(config, params, tokens, attention_mask=mask)
    c16 = config.replace(dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = M.forward(c16, p16, tokens, attention_mask=mask)
    self.assertEqual(out.dtype, jnp.float32)  # logits are always f32
    self.assertTrue(bool(jnp.all(jnp.isfinite(out))))
    scale = float(jnp.abs(ref).max())
    self.assertLess(float(jnp.abs(out - ref).max()), 0.05 * scale)
    # cached decode in bf16 with a bf16 cache
    cache = M.init_cache(c16, 2, 8)
    self.assertEqual(cache.k.dtype, jnp.bfloat16)
    h, cache = M.forward_cached(c16, p16, tokens, M.default_positions(mask), mask, cache,
                                jnp.zeros((2,), jnp.int32))
    cached = M.logits_from_hidden(c16, p16, h)
    real = np.asarray(mask)
    self.assertLess(float(jnp.abs(cached - ref)[real].max()), 0.05 * scale)

  @parameterized.parameters("qwen2", "qwen3")
  def test_cached_decode_equals_uncached(self, model_type):
    config = _tiny(model_type)
    params = models.init_params(config, jax.random.key(3), std=0.2)
    tokens, mask = _batch(config, t=8)
    ref = np.asarray(M.forward(config, params, tokens, attention_mask=mask))
    pos = M.default_positions(mask)
    cache = M.init_cache(config, 2, 12)
    step = jax.jit(M.forward_cached, static_argnums=0)
    h, cache = step(config, params, tokens[:, :4], pos[:, :4], mask[:, :4], cache,
                    jnp.zeros((2,), jnp.int32))
    outs = [M.logits_from_hidden(config, params, h)]
    for t in range(4, 8):
      h, cache = step(config, params, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1],
                      cache, jnp.full((2,), t, jnp.int32))
      outs.append(M.logits_from_hidden(config, params, h))
    out = np.concatenate([np.asarray(o) for o in outs], axis=1)
    real = np.asarray(mask)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :8]), real)
    self.assertFalse(bool(cache.valid[:, 8:].any()))

  def test_save_load_round_trip_preserves_config(self):
    config = _tiny("qwen2", tied=False).replace(rope_theta=5e6, rms_norm_eps=1e-5)
    params = models.init_params(config, jax.random.key(0))
    path = tmpdir(self)
    models.save_hf(path, config, params)
    with open(os.path.join(path, "config.json")) as f:
      self.assertEqual(json.load(f), config.to_hf_dict("float32"))
    loaded_config, loaded = models.load_hf(path)
    self.assertEqual(loaded_config, config.replace(torch_dtype="float32"))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


if __name__ == "__main__":
  absltest.main()
