"""Cached attention over the live blocks only: parity with the dense path, and with HF."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import sampling
from mar.models import model as qwen
from mar.models.config import QwenConfig
from mar.models.init import init_params
from testutil import hf_greedy, hf_tiny, prompts_for

S = 45  # not a multiple of the block: the last block's start is clamped


def _random_cache(config, b, s, seed):
  """A cache with random k/v and holes in `valid` (left padding, dropped turns)."""
  rng = np.random.RandomState(seed)
  shape = (config.num_layers, b, config.num_kv_heads, s, config.head_dim)
  valid = rng.rand(b, s) < 0.8
  return qwen.KVCache(jnp.asarray(rng.randn(*shape), jnp.float32),
                      jnp.asarray(rng.randn(*shape), jnp.float32), jnp.asarray(valid))


def _decode_case(model_type, t, start, unstacked, seed):
  """(dense config, params, cache, forward_cached args) of a T-token call at `start` [4]."""
  dense_cfg = QwenConfig.tiny(model_type, vocab_size=64).replace(attn_block=1024)
  params = init_params(dense_cfg, jax.random.key(0))
  cache = _random_cache(dense_cfg, len(start), S, seed=seed)
  start = jnp.asarray(start, jnp.int32)
  rng = np.random.RandomState(5)
  tokens = jnp.asarray(rng.randint(0, 64, (len(start), t)), jnp.int32)
  positions = start[:, None] + jnp.arange(t)[None]
  token_valid = jnp.asarray(rng.rand(len(start), t) < 0.9)
  if unstacked:
    params, cache = qwen.unstack_layers(params), qwen.unstack_cache(cache)
  return dense_cfg, params, cache, (tokens, positions, token_valid)


class LiveAttentionTest(parameterized.TestCase):

  @parameterized.product(t=(1, 3), unstacked=(False, True), model_type=("qwen2", "qwen3"))
  def test_matches_dense(self, t, unstacked, model_type):
    start = [0, 7, 20, S - t]  # live lengths 1..S: 1 to all blocks
    dense_cfg, params, cache, args = _decode_case(model_type, t, start, unstacked, seed=t)
    block_cfg = dense_cfg.replace(attn_block=8)
    outs = []
    for cfg in (dense_cfg, block_cfg):
      fn = jax.jit(qwen.forward_cached, static_argnums=0)
      h, c = fn(cfg, params, *args, cache, jnp.asarray(start, jnp.int32))
      outs.append((np.asarray(h), jax.tree.map(np.asarray, qwen.stack_cache(c))))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(outs[0][1].valid, outs[1][1].valid)
    for a, c in ((outs[0][1].k, outs[1][1].k), (outs[0][1].v, outs[1][1].v)):
      np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5)  # later layers' k/v follow h

  @parameterized.product(t=(1, 3), unstacked=(False, True), inside=(True, False))
  def test_window_matches_dense(self, t, unstacked, inside):
    """A long cache's window (16 slots here) gives the dense path's outputs, whether every
    query sits inside it (read alone) or not (window, then live blocks); the call's writes
    below the window land in the window, the others in k / v."""
    w = qwen.WINDOW_BLOCKS * 8
    start = [0, 3, 7, w - t] if inside else [0, 7, 20, S - t]
    dense_cfg, params, cache, args = _decode_case("qwen3", t, start, unstacked, seed=t)
    block_cfg = dense_cfg.replace(attn_block=8)
    self.assertEqual(qwen.window_slots(block_cfg, S), w)
    windowed = qwen.with_window(block_cfg, cache)
    self.assertIsNotNone(windowed.k_win)
    self.assertIsNone(qwen.with_window(dense_cfg, windowed).k_win)  # a short cache: none
    fn = jax.jit(qwen.forward_cached, static_argnums=0)
    start = jnp.asarray(start, jnp.int32)
    h0, c0 = fn(dense_cfg, params, *args, cache, start)
    h1, c1 = fn(block_cfg, params, *args, windowed, start)
    np.testing.assert_allclose(np.asarray(h0), np.asarray(h1), atol=2e-5, rtol=2e-5)
    c0, c1 = qwen.stack_cache(c0), qwen.stack_cache(c1)
    for full, mine, win in ((c0.k, c1.k, c1.k_win), (c0.v, c1.v, c1.v_win)):
      np.testing.assert_allclose(full[:, :, :, :w], win, atol=2e-5, rtol=2e-5)
      np.testing.assert_allclose(full[:, :, :, w:], mine[:, :, :, w:], atol=2e-5, rtol=2e-5)

  def test_window_reads_nothing_past_it(self):
    """Inside its window, a step reads no slot of the long buffers (all NaN: harmless)."""
    cfg = QwenConfig.tiny("qwen3", vocab_size=64).replace(attn_block=8)
    params = init_params(cfg, jax.random.key(1))
    cache = qwen.with_window(cfg, _random_cache(cfg, 2, 64, seed=0))
    start = jnp.asarray([10, 13], jnp.int32)  # live length 14 <= 16
    poisoned = cache._replace(k=jnp.full_like(cache.k, jnp.nan), v=jnp.full_like(cache.v, jnp.nan))
    args = (jnp.ones((2, 1), jnp.int32), start[:, None], jnp.ones((2, 1), bool))
    fn = jax.jit(qwen.forward_cached, static_argnums=0)
    h, _ = fn(cfg, params, *args, cache, start)
    h_poisoned, _ = fn(cfg, params, *args, poisoned, start)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_poisoned))

  def test_reads_only_live_blocks(self):
    """Rows whose slots past the live length hold NaN still give finite, equal outputs."""
    cfg = QwenConfig.tiny("qwen3", vocab_size=64).replace(attn_block=8)
    params = init_params(cfg, jax.random.key(1))
    b = 2
    cache = _random_cache(cfg, b, 64, seed=0)
    start = jnp.asarray([10, 13], jnp.int32)  # live length 14: blocks 0 and 1
    poisoned = cache._replace(k=cache.k.at[:, :, :, 16:].set(jnp.nan),
                              v=cache.v.at[:, :, :, 16:].set(jnp.nan))
    args = (jnp.ones((b, 1), jnp.int32), start[:, None], jnp.ones((b, 1), bool))
    fn = jax.jit(qwen.forward_cached, static_argnums=0)
    h, _ = fn(cfg, params, *args, cache, start)
    h_poisoned, _ = fn(cfg, params, *args, poisoned, start)
    self.assertTrue(np.isfinite(np.asarray(h_poisoned)).all())
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_poisoned))

  def test_static_choice_of_path(self):
    """Dense up to DENSE_MAX_BLOCKS blocks (and for prefill), live blocks beyond."""
    cfg = QwenConfig.tiny("qwen3", vocab_size=64).replace(attn_block=8)
    most_dense = qwen.DENSE_MAX_BLOCKS * 8
    self.assertFalse(qwen.reads_live_blocks(cfg, most_dense, 1))
    self.assertTrue(qwen.reads_live_blocks(cfg, most_dense + 1, 1))
    self.assertFalse(qwen.reads_live_blocks(cfg, 4096, 4096))  # prefill: one dense pass
    # A short cache takes the dense path: NaN past the live length reaches the output.
    params = init_params(cfg, jax.random.key(1))
    cache = _random_cache(cfg, 2, most_dense, seed=0)
    cache = cache._replace(v=cache.v.at[:, :, :, 16:].set(jnp.nan))  # 0 * NaN in probs @ v
    start = jnp.asarray([10, 13], jnp.int32)
    args = (jnp.ones((2, 1), jnp.int32), start[:, None], jnp.ones((2, 1), bool))
    h, _ = jax.jit(qwen.forward_cached, static_argnums=0)(cfg, params, *args, cache, start)
    self.assertFalse(np.isfinite(np.asarray(h)).all())

  @parameterized.parameters("qwen2", "qwen3")
  def test_greedy_matches_hf_with_small_blocks(self, model_type):
    model, config, params = hf_tiny(model_type)
    config = config.replace(attn_block=8)
    prompts = prompts_for()
    ref = hf_greedy(model, prompts, 40)
    res = sampling.generate(config, params, prompts, 40)
    self.assertEqual(res.tokens, ref)


if __name__ == "__main__":
  absltest.main()
