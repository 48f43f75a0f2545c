"""The demo's warm-start cache: built once per (warm-start config, seed), verified on load."""

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import testutil

from configs import demo as demo_config
from configs import miniature
from mar import demo

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(seed=0):
  c = demo_config.get_config()
  c.model.demo.update(dict(sft_steps=2, sft_batch=4))
  c.seed = seed
  return c


class DemoCacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.cache = tempfile.mkdtemp()
    patcher = mock.patch.dict(os.environ, {"MAR_CACHE": self.cache})
    patcher.start()
    self.addCleanup(patcher.stop)

  def test_built_once_reused_and_rebuilt_when_corrupt(self):
    c = _tiny_config()
    path = demo.ensure_demo_model(c, tempfile.mkdtemp())
    self.assertEqual(os.path.dirname(path), os.path.join(self.cache, "demo_models"))
    self.assertTrue(demo.verify_cached(path, demo.warm_start_key(c)))
    # No temporary folders are left beside it.
    self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])
    with mock.patch.object(demo, "warm_start", side_effect=AssertionError("rebuilt")):
      self.assertEqual(demo.ensure_demo_model(c, tempfile.mkdtemp()), path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
      f.seek(100)
      f.write(b"\x00\x01\x02\x03")
    self.assertFalse(demo.verify_cached(path, demo.warm_start_key(c)))
    with mock.patch.object(demo, "warm_start", wraps=demo.warm_start) as spy:
      self.assertEqual(demo.ensure_demo_model(c, tempfile.mkdtemp()), path)
      spy.assert_called_once()
    self.assertTrue(demo.verify_cached(path, demo.warm_start_key(c)))

  def test_key_follows_warm_start_config_and_seed_only(self):
    a = demo.warm_start_key(_tiny_config())
    self.assertNotEqual(a, demo.warm_start_key(_tiny_config(seed=1)))
    c = _tiny_config()
    c.model.demo.sft_lr = 1e-3
    self.assertNotEqual(a, demo.warm_start_key(c))
    c = _tiny_config()
    c.train.num_steps = 7  # RL settings do not change the warm start
    self.assertEqual(a, demo.warm_start_key(c))
    # The suite pins the warm-start seed: RL seeds share one model.
    m0, m1 = miniature.get_config("lte"), miniature.get_config("single_turn")
    m1.seed = 5
    self.assertEqual(demo.warm_start_key(m0), demo.warm_start_key(m1))

  def test_neutral_dialogue_targets_only_the_correct_answer(self):
    from mar.data import synthetic
    from mar.data.tiny_tokenizer import build_tiny_tokenizer
    from mar.data.tokenizer import Tokenizer

    folder = tempfile.mkdtemp()
    build_tiny_tokenizer(folder, vocab_size=300)
    tok = Tokenizer.from_dir(folder)
    exs = synthetic.make_arithmetic_examples(32, 3, max_digits=2, num_operands=3)
    tokens, valid, target = demo.sft_batch(tok, exs, 4, 1.0, 0, 512, "neutral", (-1, 1))
    for ex, row, v, t in zip(exs, tokens, valid, target):
      self.assertEqual(tok.decode(row[t].tolist()), f"\\boxed{{{ex.answer}}}<|im_end|>")
      context = tok.decode(row[v & ~t].tolist())
      self.assertNotIn(f"\\boxed{{{ex.answer}}}", context)


_COMPILE_TWICE = """
import jax, jax.numpy as jnp
from mar import config_utils
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
print(config_utils.enable_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
jax.jit(lambda x: jnp.sin(x) @ x.T + 1.5)(jnp.ones((8, 8))).block_until_ready()
print(len(hits))
"""


_BUILD = """
import json, os, sys
from configs import demo as demo_config
from mar import demo
c = demo_config.get_config()
c.model.demo.update(dict(sft_steps=3, sft_batch=4))
path = demo.ensure_demo_model(c, sys.argv[1])
with open(os.path.join(path, "manifest.json")) as f:
  print(json.dumps(json.load(f)))
"""


class ReproducibleWarmStartTest(absltest.TestCase):
  """The same config and numerics build the same warm start; other numerics get their own key."""

  def _build(self, **env):
    env = testutil.subprocess_env(MAR_CACHE=tempfile.mkdtemp(), **env)
    out = subprocess.run([sys.executable, "-c", _BUILD, tempfile.mkdtemp()], env=env,
                         cwd=_REPO, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])

  def test_two_builds_are_bit_identical_and_threading_is_keyed(self):
    a, b = self._build(), self._build()
    self.assertEqual(a, b)  # same key, same sha256 of every file (the weights included)
    one_thread = self._build(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    self.assertNotEqual(one_thread["key"], a["key"])

  def test_numerics_key_names_what_changes_the_floats(self):
    key = demo.numerics_key()
    self.assertEqual(key["backend"], "cpu")
    self.assertEqual(key["cpu_threads"], len(os.sched_getaffinity(0)))
    self.assertIn("jaxlib", key)


class CompilationCacheTest(absltest.TestCase):

  def _run(self, env):
    out = subprocess.run([sys.executable, "-c", _COMPILE_TWICE], env=env, cwd=_REPO,
                         check=True, capture_output=True, text=True, timeout=300).stdout.split()
    return out[-2], int(out[-1])

  def test_second_run_loads_from_mar_cache(self):
    cache = tempfile.mkdtemp()
    env = testutil.subprocess_env(MAR_CACHE=cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    self.assertEqual(self._run(env), (os.path.join(cache, "xla"), 0))  # compiled, stored
    self.assertTrue(os.listdir(os.path.join(cache, "xla")))
    where, hits = self._run(env)
    self.assertEqual(where, os.path.join(cache, "xla"))
    self.assertGreater(hits, 0)  # loaded, not compiled

  def test_an_explicit_directory_wins(self):
    own = tempfile.mkdtemp()
    env = testutil.subprocess_env(MAR_CACHE=tempfile.mkdtemp(), JAX_COMPILATION_CACHE_DIR=own)
    self.assertEqual(self._run(env)[0], own)


if __name__ == "__main__":
  absltest.main()
