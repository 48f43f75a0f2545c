"""The rollout's sampling layout: rows over 'data', weights replicated (or over 'tensor').

On the suite's 8 simulated devices, rollouts on the sampling layout give the results of the
same rollout on one device; the weights arrive by one explicit reshard, in the sampling dtype.
"""

import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from mar import parallel, setup
from mar.data import synthetic
from mar.lte import hints
from mar.models import sharding
from mar.rollout.runner import RolloutRunner, RunnerSpec
from mar.sampling import SamplingParams
from testutil import tiny_config


class SamplingLayoutTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny_config("grpo", **{"mesh.fsdp": -1})  # FSDP training layout, 8 devices
    cls.run_ = setup.build_run(cls.config, tempfile.mkdtemp())
    examples = synthetic.make_arithmetic_examples(8, seed=4, min_digits=1, max_digits=2)
    cls.prompts = [hints.chat_prompt(hints.plain_prompt(e.question)) for e in examples]
    cls.answers = [e.answer for e in examples]

  @classmethod
  def tearDownClass(cls):
    cls.run_.close()
    super().tearDownClass()

  def _runner(self, mesh, max_attempts=1, temperature=1.0, dtype=None):
    r = self.run_
    return RolloutRunner(r.model_config, r.tokenizer, r.verifier, RunnerSpec(batch_size=8,
        prompt_len=self.config.rollout.prompt_len, max_attempts=max_attempts, token_budget=24,
        sampling=SamplingParams(temperature=temperature)), mesh=r.mesh, sampling_mesh=mesh,
        sampling_dtype=dtype)

  def _episodes(self, runner, n_attempts=1):
    out = runner.run(self.run_.params, self.prompts, self.answers, [n_attempts] * 8,
                     jax.random.PRNGKey(7))
    return jax.tree.map(np.asarray, jax.device_get(out))

  def _assert_equal(self, a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.action_mask, b.action_mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_array_equal(a.reward, b.reward)

  def test_default_layout_and_reshard(self):
    mesh = parallel.sampling_mesh(self.config)
    self.assertEqual(dict(mesh.shape), {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertEqual(dict(self.run_.mesh.shape), {"data": 1, "fsdp": 8, "tensor": 1})
    runner = self._runner(mesh, dtype=jnp.bfloat16)
    params = runner._sampling_params(self.run_.params)  # pylint: disable=protected-access
    self.assertIs(params, runner._sampling_params(self.run_.params))  # once per params
    for x in jax.tree.leaves(params):
      self.assertEqual(x.dtype, jnp.bfloat16)
      self.assertTrue(x.sharding.is_fully_replicated)
    self.assertGreater(runner.reshard_stats["bytes_moved"], 0)
    self.assertGreaterEqual(runner.reshard_stats["seconds"], 0)

  def test_sampled_rows_split_over_data_equal_one_device(self):
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    data = parallel.sampling_mesh(self.config)
    a = self._runner(data)
    tokens, mask = a.encode_prompts(self.prompts, rows=8)
    engine = a._engine_for(tokens.shape[1])  # pylint: disable=protected-access
    episodes, _ = engine(a._sampling_params(self.run_.params), tokens, mask,  # pylint: disable=protected-access
                         np.ones(8, np.int32), *a.feedback, jax.random.PRNGKey(7))
    self.assertEqual(episodes.tokens.sharding.shard_shape(episodes.tokens.shape)[0], 1)
    self._assert_equal(self._episodes(a), self._episodes(self._runner(one)))

  def test_multi_attempt_greedy_tensor_parallel_equal_one_device(self):
    """Per-turn verification callbacks on row-split batches; tensor = 2 for the weights."""
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tp = sharding.make_mesh(4, 1, 2)
    a = self._episodes(self._runner(tp, max_attempts=2, temperature=0.0), n_attempts=2)
    b = self._episodes(self._runner(one, max_attempts=2, temperature=0.0), n_attempts=2)
    self._assert_equal(a, b)
    np.testing.assert_array_equal(a.attempted_turn, b.attempted_turn)


if __name__ == "__main__":
  absltest.main()
