"""-1 sizes (rollout.batch_size, ppo/grpo.micro_batches) resolved at run time
(`setup.resolve_auto_sizes`): a run given -1 trains as the run given the sizes it resolves to."""

import tempfile

from absl.testing import absltest
import jax
import numpy as np

from configs import lte_qwen
from mar import algorithms, models, setup, train
from mar.models.config import QwenConfig
from mar.rollout import shape as shape_lib

import testutil

GiB = 2**30


def _step(config, steps: int = 1):
  run = setup.build_run(config, tempfile.mkdtemp())
  state = algorithms.family(config).init_state(config, run)
  metrics = []
  for step in range(steps):
    idx = train.batch_indices(config, len(run.train_data), step)
    state, m = algorithms.ppo.iteration(config, run, state, [run.train_data[i] for i in idx],
                                        step)
    metrics.append(testutil.replayable_metrics(m))
  run.close()
  return metrics, jax.device_get(state)


class AutoSizesTest(absltest.TestCase):

  def test_run_with_auto_sizes_equals_hand_set(self):
    auto = testutil.tiny_config("ppo", **{"rollout.batch_size": -1, "ppo.micro_batches": -1,
                                          "mesh.data": 2, "mesh.fsdp": 2})
    m_auto, s_auto = _step(auto, 2)
    # XLA:CPU reports no memory limit: the step's episodes in one program, one micro-batch.
    self.assertEqual(auto.rollout.batch_size, auto.rollout.prompts_per_step)
    self.assertEqual(auto.ppo.micro_batches, 1)
    hand = testutil.tiny_config("ppo", **{"rollout.batch_size": auto.rollout.prompts_per_step,
                                          "ppo.micro_batches": 1, "mesh.data": 2,
                                          "mesh.fsdp": 2})
    m_hand, s_hand = _step(hand, 2)
    self.assertEqual(m_auto, m_hand)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s_auto)[0],
                            jax.tree.leaves(s_hand)):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  def test_smaller_memory_fewer_rows_more_micro_batches(self):
    """With a device memory figure: sizes shrink with it, and are sizes the programs take."""
    config = lte_qwen.get_config()
    config.rollout.batch_size = -1
    config.grpo.micro_batches = -1
    model = QwenConfig.qwen3_8b_base().replace(dtype=np.dtype("bfloat16"), remat=True)
    mesh = models.sharding.make_mesh(1, 8, 1)
    params = 8.2e9 * 4 / 8  # f32 Qwen3-8B over fsdp 8
    picked = {gib: setup.auto_sizes(config, model, mesh, int(params), gib * GiB)
              for gib in (2000, 95, 80, 40)}
    episodes = shape_lib.step_episodes(config)
    self.assertEqual(picked[2000], {"rollout.batch_size": episodes, "grpo.micro_batches": 1})
    rows = [picked[g]["rollout.batch_size"] for g in (2000, 95, 80, 40)]
    micro = [picked[g]["grpo.micro_batches"] for g in (2000, 95, 80, 40)]
    self.assertEqual(rows, sorted(rows, reverse=True))
    self.assertEqual(micro, sorted(micro))
    self.assertLess(rows[-1], rows[0])
    self.assertGreater(micro[-1], micro[0])
    per_mini = episodes // config.grpo.mini_batches
    for r, m in zip(rows, micro):
      self.assertEqual(r % 8, 0)  # rows split over the sampling layout's 8 data shards
      self.assertEqual(per_mini % m, 0)
    self.assertEqual(setup.auto_sizes(config, model, mesh, int(params), None),
                     {"rollout.batch_size": episodes, "grpo.micro_batches": 1})


if __name__ == "__main__":
  absltest.main()
