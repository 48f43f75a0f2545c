"""plan_memory --compiled: the rollout program compiled from shapes, on 8 simulated devices.

Tiny model dims with the paper configs' structure (multi-attempt PPO with the per-turn
callback; single-turn LTE), so the compiles take seconds; bench runs report the real shapes.
"""

import importlib.util

from absl.testing import absltest
from absl.testing import parameterized
import jax

from configs import lte_qwen, multi_attempt_qwen
from mar.models.config import QwenConfig
from mar.tools import plan_memory as pm


def _small(config_module, tensor: int = 1):
  c = config_module.get_config()
  c.rollout.update(dict(batch_size=16, prompt_len=64, token_budget=32))
  c.rollout.mesh.tensor = tensor
  return c


def _model(model_type: str) -> QwenConfig:
  return QwenConfig.tiny(model_type, vocab_size=256).replace(num_layers=2)


class CompiledRolloutTest(parameterized.TestCase):

  @parameterized.parameters((multi_attempt_qwen, "qwen2"), (lte_qwen, "qwen3"))
  def test_default_layout_rows_split_and_no_collectives(self, module, model_type):
    self.assertEqual(jax.device_count(), 8)
    report = pm.compiled_report(_small(module), _model(model_type), 8, None)
    r, p = report["rollout"], report["plan"]
    self.assertEqual(report["sampling_mesh"], {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertTrue(r["decode_loop_found"])
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)
    self.assertAlmostEqual(p["kv_bytes_per_device"] / r["kv_bytes_per_device"], 1.0, delta=0.1)
    self.assertGreater(r["peak_bytes_per_device"], r["kv_bytes_per_device"])

  def test_tensor_parallel_only_bf16_reductions(self):
    model = _model("qwen3")
    report = pm.compiled_report(_small(lte_qwen, tensor=2), model, 8, None)
    r = report["rollout"]
    self.assertEqual(report["sampling_mesh"], {"data": 4, "fsdp": 1, "tensor": 2})
    # Only the reductions after the attention output and the MLP down projection of each
    # layer (XLA:CPU runs bf16 all-reduces in f32; TPU keeps bf16, see bench/README.md).
    self.assertEqual(set(r["decode_loop_collective_ops"]), {"all-reduce"})
    self.assertBetween(r["decode_loop_collectives"], 1, 2 * model.num_layers)


@absltest.skipUnless(importlib.util.find_spec("libtpu"), "needs libtpu (pip install jax[tpu])")
class TpuTopologyTest(parameterized.TestCase):
  """Ahead-of-time compiles for 8 TPU v5p chips (runs where libtpu is installed)."""

  @parameterized.parameters((multi_attempt_qwen, "qwen2"), (lte_qwen, "qwen3"))
  def test_default_layout(self, module, model_type):
    report = pm.compiled_report(_small(module), _model(model_type), None, "v5p:2x2x2")
    r = report["rollout"]
    self.assertEqual(report["target"], "v5p:2x2x2")
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)

  def test_tensor_parallel_bf16_reductions(self):
    model = _model("qwen3")
    r = pm.compiled_report(_small(lte_qwen, tensor=2), model, None, "v5p:2x2x2")["rollout"]
    self.assertEqual(r["decode_loop_collective_ops"], {"all-reduce": 2 * model.num_layers})
    self.assertEqual(r["decode_loop_collective_dtypes"], ["bf16"])


if __name__ == "__main__":
  absltest.main()
