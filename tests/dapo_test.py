"""DAPO: dynamic sampling inside the continuous engine's queue, overlong reward shaping and
truncation masking, and resumed == uninterrupted with a data position per step."""

import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import ml_collections
import numpy as np
import pytest

from mar import algorithms
from mar import setup, train
from mar.algorithms import refined
from mar.rl import advantages
from mar.rollout import schedule
import testutil

G = 4


def scripted_groups(verdicts, rows, needed, keep_none_pass=False):
  """The engine's scheduler on scripted lengths: groups of G, closing at `needed`."""
  q = verdicts.shape[0]
  lengths = 3 + (np.arange(q) * 7) % 11  # uneven: groups finish out of order
  spec = schedule.ScheduleSpec(max_attempts=1, token_budget=16, refill_rows=2, refill_wait=2,
                               verify_every=2, group_size=G, groups_needed=needed,
                               keep_none_pass=keep_none_pass)
  return schedule.scripted_counts(spec, rows, lengths[:, None], verdicts[:, None],
                                  np.ones(q, np.int32))


def chosen_groups(out, needed, keep_none_pass=False):
  done, informative = schedule.group_verdicts(out["attempts_used"] > 0, out["correct"], G,
                                              keep_none_pass)
  closed, cutoff = schedule.decided_prefix(done, informative, needed)
  return bool(closed), list(np.flatnonzero(informative[:int(cutoff)])[:needed])


class EngineGroupsTest(parameterized.TestCase):
  # 8 groups of 4: all-fail, mixed, all-pass, mixed, all-fail, mixed, mixed, all-pass.
  HITS = (0, 2, 4, 1, 0, 3, 2, 4)

  def verdicts(self):
    return np.asarray([[j < h for j in range(G)] for h in self.HITS]).reshape(-1)

  @parameterized.parameters(2, 4, 8, 12)
  def test_first_informative_groups_with_any_rows(self, rows):
    """The decided groups are the first `needed` informative ones in queue order, for any B,
    and the queue closes before running all of it."""
    out = scripted_groups(self.verdicts(), rows, needed=3)
    closed, chosen = chosen_groups(out, 3)
    self.assertTrue(closed)
    self.assertEqual(chosen, [1, 3, 5])
    self.assertTrue(out["closed"])
    # The groups after the decided prefix never all ran (the queue closed).
    self.assertLess(int((out["attempts_used"] > 0).sum()), len(self.HITS) * G)

  def test_bound_hit_runs_the_whole_queue(self):
    out = scripted_groups(self.verdicts(), 4, needed=5)  # only 4 informative groups exist
    closed, chosen = chosen_groups(out, 5)
    self.assertFalse(closed)
    self.assertFalse(out["closed"])
    self.assertEqual(chosen, [1, 3, 5, 6])
    self.assertEqual(int((out["attempts_used"] > 0).sum()), len(self.HITS) * G)

  def test_lte_keeps_none_pass_groups(self):
    out = scripted_groups(self.verdicts(), 4, needed=3, keep_none_pass=True)
    self.assertEqual(chosen_groups(out, 3, keep_none_pass=True)[1], [0, 1, 3])


class OverlongTest(absltest.TestCase):

  def test_penalty_table(self):
    """DAPO eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, linear to -1 at 10."""
    got = advantages.overlong_penalty(np.asarray([0, 6, 7, 8, 10]), 10, 4)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -1.0])
    np.testing.assert_allclose(advantages.overlong_penalty(np.asarray([9]), 10, 4, 0.5),
                               [-0.375])
    np.testing.assert_array_equal(advantages.overlong_penalty(np.asarray([10]), 10, 0), [0])
    with self.assertRaisesRegex(ValueError, "overlong_buffer"):
      advantages.overlong_penalty(np.asarray([1]), 10, 11)

  def test_dapo_rewards_shape_mask_and_drop(self):
    config = ml_collections.ConfigDict(dict(
        rollout=dict(token_budget=10),
        grpo=dict(overlong_buffer=4, overlong_penalty=1.0, mask_truncated=True,
                  dynamic_sampling=True)))
    lengths = np.asarray([2, 8, 10, 4, 3, 3])  # groups of 2: [2, 8], [10, 4], [3, 3]
    action = np.arange(12)[None] < lengths[:, None]
    batch = {"action_mask": action, "truncated": lengths == 10}
    rewards = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    shaped, m = refined.dapo_rewards(config, batch, rewards)
    np.testing.assert_allclose(shaped, [[1.0, -0.5], [-1.0, 1.0], [1.0, 1.0]])
    self.assertNotIn("truncated", batch)
    keep = batch["action_mask"].any(1)
    # Member 2 is truncated (masked); group 2 has equal rewards (dropped from the loss).
    np.testing.assert_array_equal(keep, [True, True, False, True, False, False])
    self.assertEqual(m["dapo/zero_variance_groups_trained"], 0.0)
    self.assertEqual(m["dapo/truncated_masked"], 1.0)


class _LengthVerifier:

  def verify(self, texts, golds):
    return [len(t) >= 10 for t in texts]  # "\\boxed{N}" wrong, "\\boxed{NN}" right


def dapo_config(**over):
  # Attempts end at their first box: the few-step demo model rarely ends by EOS in budget.
  c = testutil.tiny_config("grpo", **{"grpo.dynamic_sampling": True,
                                        "grpo.max_oversample": 2, "rollout.stop_at_box": True,
                                        **over})
  c.method = "grpo"
  return c


class TrainerDynamicSamplingTest(absltest.TestCase):
  """The trainer's step with dynamic sampling on the demo task."""

  def _step(self, rows):
    config = dapo_config(**{"rollout.batch_size": rows})
    run = setup.build_run(config, tempfile.mkdtemp())
    state = algorithms.family(config).init_state(config, run)
    idx = train.data_indices(config, len(run.train_data), 0, algorithms.family(config).examples_per_step(config))
    self.assertLen(idx, 3 * config.rollout.prompts_per_step)
    seen = {}
    sample = run.runner.run_groups

    def spy(*args, **kw):
      out = sample(*args, **kw)
      seen["host"] = out[0]
      return out

    run.runner.run_groups = spy
    # The demo model after a few SFT steps fails most questions: grade by the text's length
    # instead (a function of the tokens alone, so still schedule-independent) to get mixed
    # groups.
    run.runner.verify_fn.verifier = _LengthVerifier()
    _, m = algorithms.group.iteration(config, run, state, [run.train_data[i] for i in idx], 0)
    run.close()
    return m, seen["host"]

  def test_never_trains_zero_variance_groups_and_is_independent_of_rows(self):
    m4, host4 = self._step(4)
    m8, host8 = self._step(8)
    for m in (m4, m8):
      self.assertEqual(m["dapo/zero_variance_groups_trained"], 0.0)
      if not m["dapo/oversample_exhausted"]:
        self.assertEqual(m["dapo/informative_groups"], 2.0)  # prompts_per_step
    for k in ("dapo/groups_consumed", "dapo/informative_groups", "dapo/oversample_exhausted",
              "reward_mean", "some_pass"):
      self.assertEqual(m4[k], m8[k], k)
    # Every episode of the decided prefix has the same tokens with 4 or 8 rows.
    n = int(m4["dapo/groups_consumed"]) * G
    self.assertEqual(host4.responses[:n], host8.responses[:n])
    np.testing.assert_array_equal(host4.correct[:n], host8.correct[:n])


@pytest.mark.slow
class ResumeTest(absltest.TestCase):

  def test_resumed_run_equals_uninterrupted(self):
    """Steps use a variable number of data positions: the checkpoint carries the position."""
    # Seed 1: its two steps use 4 and 3 positions of the data order (seed 0 uses 2 and 2, which
    # would not tell a checkpointed position from step x prompts_per_step).
    over = {"train.num_steps": 2, "eval.every_steps": 0, "seed": 1}
    whole, part = tempfile.mkdtemp(), tempfile.mkdtemp()
    build = setup.build_run

    def with_length_verifier(*args, **kw):  # mixed groups (see TrainerDynamicSamplingTest)
      run = build(*args, **kw)
      run.runner.verify_fn.verifier = _LengthVerifier()
      return run

    with mock.patch.object(setup, "build_run", with_length_verifier):
      train.train(dapo_config(**over), whole)
      train.train(dapo_config(**{**over, "train.num_steps": 1}), part)
      train.train(dapo_config(**over), part)
    rows = lambda d: [testutil.replayable_metrics(json.loads(line))
                      for line in open(os.path.join(d, "metrics.jsonl"))]
    a, b = rows(whole), rows(part)
    self.assertLen(a, 2)
    self.assertEqual(a, b)
    # A step used neither prompts_per_step nor all its drawn examples: the position matters.
    consumed = {r["dapo/groups_consumed"] for r in a}
    self.assertNotIn(consumed, ({2.0}, {6.0}))


if __name__ == "__main__":
  absltest.main()
