"""Sharding rules and sharded forward passes on 8 simulated CPU devices.

XLA reads the device count once, when the backend starts. This module asks for 8 CPU
devices before importing jax; if another test module already started the backend with fewer,
the in-process tests skip and `FreshProcessTest` runs this file again in a new process.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys
import tempfile
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mar import models
from mar.models import model as M
from mar.models import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FRESH = "MAR_SHARDED_TEST_FRESH_PROCESS"


def tmpdir(test) -> str:
  """A temporary folder removed when `test` ends."""
  return test.enterContext(tempfile.TemporaryDirectory())


def _have_8_devices() -> bool:
  return jax.device_count() >= 8


class _NeedsEightDevices(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not _have_8_devices():
      raise unittest.SkipTest("jax started with fewer than 8 devices; see FreshProcessTest")


def _config(model_type="qwen3", tied=False, **kw):
  """Dimensions divisible by 2 so every rule really shards on a 2x2x2 mesh."""
  base = models.QwenConfig.tiny(model_type, vocab_size=64).replace(
      tie_word_embeddings=tied, hidden_size=32, intermediate_size=48, num_heads=4,
      num_kv_heads=2, head_dim=16)
  return base.replace(**kw)


def _batch(config, b=4, t=8):
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, config.vocab_size, (b, t))
  mask = np.ones((b, t), bool)
  mask[1, :3] = False
  mask[3, :5] = False
  return tokens, mask


class MeshTest(_NeedsEightDevices):

  def test_make_mesh_sizes(self):
    m = sharding.make_mesh(2, 2, -1)
    self.assertEqual(dict(m.shape), {"data": 2, "fsdp": 2, "tensor": 2})
    self.assertEqual(dict(sharding.make_mesh().shape), {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertEqual(dict(sharding.make_mesh(1, -1, 2).shape), {"data": 1, "fsdp": 4, "tensor": 2})
    m4 = sharding.make_mesh(2, 1, 2, devices=jax.devices()[:4])
    self.assertEqual(m4.devices.size, 4)

  @parameterized.named_parameters(
      ("two_rest", (-1, -1, 2), "at most one may be -1"),
      ("not_divisible", (3, -1, 1), "8 devices are not divisible by 3"),
      ("wrong_total", (2, 2, 3), "need 12 devices, found 8"),
      ("zero", (0, -1, 1), "must be positive or -1"),
  )
  def test_make_mesh_errors(self, sizes, message):
    with self.assertRaisesRegex(ValueError, message):
      sharding.make_mesh(*sizes)

  def test_logical_to_spec(self):
    mesh = sharding.make_mesh(2, 2, 2)
    spec = sharding.logical_to_spec
    self.assertEqual(spec(("vocab", "embed"), mesh, shape=(64, 32)), P("tensor", "fsdp"))
    # A dimension the mesh axes do not divide stays replicated.
    self.assertEqual(spec(("vocab", "embed"), mesh, shape=(97, 32)), P(None, "fsdp"))
    self.assertEqual(spec(("batch", None), mesh, shape=(8, 3)), P(("data", "fsdp"), None))
    self.assertEqual(spec(("batch", None), mesh, shape=(2, 3)), P("data", None))
    self.assertEqual(spec(("batch", None), mesh, shape=(3, 3)), P(None, None))
    # Each mesh axis at most once per array: 'embed' cannot reuse batch's 'fsdp'.
    self.assertEqual(spec(("batch", "length", "embed"), mesh, shape=(8, 4, 32)),
                     P(("data", "fsdp"), None, None))
    self.assertEqual(spec(("layers", None), mesh), P(None, None))
    custom = (("embed", "tensor"), ("mlp", None))
    self.assertEqual(spec(("layers", "embed", None, "mlp"), mesh, custom), P(None, "tensor", None, None))

  def test_param_shardings(self):
    mesh = sharding.make_mesh(2, 2, 2)
    config = _config()
    shard = sharding.param_shardings(config, mesh)
    self.assertEqual(shard["embed"].spec, P("tensor", "fsdp"))
    self.assertEqual(shard["lm_head"].spec, P("fsdp", "tensor"))
    self.assertEqual(shard["layers"]["qkv"].spec, P(None, "fsdp", "tensor", None, None))
    self.assertEqual(shard["layers"]["o"].spec, P(None, "tensor", None, None, "fsdp"))
    self.assertEqual(shard["layers"]["gate_up"].spec, P(None, "fsdp", None, "tensor"))
    self.assertEqual(shard["layers"]["down"].spec, P(None, "tensor", "fsdp"))
    self.assertEqual(shard["layers"]["q_norm"].spec, P(None, None))
    self.assertEqual(shard["final_norm"].spec, P(None))
    # One KV head cannot split over tensor=2: replicated on that axis, the rest still shards.
    mqa = sharding.param_shardings(_config(num_kv_heads=1), mesh)
    self.assertEqual(mqa["layers"]["qkv"].spec, P(None, "fsdp", None, None, None))


class ShardedForwardTest(_NeedsEightDevices):

  @parameterized.parameters(("qwen2", True), ("qwen3", False))
  def test_forward_on_2x2x2_mesh_equals_unsharded(self, model_type, tied):
    mesh = sharding.make_mesh(2, 2, 2)
    config = _config(model_type, tied)
    params = models.init_params(config, jax.random.key(0), std=0.2)
    tokens, mask = _batch(config)
    ref = np.asarray(jax.jit(M.forward, static_argnums=0)(config, params, tokens,
                                                          attention_mask=mask))

    sharded = sharding.shard_params(params, config, mesh)
    self.assertEqual(sharded["layers"]["qkv"].sharding.spec, P(None, "fsdp", "tensor", None, None))
    self.assertEqual(len(sharded["layers"]["qkv"].addressable_shards), 8)
    self.assertEqual(sharded["layers"]["qkv"].addressable_shards[0].data.shape, (2, 16, 1, 4, 16))
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh,
                                                                  shape=tokens.shape))
    tokens_s = jax.device_put(tokens, batch_sharding)
    mask_s = jax.device_put(mask, batch_sharding)
    out = jax.jit(M.forward, static_argnums=0)(config, sharded, tokens_s, attention_mask=mask_s)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)

  def test_cached_on_mesh_equals_unsharded(self):
    mesh = sharding.make_mesh(2, 2, 2)
    config = _config("qwen2")
    params = models.init_params(config, jax.random.key(1), std=0.2)
    tokens, mask = _batch(config)
    pos = np.asarray(M.default_positions(jnp.asarray(mask)))
    step = jax.jit(M.forward_cached, static_argnums=0)

    def run(p, cache):
      h, cache = step(config, p, tokens[:, :6], pos[:, :6], mask[:, :6], cache,
                      jnp.zeros((4,), jnp.int32))
      outs = [M.logits_from_hidden(config, p, h)]
      for t in (6, 7):
        h, cache = step(config, p, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache,
                        jnp.full((4,), t, jnp.int32))
        outs.append(M.logits_from_hidden(config, p, h))
      return np.concatenate([np.asarray(o) for o in outs], axis=1), cache

    ref, _ = run(params, M.init_cache(config, 4, 8))
    cache = M.init_cache(config, 4, 8)
    cache_sharding = sharding.logical_to_sharding(sharding.cache_logical_axes(config), mesh,
                                                  shapes=cache)
    self.assertEqual(cache_sharding.k.spec, P(None, ("data", "fsdp"), "tensor", None, None))
    out, cache = run(sharding.shard_params(params, config, mesh),
                     jax.device_put(cache, cache_sharding))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)

  def test_per_layer_cache_axes(self):
    mesh = sharding.make_mesh(2, 2, 2)
    config = _config("qwen2", num_layers=3)
    cache = M.init_cache(config, 4, 8)
    per_layer = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    shard = sharding.logical_to_sharding(sharding.cache_logical_axes(config, per_layer=True),
                                         mesh, shapes=per_layer)
    self.assertLen(shard.k, 3)
    self.assertEqual(shard.v[2].spec, P(("data", "fsdp"), "tensor", None, None))
    self.assertEqual(shard.valid.spec, P(("data", "fsdp"), None))
    placed = jax.device_put(per_layer, shard)
    self.assertEqual(placed.k[0].addressable_shards[0].data.shape, (1, 1, 8, 16))

  def test_load_hf_on_mesh(self):
    mesh = sharding.make_mesh(2, 2, 2)
    config = _config("qwen3", tied=True, vocab_size=97)  # vocab not divisible: replicated
    params = models.init_params(config, jax.random.key(2))
    path = tmpdir(self)
    models.save_hf(path, config, params)
    _, loaded = models.load_hf(path, mesh=mesh)
    self.assertEqual(loaded["embed"].sharding, NamedSharding(mesh, P(None, "fsdp")))
    self.assertEqual(loaded["layers"]["down"].sharding, NamedSharding(mesh, P(None, "tensor", "fsdp")))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    _, loaded16 = models.load_hf(path, dtype=jnp.bfloat16, mesh=mesh)
    self.assertEqual(loaded16["layers"]["qkv"].dtype, jnp.bfloat16)
    self.assertEqual(loaded16["layers"]["qkv"].sharding.spec, P(None, "fsdp", "tensor", None, None))


class FreshProcessTest(absltest.TestCase):
  """Runs this module in a new process when this one started jax with fewer devices."""

  def test_in_fresh_process(self):
    if _have_8_devices() or os.environ.get(_FRESH):
      self.skipTest("8 devices here: the tests above ran in this process")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_FRESH: "1"})
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    self.assertEqual(proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-2000:])
    self.assertRegex(proc.stdout.splitlines()[-1], r"^\d+ passed, 1 skipped in ")


if __name__ == "__main__":
  absltest.main()
