"""train.offload_state: the training state waits in pinned host memory during the rollout and
the step's results are those of a run that keeps it on the device (8 simulated devices)."""

import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from mar import algorithms, parallel, setup, train
from mar.algorithms import common

import testutil


def _steps(method: str, offload: str, steps: int = 2):
  """Metrics and final state of `steps` training steps on a data 4 x fsdp 2 mesh, and the
  memory kinds of the state the rollout ran beside."""
  config = testutil.tiny_config(method, **{"mesh.data": 4, "mesh.fsdp": 2,
                                           "train.offload_state": offload})
  run = setup.build_run(config, tempfile.mkdtemp())
  state = algorithms.family(config).init_state(config, run)
  run.offload = setup.offload_state(config, run, state)
  parked_kinds = []
  park = common.park_state

  def spy(run_, state_, timer):
    out = park(run_, state_, timer)
    parked_kinds.append({k: sorted({x.sharding.memory_kind for x in jax.tree.leaves(v)})
                         for k, v in out.items()})
    return out

  iteration = algorithms.family(config).iteration
  metrics = []
  with mock.patch.object(common, "park_state", spy):
    for step in range(steps):
      idx = train.batch_indices(config, len(run.train_data), step)
      state, m = iteration(config, run, state, [run.train_data[i] for i in idx], step)
      metrics.append(testutil.replayable_metrics(m))
  run.close()
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
  return run.offload, metrics, jax.device_get(state), parked_kinds, kinds


class OffloadTest(parameterized.TestCase):

  @parameterized.parameters("ppo", "lte")
  def test_results_equal_without_offload(self, method):
    on, m_on, s_on, parked, kinds = _steps(method, "true")
    off, m_off, s_off, parked_off, _ = _steps(method, "false")
    self.assertTrue(on)
    self.assertFalse(off)
    self.assertEqual(kinds, {"device"})  # back on the device after the step
    for step in parked:  # during the rollout: optimizer moments and params on the host
      self.assertEqual(step["actor_opt"], ["pinned_host"])
      self.assertIn("pinned_host", step["policy"])
      if method == "ppo":
        self.assertEqual(step["critic"], ["pinned_host"])
        self.assertEqual(step["critic_opt"], ["pinned_host"])
    for step in parked_off:
      self.assertNotIn("pinned_host", {k for v in step.values() for k in v})
    self.assertEqual(m_on, m_off)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s_on)[0],
                            jax.tree.leaves(s_off)):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


class OffloadRuleTest(absltest.TestCase):

  def test_cpu_has_host_memory_and_auto_stays_off(self):
    self.assertTrue(parallel.has_host_memory())
    config = testutil.tiny_config("ppo")
    run = setup.build_run(config, tempfile.mkdtemp())
    state = algorithms.family(config).init_state(config, run)
    # XLA:CPU reports no device memory limit: "auto" has nothing to compare against.
    self.assertFalse(setup.offload_state(config, run, state))
    for value, want in (("true", True), ("false", False), (True, True), (False, False)):
      config.train.offload_state = value if isinstance(value, str) else str(value).lower()
      self.assertEqual(setup.offload_state(config, run, state), want)
    config.train.offload_state = "sometimes"
    with self.assertRaises(Exception):
      setup.offload_state(config, run, state)
    run.close()


if __name__ == "__main__":
  absltest.main()
