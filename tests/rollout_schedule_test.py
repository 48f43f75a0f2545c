"""The continuous scheduler's step counts on issue 15's workloads (bench/rollout.py --scripted)."""

from absl.testing import absltest
import numpy as np

from bench import rollout as bench_rollout
from mar.rollout import schedule


class ScriptedCountsTest(absltest.TestCase):

  def test_issue_workloads_near_ideal_and_far_below_static(self):
    out = bench_rollout.scripted(rows=256, seed=0)
    for name, need in (("grpo", 2.5), ("multi_attempt", 6.0)):
      r = out[name]
      self.assertEqual((r["rows"], r["sequences"]), (256, 1024))
      self.assertLessEqual(r["decode_steps"], 1.15 * r["ideal_steps"], name)
      self.assertGreaterEqual(r["static_steps"], need * r["decode_steps"], name)
      self.assertEqual(r["prefill_rows"], 1024)
      # Every step but the tail keeps the rows busy: tokens fill most of rows x steps.
      self.assertGreater(r["tokens"], 0.4 * r["rows"] * r["decode_steps"])

  def test_outcomes_follow_the_episode_rules(self):
    w = bench_rollout.multi_attempt_workload(seed=3, n=96, budget=900)
    spec = schedule.ScheduleSpec(max_attempts=5, token_budget=900, refill_rows=4,
                                 refill_wait=3, verify_every=5)
    got = schedule.scripted_counts(spec, 16, w["lengths"], w["verdicts"], w["n_attempts"],
                                   feedback_len=7)
    attempts = bench_rollout.episode_attempts(w)
    np.testing.assert_array_equal(got["attempts_used"], [len(a) for a in attempts])
    correct = [bool(w["verdicts"][q, len(a) - 1]) for q, a in enumerate(attempts)]
    np.testing.assert_array_equal(got["correct"], correct)
    truncated = [not c and sum(a) >= 900 for c, a in zip(correct, attempts)]
    np.testing.assert_array_equal(got["truncated"], truncated)
    self.assertTrue(any(truncated) and not all(correct))
    self.assertEqual(got["sampled"], sum(map(sum, attempts)))
    # Feedback turns are fed through the decode steps: busy = sampled + fed.
    fed = 7 * sum(len(a) - 1 for a in attempts)
    self.assertEqual(got["busy_row_steps"], got["sampled"] + fed)

  def test_rows_equal_to_queue_never_refill(self):
    w = bench_rollout.grpo_workload(seed=1, n=32, cap=300)
    spec = schedule.ScheduleSpec(max_attempts=1, token_budget=300, refill_rows=4,
                                 deferred=True)
    got = schedule.scripted_counts(spec, 32, w["lengths"], w["verdicts"], w["n_attempts"])
    self.assertEqual(got["prefill_calls"], 1)
    self.assertEqual(got["decode_steps"], int(w["lengths"].max()))


if __name__ == "__main__":
  absltest.main()
