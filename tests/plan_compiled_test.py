"""plan_memory --compiled: the rollout and update programs compiled from shapes.

On 8 simulated CPU devices, and where libtpu is installed (requirements-tpu.txt; .ci/run)
for 8 TPU v5p chips: tiny model dims with the paper configs' structure (multi-attempt PPO
with the per-turn callback; single-turn LTE), so the compiles take seconds. With
MAR_TPU_PAPER_SHAPES=1 also at the paper shapes (minutes per program).
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax

from configs import grpo_qwen, hybrid_qwen, lte_qwen, multi_attempt_qwen, ppo_qwen
from mar import parallel
from mar.models import model as qwen
from mar.models.config import PRESETS, QwenConfig
from mar.tools import compiled_memory as cm
from mar.tools import fit
from mar.tools import memory_plan as pm
import testutil

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(config_module, tensor: int = 1):
  c = config_module.get_config()
  # 8 rows per device refilled 4 at a time: the per-row prefill stays a loop of its own, as
  # at the paper shapes (a 1-row refill loop is inlined into the decode loop).
  c.rollout.update(dict(batch_size=64, refill_rows=4, prompt_len=64, token_budget=32))
  c.rollout.mesh.tensor = tensor
  return c


def _model(model_type: str) -> QwenConfig:
  # One layer more than the models that run unrolled: the layers are scanned, as at the paper
  # shapes, so per-layer collectives are counted in the scan body.
  return QwenConfig.tiny(model_type, vocab_size=256).replace(
      num_layers=qwen.UNROLL_MAX_LAYERS + 1)


class CompiledRolloutTest(parameterized.TestCase):

  @parameterized.parameters((multi_attempt_qwen, "qwen2", ["update_actor", "update_critic"]),
                            (lte_qwen, "qwen3", ["update"]))
  def test_default_layout_rows_split_and_no_collectives(self, module, model_type, updates):
    self.assertEqual(jax.device_count(), 8)
    dump = tempfile.mkdtemp()
    report = pm.compiled_report(_small(module), _model(model_type), 8, None, dump_hlo=dump)
    r, p = report["rollout"], report["plan"]
    # The learner's update programs, compiled on the training layout (fsdp over 8).
    self.assertEqual(report["training_mesh"], {"data": 1, "fsdp": 8, "tensor": 1})
    self.assertCountEqual(report["update"], updates)
    self.assertCountEqual(os.listdir(dump), ["rollout.txt"] + [f"{u}.txt" for u in updates])
    for name, u in report["update"].items():
      planned = p["update"][name]
      self.assertEqual(u["micro_rows"], 8)  # 1024 sequences / mini-batches / micro-batches
      self.assertEqual(u["rows"], planned["rows"])
      # Arguments: params, optimizer state and one mini-batch, exactly as the planner has them.
      args = (planned["params_bytes_per_device"] + planned["optimizer_state_bytes_per_device"]
              + planned["batch_bytes_per_device"])
      self.assertAlmostEqual(u["arguments_bytes_per_device"] / args, 1.0, delta=0.01)
      # FSDP gathers weights, not activations: each layer all-gathers its 4 projection
      # matrices in the forward and again in the (rematerialised) backward, and reduces its
      # gradients there (one all-reduce of the layer's gradients, then the local slice).
      coll = u["collectives"]
      self.assertEqual(coll["activation_all_gathers"], 0, coll["activation_all_gather_types"])
      self.assertEqual(coll["per_layer"].get("weight_all_gathers"), 8, coll)
      self.assertGreaterEqual(coll["per_layer"].get("all_reduces", 0)
                              + coll["per_layer"].get("weight_reduce_scatters", 0), 1, coll)
    self.assertEqual(report["sampling_mesh"], {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertTrue(r["decode_loop_found"])
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)
    self.assertAlmostEqual(p["kv_bytes_per_device"] / r["kv_bytes_per_device"], 1.0, delta=0.1)
    self.assertGreater(r["peak_bytes_per_device"], r["kv_bytes_per_device"])

  @parameterized.parameters((multi_attempt_qwen, "qwen2"), (lte_qwen, "qwen3"))
  def test_scoring_runs_in_update_sized_chunks(self, module, model_type):
    """The scoring program's forwards go through the step's rows in chunks of the update's
    micro-batch rows: more micro-batches, a smaller program; rows never leave their device."""
    peaks = {}
    for micro in (1, 16):
      config = _small(module)
      (config.ppo if module is multi_attempt_qwen else config.grpo).micro_batches = micro
      cs = cm.compile_scoring(config, _model(model_type), parallel.mesh_from_config(config))
      peaks[micro] = pm._peak(cs.memory, True)  # pylint: disable=protected-access
      self.assertNotIn("all-to-all(", cs.hlo)
    self.assertLess(peaks[16], 0.75 * peaks[1])

  def test_tensor_parallel_only_bf16_reductions(self):
    model = _model("qwen3")
    report = pm.compiled_report(_small(lte_qwen, tensor=2), model, 8, None, with_update=False)
    r = report["rollout"]
    self.assertEqual(report["sampling_mesh"], {"data": 4, "fsdp": 1, "tensor": 2})
    # Only the reductions after the attention output and the MLP down projection of each
    # layer (XLA:CPU runs bf16 all-reduces in f32; TPU keeps bf16, see bench/README.md).
    self.assertEqual(set(r["decode_loop_collective_ops"]), {"all-reduce"})
    self.assertBetween(r["decode_loop_collectives"], 1, 2 * model.num_layers)


class FitTest(parameterized.TestCase):
  """plan_memory --fit on 8 simulated CPU devices (XLA:CPU's buffer sums stand in for a
  chip's peak; the budget is set with hbm_gib)."""

  def test_auto_sizes_fit_and_every_program_compiled(self):
    config = _small(lte_qwen)
    config.rollout.batch_size = -1
    config.grpo.micro_batches = -1
    budget = 0.08  # GiB: XLA:CPU needs more than this for the whole step's rows at once
    report = fit.fit_report(config, _model("qwen3"), jax.devices(), None, budget,
                            log=lambda _: None)
    self.assertEqual(report["hbm_bytes_per_device"], int(budget * GiB))
    self.assertCountEqual(report["programs"], ["rollout", "update", "scoring"])
    for name, nbytes in report["programs"].items():
      self.assertIsInstance(nbytes, int)
      self.assertLessEqual(nbytes, report["hbm_bytes_per_device"], name)
    rows, micro = report["overrides"]["rollout.batch_size"], report["overrides"][
        "grpo.micro_batches"]
    episodes = config.rollout.prompts_per_step * config.grpo.group_size
    self.assertEqual(rows % 8, 0)  # a multiple of the sampling layout's data shards
    self.assertLessEqual(rows, episodes)
    self.assertGreaterEqual(micro, 1)
    self.assertEqual(report["flags"], f"--config.rollout.batch_size={rows} "
                     f"--config.grpo.micro_batches={micro}")
    # The rollout's figure is what XLA compiles at those rows, plus the resident state.
    config.rollout.batch_size = rows
    cr = cm.compile_rollout(config, _model("qwen3"), parallel.sampling_mesh(config))
    beside = report["resident_state_bytes_per_device"]
    if report["details"]["rollout"]["offload_state"]:  # "auto": the f32 state parked
      beside -= fit.offloaded_bytes(fit._state(config, _model("qwen3"), {"fsdp": 8})[1])  # pylint: disable=protected-access
    self.assertEqual(report["programs"]["rollout"],
                     beside + pm._peak(cr.memory, True))  # pylint: disable=protected-access

  def test_auto_offload_only_where_the_rollout_needs_it(self):
    """train.offload_state=auto: off where the rollout fits beside the training state; on
    (an override) at a budget it fits only with the f32 state parked in host memory."""
    config = _small(lte_qwen)
    quiet = lambda _: None
    roomy = fit.fit_report(config, _model("qwen3"), jax.devices(), None, 1.0, log=quiet)
    self.assertNotIn("train.offload_state", roomy["overrides"])
    self.assertFalse(roomy["details"]["rollout"]["offload_state"])
    rollout, resident = roomy["programs"]["rollout"], roomy["resident_state_bytes_per_device"]
    others = max(v for k, v in roomy["programs"].items() if k != "rollout")
    self.assertGreater(rollout, others)  # the rollout sets the budget below
    tight = (max(others, rollout - resident // 2) + 1) / GiB
    report = fit.fit_report(config, _model("qwen3"), jax.devices(), None, tight, log=quiet)
    self.assertEqual(report["overrides"]["rollout.batch_size"],
                     roomy["overrides"]["rollout.batch_size"])  # the same rows, parked
    self.assertIs(report["overrides"]["train.offload_state"], True)
    self.assertIn("--config.train.offload_state=True", report["flags"])
    self.assertLess(report["programs"]["rollout"], rollout)
    self.assertLessEqual(report["programs"]["rollout"], report["hbm_bytes_per_device"])
    config.train.offload_state = "false"  # without it the rows must shrink
    kept = fit.fit_report(config, _model("qwen3"), jax.devices(), None, tight, log=quiet)
    self.assertLess(kept["overrides"]["rollout.batch_size"],
                    roomy["overrides"]["rollout.batch_size"])

  def test_xla_out_of_memory_is_a_size_that_does_not_fit(self):
    err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                       "required for HLO temporaries (202.40G) exceeds available HBM (15.75G).")

    def compile_fails():
      raise err

    with self.assertRaises(fit._CompileOOM) as ctx:  # pylint: disable=protected-access
      fit._compile(compile_fails)  # pylint: disable=protected-access
    self.assertEqual(ctx.exception.nbytes, int(202.40 * GiB))

  def test_nothing_fits_exits_1_naming_program_and_bytes(self):
    out = subprocess.run(
        [sys.executable, "-m", "mar.tools.plan_memory", "--config=configs/demo.py:lte",
         "--devices=8", "--hbm_gib=0.0001", "--fit", "--compiled", "--json"],
        capture_output=True, text=True, cwd=_REPO, env=testutil.subprocess_env())
    self.assertEqual(out.returncode, 1, out.stderr[-2000:])
    self.assertIn("does not fit: update needs", out.stderr)
    self.assertRegex(out.stderr, r"\([\d,]+ bytes\) per device")
    self.assertIsNone(json.loads(out.stdout)["fit"])


_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
_NEEDS_LIBTPU = absltest.skipUnless(
    _HAS_LIBTPU or os.environ.get("MAR_REQUIRE_TPU_COMPILE"),  # CI: fail, never skip
    "needs libtpu (pip install -r requirements-tpu.txt)")
GiB = 2**30


@_NEEDS_LIBTPU
class TpuTopologyTest(parameterized.TestCase):
  """Ahead-of-time compiles for 8 TPU v5p chips with tiny model dims (CI runs these).

  The paper shapes compile for minutes per program on two CPU cores; `TpuPaperShapesTest`
  checks them (bench/README.md has the figures).
  """

  @parameterized.parameters((multi_attempt_qwen, "qwen2", ["update_actor", "update_critic"]),
                            (lte_qwen, "qwen3", ["update"]))
  def test_default_layout(self, module, model_type, updates):
    report = pm.compiled_report(_small(module), _model(model_type), None, "v5p:2x2x2")
    r = report["rollout"]
    self.assertEqual(report["target"], "v5p:2x2x2")
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)
    self.assertCountEqual(report["update"], updates)
    for u in report["update"].values():
      self.assertGreater(u["peak_bytes_per_device"], 0)
      coll = u["collectives"]  # FSDP: weights gathered per layer, gradients reduced there
      self.assertEqual(coll["activation_all_gathers"], 0, coll["activation_all_gather_types"])
      self.assertEqual(coll["per_layer"].get("weight_all_gathers"), 8, coll)
      self.assertGreaterEqual(coll["per_layer"].get("all_reduces", 0)
                              + coll["per_layer"].get("weight_reduce_scatters", 0), 1, coll)

  def test_hint_feedback_rollout_compiles(self):
    """hybrid_qwen's feedback turn comes from a host callback inside the per-shard engine;
    its TPU lowering once failed (a tokens + lengths callback: "sharding doesn't match
    tensor rank")."""
    r = pm.compiled_report(_small(hybrid_qwen), _model("qwen2"), None, "v5p:2x2x2",
                           with_update=False)["rollout"]
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])

  def test_fit_with_roofline(self):
    """--fit for a TPU v4-8 (libtpu lists its 2 TensorCores per chip as devices)."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    config = _small(lte_qwen)
    config.rollout.batch_size = -1
    devices = list(topologies.get_topology_desc("v4:2x2x1", "tpu").devices)
    report = fit.fit_report(config, _model("qwen3"), devices, "v4:2x2x1", None,
                            log=lambda _: None)
    self.assertEqual(report["devices_per_chip"], 2)
    self.assertEqual(report["hbm_bytes_per_device"], int(0.9 * 16 * GiB))
    self.assertCountEqual(report["programs"], ["rollout", "update", "scoring"])
    for name, nbytes in report["programs"].items():
      self.assertLessEqual(nbytes, report["hbm_bytes_per_device"], name)
      self.assertGreater(report["details"][name]["xla_flops"], 0)
    self.assertEqual(report["overrides"]["rollout.batch_size"], 1024)  # tiny: all rows fit
    rf = report["roofline"]
    self.assertGreater(rf["step_s"], 0)
    self.assertAlmostEqual(rf["tokens_per_s_per_chip"],
                           rf["tokens_per_step"] / rf["step_s"] / 4, delta=1e-6 * rf[
                               "tokens_per_s_per_chip"])

  def test_tensor_parallel_bf16_reductions(self):
    model = _model("qwen3")
    r = pm.compiled_report(_small(lte_qwen, tensor=2), model, None, "v5p:2x2x2",
                           with_update=False)["rollout"]
    self.assertEqual(r["decode_loop_collective_ops"], {"all-reduce": 2 * model.num_layers})
    self.assertEqual(r["decode_loop_collective_dtypes"], ["bf16"])


@_NEEDS_LIBTPU
@absltest.skipUnless(os.environ.get("MAR_TPU_PAPER_SHAPES"),
                     "paper shapes: ~15 CPU-minutes of compiles; set MAR_TPU_PAPER_SHAPES=1")
class TpuPaperShapesTest(parameterized.TestCase):
  """The issue's checks at the paper configs' real shapes and models, 8 TPU v5p chips."""

  @parameterized.parameters(("multi_attempt_qwen", "qwen2_5_math_1_5b"),
                            ("lte_qwen", "qwen3_8b_base"),
                            ("ppo_qwen", "qwen2_5_math_1_5b"),
                            ("hybrid_qwen", "qwen2_5_math_1_5b"),
                            ("grpo_qwen", "qwen3_8b_base"))
  def test_paper_config(self, name, preset):
    module = {"multi_attempt_qwen": multi_attempt_qwen, "lte_qwen": lte_qwen,
              "ppo_qwen": ppo_qwen, "hybrid_qwen": hybrid_qwen, "grpo_qwen": grpo_qwen}[name]
    report = pm.compiled_report(module.get_config(), PRESETS[preset](), None, "v5p:2x2x2")
    r = report["rollout"]
    self.assertEqual(report["sampling_mesh"], {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertEqual(r["decode_loop_collectives"], 0, r["decode_loop_collective_ops"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)
    peaks = [r["peak_bytes_per_device"]] + [
        u["peak_bytes_per_device"] for u in report["update"].values()]
    self.assertLessEqual(max(peaks), 75 * GiB)
    ratios = report["plan_over_compiled"]
    self.assertCountEqual(ratios, ["kv", "peak"] + list(report["update"]))
    for program, ratio in ratios.items():
      self.assertBetween(ratio, 0.9, 1.1, f"{name} {program}: {ratios}")

  def test_tensor_parallel_only_bf16_reductions(self):
    config = lte_qwen.get_config()
    config.rollout.mesh.tensor = 2
    model = PRESETS["qwen3_8b_base"]()
    r = pm.compiled_report(config, model, None, "v5p:2x2x2", with_update=False)["rollout"]
    self.assertEqual(r["decode_loop_collective_ops"], {"all-reduce": 2 * model.num_layers})
    self.assertEqual(r["decode_loop_collective_dtypes"], ["bf16"])
    self.assertAlmostEqual(r["kv_bytes_per_device"] / (r["kv_bytes_all_rows"] / 8), 1.0,
                           delta=0.05)


if __name__ == "__main__":
  absltest.main()
