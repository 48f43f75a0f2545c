"""The memory planner: its exact figures equal what sharded arrays really hold per device.

The comparison needs real meshes of 8 devices, so it runs in a child process (this file with
--child) that asks for 8 simulated CPU devices before importing jax and prints JSON.
"""

import json
import math
import os
import subprocess
import sys

if __name__ == "__main__" and "--child" in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"

from absl.testing import absltest  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mar import models, parallel  # noqa: E402
from mar.models import model as qwen  # noqa: E402
from mar.models import sharding  # noqa: E402
from mar.rl import optim  # noqa: E402
from mar.tools import compiled_memory as cm  # noqa: E402
from mar.tools import memory_plan as pm  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((2, 2, 2), (1, 8, 1), (1, 4, 2), (8, 1, 1), (2, 1, 4))


def tiny(vocab: int = 64) -> models.QwenConfig:
  return models.QwenConfig.tiny("qwen2", vocab_size=vocab).replace(
      tie_word_embeddings=False, hidden_size=32, intermediate_size=48, num_heads=4,
      num_kv_heads=2, head_dim=16, num_layers=3)


def _child() -> dict:
  """Actual per-device bytes of sharded params / optimizer state / critic / KV cache."""
  out = {"devices": jax.device_count(), "cases": []}
  opt = optim.make_optimizer(1e-3, 10)
  for vocab in (64, 97):  # 97: the vocab dimension cannot split and stays replicated
    config = tiny(vocab)
    for sizes in MESHES:
      mesh = sharding.make_mesh(*sizes)
      sh = parallel.TrainShardings.create(config, mesh, actor_opt=opt, critic_opt=opt,
                                          with_critic=True)
      params = parallel.shard_tree(models.init_params(config, jax.random.key(0)), sh.params)
      critic = parallel.shard_tree({"backbone": models.init_params(config, jax.random.key(1)),
                                    "value_head": qwen.init_value_head(config, jax.random.key(2))},
                                   sh.critic)
      state = parallel.sharded_init(opt, sh.actor_opt).init(params)
      c_state = parallel.sharded_init(opt, sh.critic_opt).init(critic)
      cache = qwen.init_cache(config, 8, 40, jnp.bfloat16)
      cache = jax.device_put(cache, sharding.logical_to_sharding(
          sharding.cache_logical_axes(config), mesh, shapes=cache))
      out["cases"].append({
          "vocab": vocab, "mesh": sizes,
          "params": parallel.per_device_bytes(params),
          "opt": parallel.per_device_bytes(state),
          "critic": parallel.per_device_bytes(critic),
          "critic_opt": parallel.per_device_bytes(c_state),
          "kv": parallel.per_device_bytes(cache),
          "last_device_params": parallel.per_device_bytes(params, jax.devices()[-1]),
      })
  return out


def planned(vocab: int, sizes) -> dict:
  config = tiny(vocab)
  mesh = pm.abstract_mesh(dict(zip(sharding.MESH_AXES, sizes)))
  opt = optim.make_optimizer(1e-3, 10)
  return {
      "params": pm.param_bytes(config, mesh),
      "opt": pm.opt_state_bytes(config, opt, mesh),
      "critic": pm.critic_bytes(config, mesh),
      "critic_opt": pm.opt_state_bytes(config, opt, mesh, critic=True),
      "kv": pm.kv_cache_bytes(config, mesh, 8, 40),
  }


def grpo_config(**mesh) -> ml_collections.ConfigDict:
  from configs import lte_qwen  # pylint: disable=g-import-not-at-top

  c = lte_qwen.get_config()
  c.mesh.update(mesh)
  return c


class PlannerMatchesShardedArraysTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=_REPO)
    cls.error = proc.stderr[-4000:] if proc.returncode else None
    cls.got = json.loads(proc.stdout.strip().splitlines()[-1]) if not cls.error else None

  def test_exact_figures_equal_actual_per_device_bytes(self):
    self.assertIsNone(self.error)
    self.assertEqual(self.got["devices"], 8)
    self.assertLen(self.got["cases"], 2 * len(MESHES))
    for case in self.got["cases"]:
      want = planned(case["vocab"], case["mesh"])
      for key, value in want.items():
        self.assertEqual(case[key], value, f"{key} on mesh {case['mesh']}, vocab {case['vocab']}")
      self.assertEqual(case["last_device_params"], case["params"])

  def test_sharding_really_divides(self):
    self.assertIsNone(self.error)
    full = pm.param_bytes(tiny(64), pm.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    by_mesh = {tuple(c["mesh"]): c["params"] for c in self.got["cases"] if c["vocab"] == 64}
    self.assertEqual(by_mesh[(8, 1, 1)], full)  # data parallel: replicated params
    self.assertLess(by_mesh[(1, 8, 1)], full / 4)


class PlanTest(absltest.TestCase):

  def test_resolve_mesh_shape(self):
    m = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 2})
    self.assertEqual(pm.resolve_mesh_shape(m, 16), {"data": 1, "fsdp": 8, "tensor": 2})
    with self.assertRaisesRegex(ValueError, r"config.mesh \(data=1, fsdp=-1, tensor=3\): 16 "
                                r"devices are not divisible by 3"):
      pm.resolve_mesh_shape(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 3}), 16)
    with self.assertRaisesRegex(ValueError, "needs 4 devices, --devices=8"):
      pm.resolve_mesh_shape(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 1}), 8)

  def test_qwen3_8b_grpo_on_8_devices(self):
    model = models.QwenConfig.qwen3_8b_base()
    n = sum(math.prod(s) for s in jax.tree.leaves(
        models.param_shapes(model), is_leaf=lambda x: isinstance(x, tuple)))
    pl = pm.plan(grpo_config(data=1, fsdp=-1, tensor=1), model, 8, 80.0)
    rows = {r.name: r.bytes for r in pl.rows}
    # Every matrix splits 8 ways; the norms ([L, D], 1.2 MB in all) stay replicated.
    self.assertAlmostEqual(rows["params (f32)"], n * 4 / 8, delta=2e6)
    self.assertBetween(rows["optimizer state"] - 2 * rows["params (f32)"], 1, 64)  # counts
    self.assertEqual(rows["reference model"], 0)
    self.assertNotIn("critic", rows)
    # 256 rows x 36 layers x 8 KV heads x (9216 slots + the 512-slot window) x 128 x bf16,
    # k and v, over 8 devices.
    self.assertEqual(qwen.window_slots(model, 9216), 512)
    self.assertEqual(rows["KV cache (rollout)"],
                     (2 * 36 * 256 * 8 * (9216 + 512) * 128 * 2 + 256 * 9216) // 8)
    self.assertLess(rows["activations, remat on"], rows["activations, remat off"] / 10)
    self.assertTrue(pl.fits)
    self.assertFalse(pm.plan(grpo_config(data=8, fsdp=1, tensor=1), model, 8, 80.0).fits)
    table = pm.format_plan(pl)
    self.assertIn("| params (f32) | 3.82 |", table)
    self.assertIn("fits in 80 GiB per device", table)

  def test_compiled_kv_counts_see_the_cache_window(self):
    """The compiled report's KV figures (expected bytes, and those read off the decode loop's
    carried state) count a long cache's window, as the planner does."""
    model = models.QwenConfig.qwen2_5_math_1_5b()
    rows, slots = 32, 4120
    self.assertEqual(qwen.window_slots(model, slots), 512)
    cache = jax.eval_shape(lambda: qwen.unstack_cache(
        qwen.init_cache(model, rows, slots, jnp.bfloat16)))
    dtypes = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.bool_): "pred"}
    carried = [(dtypes[x.dtype], x.shape) for x in jax.tree.leaves(cache)]
    one = pm.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    planned = pm.kv_cache_bytes(model, one, rows, slots)
    self.assertEqual(cm.loop_kv_bytes(carried, model, slots), planned)
    self.assertEqual(cm.kv_bytes(model, rows, slots, jnp.bfloat16), planned)

  def test_update_plan_counts_the_gathered_embedding_and_head_gradient(self):
    """FSDP gathers the embedding whole into every update program (bf16) and a policy's
    scoring backward holds the head's whole gradient in f32 and bf16: read off the v5p
    compiles of multi_attempt_qwen's programs, which the planner missed by 0.80x / 0.93x."""
    from configs import multi_attempt_qwen  # pylint: disable=g-import-not-at-top

    fsdp8 = {"data": 1, "fsdp": 8, "tensor": 1}
    tied = models.QwenConfig.qwen2_5_math_1_5b()
    vd = tied.vocab_size * tied.hidden_size
    up = pm.update_program_plan(multi_attempt_qwen.get_config(), tied, fsdp8)
    for name in ("update_actor", "update_critic"):
      self.assertEqual(up[name]["gathered_embedding_bytes_per_device"], vd * 2, name)
    chunks = -(-up["update_actor"]["row_len"] // 512) * 512 + 512  # the rows' + one gathered
    self.assertEqual(up["update_actor"]["logits_bytes_per_device"],
                     chunks * tied.vocab_size * 4 + vd * (4 + 2))
    untied = models.QwenConfig.qwen3_8b_base()
    self.assertFalse(untied.tie_word_embeddings)
    g = pm.update_program_plan(grpo_config(data=1, fsdp=8, tensor=1), untied, fsdp8)["update"]
    # embed and lm_head, both gathered
    self.assertEqual(g["gathered_embedding_bytes_per_device"],
                     2 * untied.vocab_size * untied.hidden_size * 2)

  def test_tensor_axis_splits_kv_and_activations(self):
    model = models.QwenConfig.qwen3_8b_base()
    fsdp = pm.plan(grpo_config(data=1, fsdp=8, tensor=1), model, 8, 80.0)
    tp = pm.plan(grpo_config(data=1, fsdp=4, tensor=2), model, 8, 80.0)
    rows = lambda p: {r.name: r.bytes for r in p.rows}
    self.assertEqual(rows(fsdp)["params (f32)"], rows(tp)["params (f32)"])
    # k and v split 8 ways either way (rows over fsdp, KV heads over tensor); the [B, S]
    # validity mask only over the rows.
    self.assertAlmostEqual(rows(fsdp)["KV cache (rollout)"], rows(tp)["KV cache (rollout)"],
                           delta=256 * 9216 // 4)
    # Same rows per device (micro-batch 8 over fsdp 4), heads and MLP halved by tensor = 2.
    no_tp = pm.plan(grpo_config(data=1, fsdp=4, tensor=1), model, 4, 80.0)
    for k in ("activations, remat on", "activations, remat off"):
      self.assertLess(rows(tp)[k], 0.75 * rows(no_tp)[k])

  def test_ppo_plan_has_critic_and_reference(self):
    from configs import multi_attempt_qwen  # pylint: disable=g-import-not-at-top

    c = multi_attempt_qwen.get_config()
    pl = pm.plan(c, models.QwenConfig.qwen2_5_math_1_5b(), 8, 80.0)
    rows = {r.name: r.bytes for r in pl.rows}
    self.assertEqual(rows["reference model"], rows["params (f32)"])
    self.assertEqual(rows["critic"], rows["params (f32)"] + 1536 * 4 // 8)

  def test_cli_json(self):
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mar.tools.plan_memory", "--config=configs/lte_qwen.py",
         "--model=qwen3_8b_base", "--devices=8", "--config.mesh.fsdp=-1",
         "--config.mesh.data=1", "--device_memory_gib=95", "--json"],
        env=env, capture_output=True, text=True, timeout=300, cwd=_REPO)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    self.assertEqual(out["mesh"], {"data": 1, "fsdp": 8, "tensor": 1})
    self.assertTrue(out["fits"])
    self.assertEqual(out["warnings"], [])
    self.assertAlmostEqual(out["rows"]["params (f32)"], 3.82, delta=0.01)

  def test_warns_when_the_micro_batch_does_not_split(self):
    pl = pm.plan(grpo_config(data=1, fsdp=-1, tensor=1), models.QwenConfig.qwen3_8b_base(),
                 16, 95.0)
    self.assertLen(pl.warnings, 1)
    self.assertIn("training micro-batch of 8 rows does not split over the 16", pl.warnings[0])
    self.assertFalse(pl.fits)  # each device runs all 8 rows x 9216 tokens


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(json.dumps(_child()))
  else:
    absltest.main()
