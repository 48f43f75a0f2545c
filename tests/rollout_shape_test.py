"""One rollout shape for the trainer, the planner and the compiled programs (issue 24).

For every variant of every config in configs/, `setup.make_runner` (what training runs),
`memory_plan.plan` and `compiled_memory.rollout_shape` / `update_shape` must see the rows,
prompt widths and cache length `mar.rollout.shape.rollout_shape` gives.
"""


from absl.testing import absltest
from absl.testing import parameterized
import jax

from configs import demo, grpo_qwen, hybrid_qwen, lte_qwen, miniature, multi_attempt_qwen, ppo_qwen
from mar import parallel, setup
from mar.data.tokenizer import feedback_table
from mar.models.config import QwenConfig
from mar.rollout import shape as shape_lib
from mar.tools import compiled_memory as cm
from mar.tools import memory_plan as pm
import testutil

VARIANTS = (
    [(demo, v) for v in (None, "single", "hybrid", "lte")]
    + [(grpo_qwen, v) for v in (None, "drgrpo", "clip_higher", "extra", "eval")]
    + [(hybrid_qwen, None)]
    + [(lte_qwen, v) for v in (None, "entropy", "eval")]
    + [(miniature, v) for arm in miniature.ARMS for v in (arm, arm + ",tiny")]
    + [(multi_attempt_qwen, v) for v in (None, "eval")]
    + [(ppo_qwen, None)])


def _name(module, variant) -> str:
  return module.__name__.split(".")[-1] + (f":{variant}" if variant else "")


class RolloutShapeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = testutil.tiny_tokenizer()
    cls.model = QwenConfig.tiny("qwen2", vocab_size=cls.tok.vocab_size).replace(num_layers=1)

  def test_every_config_agrees(self):
    seen_group_default = False
    for module, variant in VARIANTS:
      config = module.get_config(variant)
      with self.subTest(_name(module, variant)):
        s = shape_lib.rollout_shape(config)
        group = config.method != "ppo"
        episodes = config.rollout.prompts_per_step * (config.grpo.group_size if group else 1)
        self.assertEqual(s.episodes, episodes)
        self.assertEqual(s.rows, config.rollout.batch_size or episodes)
        seen_group_default |= group and not config.rollout.batch_size
        # What training runs: the runner's rows, buckets and cache (its own feedback width).
        runner = setup.make_runner(config, self.model, self.tok, None)
        width = feedback_table(self.tok, s.attempts)[0].shape[1]
        self.assertEqual(runner.batch_size, s.rows)
        self.assertEqual(runner.buckets, s.prompt_widths)
        self.assertEqual(runner.spec.cache_len, shape_lib.rollout_shape(config, width).cache_len)
        self.assertEqual(runner.spec.max_attempts, s.attempts)
        # What the compiled programs are built from.
        cs = cm.rollout_shape(config)
        self.assertEqual((cs.rows, cs.slots, cs.queue, cs.attempts),
                         (s.rows, s.cache_len, s.queue, s.attempts))
        us = cm.update_shape(config, 8)
        self.assertEqual(us.sequences, episodes)
        self.assertEqual(us.seq_len, s.cache_len)
        # What the planner counts: the KV cache of the same rows and slots.
        pl = pm.plan(config, self.model, 8, 80.0)
        kv = {r.name: r.bytes for r in pl.rows}["KV cache (rollout)"]
        mesh = pm.abstract_mesh(pm.resolve_mesh_shape(config.mesh, 8))
        self.assertEqual(kv, pm.kv_cache_bytes(
            self.model, mesh, s.rows, s.cache_len, parallel.rules_from_config(config),
            jax.numpy.dtype(config.model.dtype)))
        rp = pm.rollout_program_plan(config, self.model, pm.resolve_sampling_shape(config, 8))
        self.assertEqual((rp["rows"], rp["slots"]), (s.rows, s.cache_len))
    # The case the planner got wrong (rows = prompts, not prompts x G) is among them.
    self.assertTrue(seen_group_default)

  def test_auto_rows_must_be_resolved(self):
    config = lte_qwen.get_config()
    config.rollout.batch_size = -1
    with self.assertRaisesRegex(ValueError, "rollout.batch_size=-1"):
      shape_lib.rollout_shape(config)
    config = lte_qwen.get_config()
    config.grpo.micro_batches = -1
    with self.assertRaisesRegex(ValueError, "config.grpo.micro_batches=-1"):
      setup.make_learner(config, self.model)


if __name__ == "__main__":
  absltest.main()
