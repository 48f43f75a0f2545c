"""Sharded training: one PPO and one GRPO/LTE step on a 2x2x2 mesh equal the 1-device step.

jax fixes its device count when its backend starts, so the 8-device run happens in a child
process (this file with --child OUT.npz) that asks for 8 simulated CPU devices before
importing jax. The 1-device reference runs in this process, on one device, without a mesh.
"""

import json
import os
import subprocess
import sys
import tempfile

if __name__ == "__main__" and ("--child" in sys.argv or "--trainer_child" in sys.argv):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"
if __name__ == "__main__" and ("--multihost_child" in sys.argv
                               or "--multihost_trainer_child" in sys.argv):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"

from absl.testing import absltest  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mar import algorithms  # noqa: E402
from mar import models, parallel  # noqa: E402
from mar.episodes import GroupBatch  # noqa: E402
from mar.models import sharding  # noqa: E402
from mar.rl import grpo, optim, ppo  # noqa: E402
import testutil  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S = testutil.B, testutil.S


def _optimizer():
  """Adam at lr 1e-2 from step 0. Adam's first step is lr * g / (|g| + eps), a step function
  of g where |g| << eps does not hold; with the default eps 1e-8 a gradient entry of ~1e-9
  (f32 summation-order noise) flips sign between layouts and moves that weight by 2 * lr.
  Gradients agree to ~1e-7 (2e-6 of their scale); eps = 1e-3 keeps d(update)/dg = lr / eps
  small enough that this stays under the tolerance, so the comparison tests the sharding."""
  return optim.make_optimizer(1e-2, 10, warmup_ratio=0.0, eps=1e-3)


def _flat(prefix: str, tree) -> dict:
  return {prefix + jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _gather(tree):
  """Whole arrays as numpy, also when they span several processes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.process_allgather(tree, tiled=True)


def run_steps(mesh=None) -> dict:
  """One PPO step (2 mini-batches) and one LTE step (2 micro-batches), from the same init.

  On a mesh spanning several processes each process feeds only its own rows
  (`parallel.local_rows`), as the trainer's per-host data and verification would.
  """
  config = testutil.tiny_model_config()
  host = lambda key: jax.device_get(models.init_params(config, jax.random.key(key), std=0.2))
  params = host(0)
  critic = {"backbone": host(1),
            "value_head": np.asarray(models.init_value_head(config, jax.random.key(2)))}
  ref = jax.tree.map(lambda x: x * np.float32(0.99), params)
  rows = parallel.local_rows(B)
  out = {}

  # One micro-batch: packed PPO micro-batches average their own token means, and how the
  # packed rows split into micro-batches follows the mesh's row bucketing (GRPO's loss uses
  # the mini-batch's normaliser and is exact with 2).
  hp = ppo.PPOHparams(micro_batches=1, logprob_chunk=8)
  opt = _optimizer()
  learner = ppo.PPOLearner(config, hp, opt, opt, mesh=mesh)
  # The updates donate their inputs: fresh device arrays per use.
  a_opt, c_opt = opt, opt
  pol, cri, rf = (jax.tree.map(jnp.asarray, t) for t in (params, critic, ref))
  if mesh is not None:
    sh = learner.shardings
    pol, rf = (parallel.shard_tree(t, sh.params) for t in (params, ref))
    cri = parallel.shard_tree(critic, sh.critic)
    a_opt, c_opt = parallel.sharded_init(opt, sh.actor_opt), parallel.sharded_init(opt, sh.critic_opt)
    out["qkv_shard_shape"] = np.asarray(pol["layers"]["qkv"].addressable_shards[0].data.shape)
  ep = testutil.episodes()
  ep = ep._replace(**{f: getattr(ep, f)[rows] for f in ppo._SCORED})  # pylint: disable=protected-access
  pol, a_state, cri, c_state, metrics = learner.step(
      pol, a_opt.init(pol), cri, c_opt.init(cri), rf, ep, num_mini_batches=2)
  if mesh is not None:
    out["ppo_policy_spec_kept"] = np.asarray(
        pol["layers"]["qkv"].sharding.spec == learner.shardings.params["layers"]["qkv"].spec)
  out.update(_flat("ppo/metrics", metrics))
  out.update(_flat("ppo/policy", _gather(pol)))
  out.update(_flat("ppo/critic", _gather(cri)))
  out.update(_flat("ppo/adam", _gather(a_state)))

  ghp = grpo.GRPOHparams(kl_coef=0.01, entropy_coef=0.001, micro_batches=2, logprob_chunk=8)
  glearner = grpo.GRPOLearner(config, ghp, opt, response_len=16, mesh=mesh)
  g_opt, gpol, grf = opt, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, ref)
  batch = {k: v[rows] for k, v in testutil.group_batch().items()}
  tv = (batch["tokens"], batch["valid"])
  if mesh is not None:
    g_opt = parallel.sharded_init(opt, glearner.shardings.actor_opt)
    gpol, grf = (parallel.shard_tree(t, glearner.shardings.params) for t in (params, ref))
    tv = parallel.put_batch(tv, mesh)
  batch["old_logp"] = parallel.host_local(glearner.logprobs(gpol, *tv)) - np.float32(0.05)
  gpol, g_state, gmetrics = glearner.step(gpol, g_opt.init(gpol), GroupBatch(**batch),
                                          ref=grf, num_mini_batches=2)
  out.update(_flat("grpo/metrics", gmetrics))
  out.update(_flat("grpo/policy", _gather(gpol)))
  out.update(_flat("grpo/adam", _gather(g_state)))
  out["devices"] = np.asarray(jax.device_count())
  return out


def _child(path: str) -> None:
  mesh = sharding.make_mesh(2, 2, 2)
  np.savez(path, **run_steps(mesh))


def _multihost_child(pid: int, port: int, workdir: str) -> None:
  """One of 2 processes x 4 CPU devices (jax.distributed, gloo collectives), mesh 2x2x2.

  Runs `run_steps` on its own rows, then saves and restores a sharded state with the
  orbax Checkpointer and writes a metrics row; process 0 writes what it saw to workdir.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid)
  from mar import checkpoint, metrics  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(2, 2, 2)
  out = run_steps(mesh)
  out["local_devices"] = np.asarray(jax.local_device_count())
  config = testutil.tiny_model_config()
  params = jax.device_get(models.init_params(config, jax.random.key(5)))
  state = {"policy": parallel.shard_tree(params, sharding.param_shardings(config, mesh))}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), async_save=False)
  ckpt.save(1, state, extra={"step": 1}, force=True)
  ckpt.wait()
  step, restored, extra = ckpt.restore(state)
  ckpt.close()
  out["ckpt_step"] = np.asarray(step)
  out["ckpt_equal"] = np.asarray(all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_gather(restored)),
                                           jax.tree.leaves(params))))
  out["ckpt_spec_kept"] = np.asarray(
      restored["policy"]["layers"]["qkv"].sharding == state["policy"]["layers"]["qkv"].sharding)
  writer = metrics.MetricsWriter(os.path.join(workdir, f"metrics_{pid}"))
  writer.write(1, {"loss": 1.0})
  writer.close()
  if pid == 0:
    np.savez(os.path.join(workdir, "multihost.npz"), **out)


# Trainer runs on a 2x2x2 mesh: name -> (tiny_config method, overrides).
_TRAINER_RUNS = {
    "ppo": ("ppo", {}),
    "lte": ("lte", {}),
    "grpo": ("grpo", {}),
    "ppo_single_turn": ("ppo", {"rollout.max_attempts": 1, "rollout.prompt": "single_turn"}),
}


def _trainer_child(names) -> dict:
  """Two iterations of the real trainer (setup.build_run) per run, on a 2x2x2 mesh.

  In a multi-host child each process passes the whole step's examples; the iterations
  take this host's share.
  """
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from mar import setup, train  # pylint: disable=g-import-not-at-top

  # All processes load the model folder the parent built (only process 0 would write one).
  testutil._SHARED_MODEL["path"] = os.environ["MAR_TEST_MODEL"]  # pylint: disable=protected-access
  out = {}
  for name in names:
    method, over = _TRAINER_RUNS[name]
    config = testutil.tiny_config(method, **over)
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    run = setup.build_run(config, tempfile.mkdtemp())
    state = algorithms.family(config).init_state(config, run)
    iteration = algorithms.ppo.iteration if method == "ppo" else algorithms.group.iteration
    steps = []
    for step in range(2):
      idx = train.batch_indices(config, len(run.train_data), step)
      state, m = iteration(config, run, state, [run.train_data[i] for i in idx], step)
      steps.append(parallel.mean_over_hosts(m))
    mu = state["actor_opt"].inner_state[1][0].mu
    out[name] = {
        "mesh": dict(run.mesh.shape), "losses": [float(m["loss"]) for m in steps],
        "rewards": [float(m["reward_mean"]) for m in steps],
        "extra_sampled": any("time/sample_extra" in m for m in steps),
        "qkv_spec": str(state["policy"]["layers"]["qkv"].sharding.spec),
        "mu_qkv_spec": str(mu["layers"]["qkv"].sharding.spec),
        "critic_spec": str(state["critic"]["backbone"]["layers"]["down"].sharding.spec)
                       if method == "ppo" else None,
    }
    run.close()
  return out


def _multihost_trainer_child(pid: int, port: int, out_path: str) -> None:
  """One of 2 processes x 4 CPU devices running the trainer's iterations."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid)
  out = _trainer_child(("grpo", "ppo_single_turn", "lte", "ppo"))
  with open(f"{out_path}.{pid}", "w") as f:
    json.dump(out, f)


def _layout_count(key: str) -> bool:
  """Positions the packed update computes: rows round up to a multiple of the mesh's shards."""
  return key.endswith("train/padded_positions']")


def _per_host_count(key: str) -> bool:
  """Token counts of the learner's batch: each host reports its own rows' (then averaged).

  Also the clip fractions: a count of tokens on either side of the clip boundary, which a
  1e-7 difference between packed layouts may move by one token (the losses, gradients and
  parameters they come with are compared to 1e-5).
  """
  return _layout_count(key) or key.endswith(("train/real_tokens']", "clipfrac']"))


class ShardedStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = os.path.join(tempfile.mkdtemp(), "sharded.npz")
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", cls.out],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=_REPO)
    with jax.default_device(jax.devices()[0]):  # meanwhile, the 1-device reference
      cls.single = run_steps(None)
    _, cls.stderr = child.communicate(timeout=900)
    cls.returncode = child.returncode

  def sharded(self) -> dict:
    self.assertEqual(self.returncode, 0, self.stderr[-4000:])
    return dict(np.load(self.out))

  def test_ran_on_a_2x2x2_mesh(self):
    got = self.sharded()
    self.assertEqual(int(got["devices"]), 8)
    # qkv [L, D, K, R+2, Dh] = [2, 32, 2, 4, 16] split over fsdp (D) and tensor (K).
    np.testing.assert_array_equal(got["qkv_shard_shape"], [2, 16, 1, 4, 16])
    self.assertTrue(bool(got["ppo_policy_spec_kept"]))

  def _compare(self, prefix: str):
    got = self.sharded()
    keys = sorted(k for k in self.single if k.startswith(prefix) and not _layout_count(k))
    self.assertNotEmpty(keys)
    for k in keys:
      ref, val = self.single[k], got[k]
      self.assertEqual(ref.shape, val.shape, k)
      if k.endswith("clipfrac']"):
        # A fraction of tokens whose clipped and unclipped errors compare: on the first
        # mini-batch V == V_old up to f32 reassociation (scoring vs update program, FSDP
        # gathers), which decides ties. One token of ~95 may flip.
        np.testing.assert_allclose(val, ref, atol=0.015, err_msg=k)
      elif ref.dtype.kind == "f":
        scale = max(float(np.abs(ref).max()), 1e-6)
        np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=k)
      else:
        np.testing.assert_array_equal(val, ref, err_msg=k)

  def test_ppo_step_equals_single_device(self):
    self._compare("ppo/")
    moved = np.abs(self.single["ppo/policy['embed']"] - models.init_params(
        testutil.tiny_model_config(), jax.random.key(0), std=0.2)["embed"]).max()
    self.assertGreater(moved, 1e-3)  # the step really changed the params
    self.assertTrue(np.isfinite(self.single["ppo/metrics['actor/loss']"]))

  def test_grpo_lte_step_equals_single_device(self):
    self._compare("grpo/")
    self.assertGreater(float(self.single["grpo/metrics['grad_norm']"]), 0.0)


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
class MultiHostTest(absltest.TestCase):
  """Two processes (jax.distributed on localhost), each feeding its own half of the rows."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--multihost_child",
                               str(pid), str(port), cls.workdir], env=env, cwd=_REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    with jax.default_device(jax.devices()[0]):
      cls.single = run_steps(None)
    cls.results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]

  def got(self) -> dict:
    for _, err, code in self.results:
      self.assertEqual(code, 0, err[-4000:])
    return dict(np.load(os.path.join(self.workdir, "multihost.npz")))

  def test_steps_equal_single_device(self):
    got = self.got()
    self.assertEqual(int(got["devices"]), 8)
    self.assertEqual(int(got["local_devices"]), 4)
    for k in sorted(self.single):
      if k.startswith(("ppo/", "grpo/")) and self.single[k].dtype.kind == "f" \
          and not _per_host_count(k):
        scale = max(float(np.abs(self.single[k]).max()), 1e-6)
        np.testing.assert_allclose(got[k], self.single[k], rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=k)

  def test_checkpoint_and_metrics(self):
    got = self.got()
    self.assertEqual(int(got["ckpt_step"]), 1)
    self.assertTrue(bool(got["ckpt_equal"]))
    self.assertTrue(bool(got["ckpt_spec_kept"]))
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "metrics_0", "metrics.jsonl")))
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "metrics_1", "metrics.jsonl")))


@pytest.mark.slow
class ShardedTrainerTest(absltest.TestCase):
  """setup.build_run wires the mesh: the trainer on 8 devices, in one process and in two.

  The two-process run (jax.distributed on localhost, 4 devices each) has each host build,
  sample and verify only its share of the prompts; its single-turn steps must equal the
  one-process steps on the same 2x2x2 mesh.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MAR_TEST_MODEL=testutil.shared_model())
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    cls.out = os.path.join(tempfile.mkdtemp(), "trainer.json")
    port = _free_port()
    me = os.path.abspath(__file__)
    hosts = [subprocess.Popen([sys.executable, me, "--multihost_trainer_child", str(pid),
                               str(port), cls.out], env=env, cwd=_REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    one = subprocess.run([sys.executable, me, "--trainer_child"], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=_REPO)
    cls.one = (one.returncode, one.stdout, one.stderr)
    cls.hosts = [p.communicate(timeout=1200) + (p.returncode,) for p in hosts]

  def one_process(self) -> dict:
    code, out, err = self.one
    self.assertEqual(code, 0, err[-4000:])
    return json.loads(out.strip().splitlines()[-1])

  def two_processes(self) -> list[dict]:
    for _, err, code in self.hosts:
      self.assertEqual(code, 0, err[-4000:])
    return [json.load(open(f"{self.out}.{pid}")) for pid in (0, 1)]

  def test_iterations_on_2x2x2_mesh(self):
    got = self.one_process()
    for method in _TRAINER_RUNS:
      r = got[method]
      self.assertEqual(r["mesh"], {"data": 2, "fsdp": 2, "tensor": 2})
      self.assertTrue(all(np.isfinite(r["losses"])), r)
      self.assertEqual(r["qkv_spec"], "P(None, 'fsdp', 'tensor', None, None)")
      self.assertEqual(r["mu_qkv_spec"], r["qkv_spec"])  # Adam moments follow the params
    self.assertEqual(got["ppo"]["critic_spec"], "P(None, 'tensor', 'fsdp')")

  def test_two_hosts_equal_one_process(self):
    one, hosts = self.one_process(), self.two_processes()
    for name in ("grpo", "ppo_single_turn"):
      for h in hosts:  # metrics are averaged over hosts: both report the global values
        np.testing.assert_allclose(h[name]["losses"], one[name]["losses"], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
        np.testing.assert_allclose(h[name]["rewards"], one[name]["rewards"], rtol=1e-6,
                                   err_msg=name)

  def test_two_hosts_run_lte_and_multi_attempt_ppo(self):
    hosts = self.two_processes()
    for h in hosts:
      self.assertTrue(all(np.isfinite(h["lte"]["losses"])), h["lte"])
      # Hinted sampling ran (here one host's group fails, the other's passes: a host with
      # no none-pass group joins the sampling programs with idle groups).
      self.assertTrue(h["lte"]["extra_sampled"])
      # Multi-attempt rollouts run per host (own rows, own devices, gathered policy); the
      # update is one program over both hosts' rows.
      self.assertTrue(all(np.isfinite(h["ppo"]["losses"])), h["ppo"])
      self.assertTrue(all(-1.0 <= r <= 1.0 for r in h["ppo"]["rewards"]), h["ppo"])
      self.assertEqual(h["ppo"]["critic_spec"], "P(None, 'tensor', 'fsdp')")
    self.assertEqual(hosts[0]["ppo"]["losses"], hosts[1]["ppo"]["losses"])


class ParallelHelpersTest(absltest.TestCase):

  def test_rules_from_config_overrides_only_what_it_names(self):
    c = ml_collections.ConfigDict({"sharding_rules": [["embed", None], ["mlp", ["fsdp", "tensor"]]]})
    rules = dict(parallel.rules_from_config(c))
    self.assertIsNone(rules["embed"])
    self.assertEqual(rules["mlp"], ("fsdp", "tensor"))
    self.assertEqual(rules["vocab"], "tensor")
    self.assertEqual(parallel.rules_from_config(ml_collections.ConfigDict({})),
                     sharding.DEFAULT_RULES)
    bad = ml_collections.ConfigDict({"sharding_rules": [["embed", "model"]]})
    with self.assertRaisesRegex(ValueError, r"sharding_rules\[0\]: mesh axis 'model'"):
      parallel.rules_from_config(bad)

  def test_mesh_from_config_names_the_field(self):
    c = ml_collections.ConfigDict({"mesh": {"data": 3, "fsdp": 5, "tensor": 1}})
    with self.assertRaisesRegex(ValueError, r"config.mesh \(data=3, fsdp=5"):
      parallel.mesh_from_config(c)
    one = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
    mesh = parallel.mesh_from_config(one, devices=jax.devices()[:1])
    self.assertEqual(dict(mesh.shape), {"data": 1, "fsdp": 1, "tensor": 1})

  def test_opt_state_shardings_follow_params(self):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = testutil.tiny_model_config()
    sh = parallel.TrainShardings.create(config, mesh, actor_opt=_optimizer(),
                                        critic_opt=_optimizer())
    mu = sh.actor_opt.inner_state[1][0].mu
    self.assertIs(mu["layers"]["qkv"], sh.params["layers"]["qkv"])
    self.assertEqual(sh.actor_opt.num_skipped.spec, P())
    self.assertIs(sh.critic_opt.inner_state[1][0].nu["value_head"], sh.critic["value_head"])

  def test_local_rows(self):
    self.assertEqual(parallel.local_rows(16, 1, 2), slice(8, 16))
    self.assertEqual(parallel.local_rows(16, 0, 1), slice(0, 16))
    with self.assertRaisesRegex(ValueError, "12 rows does not split over 5 hosts"):
      parallel.local_rows(12, 0, 5)


if __name__ == "__main__":
  if "--multihost_child" in sys.argv:
    i = sys.argv.index("--multihost_child")
    _multihost_child(int(sys.argv[i + 1]), int(sys.argv[i + 2]), sys.argv[i + 3])
  elif "--multihost_trainer_child" in sys.argv:
    i = sys.argv.index("--multihost_trainer_child")
    _multihost_trainer_child(int(sys.argv[i + 1]), int(sys.argv[i + 2]), sys.argv[i + 3])
  elif "--trainer_child" in sys.argv:
    print(json.dumps(_trainer_child(tuple(_TRAINER_RUNS))))
  elif "--child" in sys.argv:
    _child(sys.argv[sys.argv.index("--child") + 1])
  else:
    absltest.main()
