"""The continuous engine on 8 CPU devices: sharded weights, and one engine per data shard.

`ShardedContinuousTest`: on a ('data', 'fsdp', 'tensor') = (2, 2, 2) mesh (one engine over
all rows), the program with B = Q rows and with B < Q rows (refills) gives the episodes of the
one-device program, single-turn (greedy and sampled) and multi-attempt. Runs in a child
process that sets the device count before importing jax (see sampling_sharded_test.py).

`DataSplitTest`: on the default sampling layout (data = 8; the suite's 8 devices, in process)
each data shard runs its own engine over B / 8 rows and Q / 8 queued episodes; the episodes
equal the one-device run's, and the engine loop of the compiled program has no collectives.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__" and "--child" in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"

from absl.testing import absltest  # noqa: E402
import pytest  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELDS = ("tokens", "valid", "action_mask", "feedback_mask", "attempt_id", "reward",
           "attempts_used", "truncated")


def _child() -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mar import models  # pylint: disable=g-import-not-at-top
  from mar.models import sharding  # pylint: disable=g-import-not-at-top
  from mar.sampling import generation  # pylint: disable=g-import-not-at-top
  import testutil  # pylint: disable=g-import-not-at-top

  def compare(ref, got):
    (a, _), (b, _) = ref, got
    same = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in _FIELDS)
    return same, float(np.abs(a.logprobs - b.logprobs).max())

  out = {"devices": jax.device_count()}
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, config, params = testutil.hf_tiny("qwen2")
  placed = generation.shard_for_mesh(config, params, mesh)
  prompts = testutil.prompts_for(lens=testutil.ENGINE_PROMPT_LENS)
  stop_ids = tuple(range(1, 300, 9))
  for temperature in (0.0, 1.0):
    run = lambda p, rows: testutil.engine_single_turn(config, p, prompts, rows=rows, budget=16,  # pylint: disable=cell-var-from-loop
                                         temperature=temperature, stop_ids=stop_ids, key=5)
    ref = run(params, len(prompts))
    for rows in (len(prompts), 3):
      out[f"single_t{temperature}_rows{rows}"] = compare(ref, run(placed, rows))

  tok = testutil.tiny_tokenizer()
  cfg = models.QwenConfig.tiny("qwen3", vocab_size=tok.vocab_size)
  p0 = models.init_params(cfg, jax.random.PRNGKey(0))
  ref = testutil.engine_multi_attempt_sampled(cfg, p0, tok, rows=6)
  out["multi_feedback"] = bool(ref[0].feedback_mask.any())
  placed = generation.shard_for_mesh(cfg, p0, mesh)
  for rows in (6, 2):
    out[f"multi_rows{rows}"] = compare(ref, testutil.engine_multi_attempt_sampled(cfg, placed, tok, rows=rows))
  return out


class ShardedContinuousTest(absltest.TestCase):

  @pytest.mark.slow
  def test_mesh_2x2x2_matches_one_device(self):
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=_REPO)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(got["devices"], 8)
    self.assertTrue(got.pop("multi_feedback"))
    keys = [k for k in got if k != "devices"]
    self.assertLen(keys, 6)
    for k in keys:
      same, diff = got[k]
      self.assertTrue(same, k)
      self.assertLess(diff, 1e-4, k)


class DataSplitTest(absltest.TestCase):
  """Rows and queue split over 'data' = 8 (in process: tests/conftest.py gives 8 devices)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # pylint: disable=g-import-not-at-top
    import jax
    from mar import models
    from mar.models import sharding
    import testutil
    # pylint: enable=g-import-not-at-top
    cls.mesh = sharding.make_mesh(8, 1, 1)
    cls.tok = testutil.tiny_tokenizer()
    cls.cfg = models.QwenConfig.tiny("qwen3", vocab_size=cls.tok.vocab_size)
    cls.params = models.init_params(cls.cfg, jax.random.PRNGKey(0))

  def _assert_same(self, ref, got, fields=_FIELDS + ("attempted_turn", "correct_turn")):
    import numpy as np  # pylint: disable=g-import-not-at-top
    for f in fields:
      np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), f)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)

  def test_split_needs_manual_axes_for_callbacks(self):
    from mar.models import sharding  # pylint: disable=g-import-not-at-top
    from mar.rollout import continuous  # pylint: disable=g-import-not-at-top
    split = continuous.split_over_data
    self.assertTrue(split(self.mesh, 8, 16, callbacks=True))
    self.assertFalse(split(self.mesh, 4, 16, callbacks=False))  # rows not a multiple of D
    self.assertFalse(split(None, 8, 16, callbacks=False))
    tp = sharding.make_mesh(4, 1, 2)
    self.assertTrue(split(tp, 8, 16, callbacks=False))
    # JAX runs host callbacks in shard_map only with every axis manual: one engine instead.
    self.assertFalse(split(tp, 8, 16, callbacks=True))
    self.assertFalse(split(sharding.make_mesh(2, 2, 2), 8, 16, callbacks=False))

  def test_single_turn_sampled_equals_one_device(self):
    import jax  # pylint: disable=g-import-not-at-top
    import testutil  # pylint: disable=g-import-not-at-top
    self.assertEqual(jax.device_count(), 8)
    _, config, params = testutil.hf_tiny("qwen2")
    prompts = testutil.prompts_for(lens=testutil.ENGINE_PROMPT_LENS * 2)  # Q = 16 over B = 8 rows: refills
    run = lambda mesh: testutil.engine_single_turn(config, params, prompts, rows=8, budget=16,
                                      temperature=1.0, stop_ids=tuple(range(1, 300, 9)),
                                      key=5, mesh=mesh)
    (ref, ref_stats), (got, stats) = run(None), run(self.mesh)
    self._assert_same(ref, got, _FIELDS)
    self.assertEqual(int(stats["sampled"]), int(ref_stats["sampled"]))
    self.assertEqual(int(stats["prefill_rows"]), 16)
    self.assertGreater(int(stats["prefill_calls"]), 8)  # each shard refilled its one row

  def test_multi_attempt_sampled_equals_one_device(self):
    """Verification callbacks per shard, with global episode ids for keys and gold answers."""
    import testutil  # pylint: disable=g-import-not-at-top
    run = lambda mesh: testutil.engine_multi_attempt_sampled(self.cfg, self.params, self.tok,
                                                             rows=8, n=16, mesh=mesh)
    (ref, ref_stats), (got, stats) = run(None), run(self.mesh)
    self.assertTrue(ref.feedback_mask.any())
    self.assertGreater(int(ref.attempts_used.sum()), 20)
    self._assert_same(ref, got)
    self.assertEqual(int(stats["sampled"]), int(ref_stats["sampled"]))

  def test_runner_multi_attempt_greedy_equals_one_device(self):
    """RolloutRunner on the data = 8 layout, a scripted policy."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mar import sampling  # pylint: disable=g-import-not-at-top
    from mar.data import prompts  # pylint: disable=g-import-not-at-top
    from mar.rollout.runner import RolloutRunner, RunnerSpec  # pylint: disable=g-import-not-at-top
    import scripted  # pylint: disable=g-import-not-at-top
    import testutil  # pylint: disable=g-import-not-at-top
    n = 16
    texts = [[f"\\boxed{{{q}}}<|im_end|>", f"\\boxed{{{q + 10}}}"] for q in range(n)]
    enc = [[self.tok.encode(t) for t in row] for row in texts]
    width = max(len(x) for row in enc for x in row)
    script = np.zeros((n, 2, width), np.int32)
    lengths = np.ones((n, 2), np.int32)
    for q, row in enumerate(enc):
      for t, ids in enumerate(row):
        script[q, t, :len(ids)], lengths[q, t] = ids, len(ids)
    # Episode q is right at once if q % 3 == 0, at its second attempt otherwise: a gold
    # looked up by a shard-local id would give other rewards.
    golds = [str(q) if q % 3 == 0 else str(q + 10) for q in range(n)]
    n_attempts = [1 if q % 5 == 4 else 2 for q in range(n)]
    question = [prompts.multi_attempt_prompt(f"{q}+q", 2) for q in range(n)]

    def run(mesh):
      runner = RolloutRunner(self.cfg, self.tok, testutil.ListVerifier(), RunnerSpec(batch_size=8,
          prompt_len=64, max_attempts=2, token_budget=40,
          sampling=sampling.SamplingParams(temperature=0.0), refill_rows=1, refill_wait=1,
          verify_every=2), choose_fn=scripted.script_chooser(script, lengths), sampling_mesh=mesh)
      ep = jax.device_get(runner.run(self.params, question, golds, n_attempts,
                                     jax.random.PRNGKey(0)))
      return ep, runner.take_stats()

    (ref, ref_stats), (got, stats) = run(None), run(self.mesh)
    want = [1.0 if q % 3 == 0 else (-0.5 if q % 5 == 4 else 1.0) for q in range(n)]
    np.testing.assert_allclose(ref.reward, want)
    self._assert_same(ref, got)
    self.assertEqual(stats["rollout/prefill_rows"], ref_stats["rollout/prefill_rows"])

  def test_engine_loop_has_no_collectives(self):
    """The compiled engine (single-turn and with verification callbacks): rows split, no
    collective inside its while loop (the stats' psum / pmax run once, after it)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from mar import sampling  # pylint: disable=g-import-not-at-top
    from mar.data.tokenizer import feedback_table  # pylint: disable=g-import-not-at-top
    from mar.rollout import continuous  # pylint: disable=g-import-not-at-top
    from mar.rollout import spec as spec_lib
    from mar.rollout.host import AttemptVerifier  # pylint: disable=g-import-not-at-top
    from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top
    import testutil  # pylint: disable=g-import-not-at-top
    q, p, budget = 32, 16, 24
    fb_t, fb_l = feedback_table(self.tok, 2)
    toks, mask = jnp.zeros((q, p), jnp.int32), jnp.ones((q, p), bool)
    checked = AttemptVerifier(self.tok, testutil.ListVerifier(), ["1"] * q)  # pylint: disable=protected-access
    for m, verifier in ((1, None), (2, checked)):
      spec = spec_lib.RolloutSpec(m, budget, spec_lib.cache_len_for(p, budget, m, fb_t.shape[1]),
                            sampling.SamplingParams(temperature=1.0), (1, 2))
      espec = continuous.EngineSpec(spec, rows=16)
      fn = jax.jit(lambda params, t, mk, k: continuous.rollout(  # pylint: disable=cell-var-from-loop
          self.cfg, params, espec, None, verifier, t, mk, jnp.full((q,), m, jnp.int32),  # pylint: disable=cell-var-from-loop
          fb_t, fb_l, k, mesh=self.mesh))
      compiled = fn.lower(self.params, toks, mask, jax.random.key(0)).compile()
      hlo = compiled.as_text()
      loop = cm.decode_loop_collectives(hlo, self.cfg.num_layers)
      self.assertTrue(loop["found"], m)
      self.assertEqual(loop["count"], 0, (m, loop["ops"]))
      # In the whole program, only the stats' reductions (the pmax and the psums, fused).
      ops = [i.opcode for instrs in cm.parse_hlo(hlo).values() for i in instrs
             if i.opcode in cm.COLLECTIVES]
      self.assertEqual(set(ops), {"all-reduce"}, m)
      self.assertLessEqual(len(ops), 2, m)
      out, _ = compiled(self.params, toks, mask, jax.random.key(0))
      self.assertEqual(out.tokens.sharding.shard_shape(out.tokens.shape)[0], q // 8)


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(json.dumps(_child()))
  else:
    absltest.main()
