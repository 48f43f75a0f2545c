"""Host/device overlap: deferred single-turn verification and the device timeline."""

import tempfile
import time

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from mar import overlap, setup
from mar.data import synthetic
from mar.lte import hints
from mar.rollout.runner import RolloutRunner, RunnerSpec
from mar.sampling import SamplingParams
from testutil import tiny_config


class DeferredVerificationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = tiny_config("grpo")
    cls.mar_run = setup.build_run(config, tempfile.mkdtemp())
    examples = synthetic.make_arithmetic_examples(10, seed=3, min_digits=1, max_digits=1)
    cls.prompts = [hints.chat_prompt(hints.plain_prompt(e.question)) for e in examples]
    cls.answers = [e.answer for e in examples]
    cls.config = config

  @classmethod
  def tearDownClass(cls):
    cls.mar_run.close()
    super().tearDownClass()

  def _runner(self, defer: bool, timeline=None) -> RolloutRunner:
    r = self.mar_run
    return RolloutRunner(r.model_config, r.tokenizer, r.verifier, RunnerSpec(batch_size=4,
        prompt_len=r.runner.prompt_len, max_attempts=1,
        token_budget=self.config.rollout.token_budget, sampling=SamplingParams(temperature=1.0)),
        defer_verify=defer, timeline=timeline)

  def _mixed_outcome_key(self):
    """A sampling key under which some prompts are solved and some not (both reward
    branches get compared)."""
    runner = self._runner(True)
    for seed in range(5, 13):
      key = jax.random.PRNGKey(seed)
      correct = runner.run_host(self.mar_run.params, self.prompts, self.answers, key).correct
      if correct.any() and not correct.all():
        return key
    self.fail("no key in 5..12 gives both outcomes")

  def test_pipelined_chunks_equal_callback_verification(self):
    """10 prompts queued over 4 rows: host verdicts after the program = verdicts inside it."""
    key = self._mixed_outcome_key()
    timeline = overlap.DeviceTimeline()
    deferred = self._runner(True, timeline)
    self.assertTrue(deferred.deferred)
    t0 = time.perf_counter()
    got = deferred.run_host(self.mar_run.params, self.prompts, self.answers, key)
    inline = self._runner(False)
    want = inline.run_host(self.mar_run.params, self.prompts, self.answers, key)
    self.assertGreater(inline.verify_fn.calls, 0)
    self.assertEqual(deferred.verify_fn.calls, 0)  # no callback in the deferred program
    self.assertEqual(got.responses, want.responses)
    self.assertEqual(got.answers, want.answers)
    for f in ("correct", "truncated", "reward"):
      np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    self.assertLen(got.responses, 10)
    # Both outcomes occur, so the comparison covers the reward table's branches.
    self.assertTrue(got.correct.any() and not got.correct.all(), got.reward)
    busy = timeline.busy_seconds(since=t0)
    self.assertGreater(busy, 0.0)
    # Busy time since t0 fits in the time since t0 (read after it: the last interval may be
    # closed by the runner's thread just after run_host returns).
    self.assertLessEqual(busy, time.perf_counter() - t0)

  def test_run_fills_rewards_of_a_deferred_batch(self):
    deferred, inline = self._runner(True), self._runner(False)
    key = jax.random.PRNGKey(1)
    got = deferred.run(self.mar_run.params, self.prompts[:3], self.answers[:3], [1] * 3, key)
    want = jax.device_get(inline.run(self.mar_run.params, self.prompts[:3], self.answers[:3],
                                     [1] * 3, key))
    for f in ("tokens", "action_mask", "reward", "correct_turn", "boxed_turn", "truncated",
              "attempted_turn"):
      np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    self.assertLen(got.reward, 3)  # exactly the prompts' rows, queue padding dropped

  def test_multi_attempt_cannot_defer(self):
    r = self.mar_run
    with self.assertRaisesRegex(ValueError, "single-turn"):
      RolloutRunner(r.model_config, r.tokenizer, r.verifier, RunnerSpec(batch_size=4, prompt_len=64,
          max_attempts=2, token_budget=8, sampling=SamplingParams()), defer_verify=True)


class DeviceTimelineTest(absltest.TestCase):

  def test_busy_is_the_union_of_intervals(self):
    timeline = overlap.DeviceTimeline()
    for span in ((10.0, 11.0), (10.5, 12.0), (13.0, 14.0)):
      timeline._add(*span)  # pylint: disable=protected-access
    self.assertAlmostEqual(timeline.busy_seconds(since=10.0), 3.0)
    self.assertAlmostEqual(timeline.busy_seconds(since=11.5), 1.5)
    timeline.forget_before(12.5)
    self.assertAlmostEqual(timeline.busy_seconds(since=0.0), 1.0)

  def test_tracked_work_counts_from_dispatch_to_done(self):
    timeline = overlap.DeviceTimeline()
    square = jax.jit(lambda x: x @ x)
    x = jnp.ones((512, 512))
    square(x).block_until_ready()  # compiled
    t0 = time.perf_counter()
    timeline.call(square, x)
    time.sleep(0.05)  # the host alone; the work finished long before
    wall = time.perf_counter() - t0
    busy = timeline.busy_seconds(since=t0)
    self.assertGreater(busy, 0.0)
    self.assertLess(busy, wall)

  def test_host_critical_share(self):
    m = overlap.host_critical(wall=2.0, busy=1.5, stalled=0.25)
    self.assertAlmostEqual(m["time/host_critical"], 0.75)
    self.assertAlmostEqual(m["time/host_fraction"], 0.375)
    self.assertEqual(overlap.host_critical(0.0, 0.0)["time/host_fraction"], 0.0)


if __name__ == "__main__":
  absltest.main()
