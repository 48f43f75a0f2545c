"""GAE over multi-attempt sequences and group-relative estimators vs numpy references."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from mar.rl import advantages as adv_lib


def gae_reference(rewards, values, action, feedback, gamma, lam):
  """Python-loop GAE over the action tokens with the feedback spans removed (reference)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    acts = [j for j in range(t) if action[i, j]]
    running = 0.0
    for k in reversed(range(len(acts))):
      j = acts[k]
      if k + 1 < len(acts):
        nxt = acts[k + 1]
        next_value = values[i, nxt]
      else:
        next_value, running = 0.0, 0.0
      running = rewards[i, j] + gamma * next_value - values[i, j] + gamma * lam * running
      adv[i, j] = running
  returns = np.where(action, adv + values, 0.0)
  return adv, returns


def random_episodes(rng, batch=5, length=48):
  """Left-padded prompt, attempts separated by feedback spans, right padding."""
  action = np.zeros((batch, length), bool)
  feedback = np.zeros((batch, length), bool)
  rewards = np.zeros((batch, length))
  for i in range(batch):
    pos = rng.integers(2, 8)  # left padding + prompt
    end = length - rng.integers(0, 6)  # right padding
    last = None
    for attempt in range(rng.integers(1, 5)):
      if attempt:
        span = rng.integers(1, 4)
        if pos + span >= end:
          break
        feedback[i, pos : pos + span] = True
        pos += span
      n = rng.integers(1, 7)
      if pos + n > end:
        break
      action[i, pos : pos + n] = True
      last = pos + n - 1
      pos += n
    if last is None:  # at least one action token
      action[i, pos] = True
      last = pos
    rewards[i, last] = rng.choice([1.0, -0.5, -1.0])
  values = rng.normal(size=(batch, length))
  return rewards, values, action, feedback


class GaeTest(parameterized.TestCase):

  @parameterized.parameters((1.0, 0.99), (0.9, 0.95), (1.0, 1.0))
  def test_matches_reference(self, gamma, lam):
    rng = np.random.default_rng(int(gamma * 100 + lam * 1000))
    for _ in range(3):
      rewards, values, action, feedback = random_episodes(rng)
      ref_adv, ref_ret = gae_reference(rewards, values, action, feedback, gamma, lam)
      adv, ret = jax.jit(adv_lib.gae)(rewards, values, action, feedback, gamma, lam)
      np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
      self.assertTrue(np.all(np.asarray(adv)[~action] == 0))
      self.assertTrue(np.all(np.asarray(ret)[~action] == 0))

  def test_issue_repro_lambda_applies_across_feedback(self):
    # The audit's repro: the reference gives 0.99 at t=0 (lambda applies once per crossing).
    adv, _ = adv_lib.gae(np.array([[0.0, 0, 0, 1]]), np.zeros((1, 4)),
                         np.array([[1, 0, 0, 1]], bool), np.array([[0, 1, 1, 0]], bool),
                         1.0, 0.99)
    np.testing.assert_allclose(adv, [[0.99, 0, 0, 1.0]], rtol=1e-6)

  def test_feedback_crossing_uses_gamma_and_lambda(self):
    # a a F F a : A_1 = r_1 + g V_4 - V_1 + g l A_4 (the span's own values are never read).
    action = np.array([[1, 1, 0, 0, 1]], bool)
    feedback = np.array([[0, 0, 1, 1, 0]], bool)
    rewards = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = np.array([[0.1, 0.2, 9.0, 9.0, 0.5]])
    gamma, lam = 0.5, 0.5
    adv, _ = adv_lib.gae(rewards, values, action, feedback, gamma, lam)
    a4 = 1.0 - 0.5
    a1 = 0.0 + gamma * 0.5 - 0.2 + gamma * lam * a4
    a0 = 0.0 + gamma * 0.2 - 0.1 + gamma * lam * a1
    np.testing.assert_allclose(adv, [[a0, a1, 0, 0, a4]], rtol=1e-6)


class NormalizeTest(absltest.TestCase):

  def test_whole_batch_population_std(self):
    rng = np.random.default_rng(0)
    adv = rng.normal(size=(4, 9)) * 3 + 1
    mask = rng.random((4, 9)) < 0.6
    out = np.asarray(adv_lib.normalize_advantages(adv, mask))
    sel = adv[mask]
    np.testing.assert_allclose(out[mask], (sel - sel.mean()) / sel.std(), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(out[~mask] == 0))

  def test_std_floor(self):
    adv = np.full((2, 3), 5.0)
    out = adv_lib.normalize_advantages(adv, np.ones((2, 3)), eps=1e-8)
    np.testing.assert_array_equal(out, np.zeros((2, 3)))

  def test_variance_not_std_is_clamped(self):
    # The audit's repro: equal advantages whose float32 variance is tiny but nonzero must map
    # to ~0 (the reference clamps the variance at 1e-8), not to +-1 as a std clamp gives.
    out = np.asarray(adv_lib.normalize_advantages(np.full((1, 1000), 0.1), np.ones((1, 1000))))
    self.assertLess(np.abs(out).max(), 1e-2)


class GroupEstimatorTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.rewards = rng.integers(0, 2, size=(6, 8)).astype(np.float32)
    self.rewards[0] = 0.0  # constant group
    self.rewards[1] = rng.normal(size=8)

  def test_grpo_unbiased_std(self):
    r = self.rewards
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv_lib.group_advantages("grpo", r), want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters("grpo_no_std", "drgrpo")
  def test_mean_only(self, name):
    r = self.rewards
    got = adv_lib.group_advantages(name, r)
    np.testing.assert_allclose(got, r - r.mean(1, keepdims=True), atol=1e-6)

  def test_rloo(self):
    r = self.rewards
    p, g = r.shape
    want = np.zeros_like(r)
    for i in range(p):
      for j in range(g):
        want[i, j] = r[i, j] - np.mean(np.delete(r[i], j))
    np.testing.assert_allclose(adv_lib.group_advantages("rloo", r), want, rtol=1e-5, atol=1e-6)

  def test_registry_errors(self):
    with self.assertRaisesRegex(ValueError, "unknown estimator"):
      adv_lib.group_advantages("nope", self.rewards)
    with self.assertRaisesRegex(ValueError, "G >= 2"):
      adv_lib.group_advantages("grpo", np.zeros((3, 1)))


if __name__ == "__main__":
  absltest.main()
