"""PPO / value / KL / LTE losses and aggregations against numpy references."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar.rl import losses


def np_token_mean(x, m):
  return (x * m).sum() / m.sum()


def random_batch(seed, b=4, t=7):
  rng = np.random.default_rng(seed)
  logp = -rng.random((b, t)) * 3
  old = logp + rng.normal(scale=0.4, size=(b, t))
  adv = rng.normal(size=(b, t))
  mask = rng.random((b, t)) < 0.7
  mask[:, 0] = True
  return logp, old, adv, mask


class PpoClipTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # (log r, A, expected per-token loss)
      ("pos_adv_inside", math.log(1.1), 2.0, -1.1 * 2.0),
      ("pos_adv_above", math.log(1.5), 2.0, -1.2 * 2.0),
      ("pos_adv_below", math.log(0.5), 2.0, -0.5 * 2.0),  # unclipped is the min
      ("neg_adv_inside", math.log(0.9), -1.0, 0.9),
      ("neg_adv_below", math.log(0.5), -1.0, 0.8),
      ("neg_adv_above", math.log(1.5), -1.0, 1.5),  # unclipped is the min
  )
  def test_regions(self, log_r, a, want):
    loss, _ = losses.ppo_policy_loss(
        np.array([[log_r]]), np.zeros((1, 1)), np.array([[a]]), np.ones((1, 1), bool)
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)

  def test_asymmetric_clip_high(self):
    def one(log_r, a):
      x = lambda v: np.array([[v]])
      return losses.ppo_policy_loss(x(log_r), x(0.0), x(a), x(1.0), 0.2, 0.28)[0]

    np.testing.assert_allclose(one(math.log(1.5), 1.0), -1.28, rtol=1e-5)
    np.testing.assert_allclose(one(math.log(0.5), -1.0), 0.8, rtol=1e-5)
    np.testing.assert_allclose(one(math.log(1.25), -1.0), 1.25, rtol=1e-5)

  @parameterized.parameters((0.2, 0.2), (0.2, 0.28))
  def test_random_vs_numpy(self, lo, hi):
    logp, old, adv, mask = random_batch(0)
    r = np.exp(logp - old)
    per = -np.minimum(r * adv, np.clip(r, 1 - lo, 1 + hi) * adv)
    loss, metrics = losses.ppo_policy_loss(logp, old, adv, mask, lo, hi)
    np.testing.assert_allclose(loss, np_token_mean(per, mask), rtol=1e-5)
    clipped = (-np.clip(r, 1 - lo, 1 + hi) * adv) > (-r * adv)
    np.testing.assert_allclose(metrics["clipfrac"], np_token_mean(clipped, mask), rtol=1e-6)
    want_kl = np_token_mean(r - 1 - np.log(r), mask)
    np.testing.assert_allclose(metrics["approx_kl"], want_kl, rtol=1e-4)

  def test_per_sequence_advantages_broadcast(self):
    logp, old, _, mask = random_batch(1)
    a = np.array([1.0, -2.0, 0.5, 0.0])
    l1, _ = losses.ppo_policy_loss(logp, old, a, mask)
    l2, _ = losses.ppo_policy_loss(logp, old, np.repeat(a[:, None], 7, 1), mask)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)


class ValueLossTest(absltest.TestCase):

  def test_clip_vs_numpy(self):
    rng = np.random.default_rng(2)
    v, old, ret = rng.normal(size=(3, 3, 6))
    mask = rng.random((3, 6)) < 0.7
    mask[0, 0] = True
    v_clip = old + np.clip(v - old, -0.2, 0.2)
    per = 0.5 * np.maximum((v_clip - ret) ** 2, (v - ret) ** 2)
    loss, m = losses.value_loss(v, old, ret, mask, clip=0.2)
    np.testing.assert_allclose(loss, np_token_mean(per, mask), rtol=1e-5)
    want_cf = np_token_mean((v_clip - ret) ** 2 > (v - ret) ** 2, mask)
    np.testing.assert_allclose(m["vf_clipfrac"], want_cf, rtol=1e-6)

  def test_hand_case(self):
    # V moved 0.5 from old onto R: the clipped value (0.7) has the larger error.
    x = lambda v: np.array([[v]])
    loss, _ = losses.value_loss(x(1.0), x(0.5), x(1.0), x(1.0))
    np.testing.assert_allclose(loss, 0.5 * (0.7 - 1.0) ** 2, rtol=1e-6)


class KlTest(parameterized.TestCase):

  @parameterized.parameters("k1", "k2", "k3")
  def test_estimators_with_clamp(self, name):
    logp = np.array([-1.0, -2.0, -30.0, -0.1, 5.0])
    ref = np.array([-1.5, -1.0, -0.5, -20.0, -10.0])
    d = np.clip(logp - ref, -10.0, 10.0)
    want = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}[name]
    np.testing.assert_allclose(losses.kl_penalty(name, logp, ref, clamp=10.0), want, rtol=1e-5)
    self.assertTrue(np.all(np.isfinite(losses.kl_penalty(name, logp, ref, clamp=10.0))))

  def test_no_clamp(self):
    d = np.array([12.0])
    np.testing.assert_allclose(losses.kl_penalty("k1", d, np.zeros(1), clamp=None), d)


class AggregateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    self.x = rng.normal(size=(4, 6))
    self.m = rng.random((4, 6)) < 0.6
    self.m[:, 0] = True
    self.m[3] = False  # an empty row

  def test_token_mean(self):
    got = losses.aggregate("token_mean", self.x, self.m)
    np.testing.assert_allclose(got, np_token_mean(self.x, self.m), rtol=1e-6)

  def test_seq_mean_token_mean(self):
    rows = [self.x[i][self.m[i]].mean() for i in range(4) if self.m[i].any()]
    got = losses.aggregate("seq_mean_token_mean", self.x, self.m)
    np.testing.assert_allclose(got, np.mean(rows), rtol=1e-6)

  def test_seq_mean_token_sum_norm(self):
    want = (self.x * self.m).sum() / (4 * 10)
    got = losses.aggregate("seq_mean_token_sum_norm", self.x, self.m, max_len=10)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = losses.aggregate("seq_mean_token_sum_norm", self.x, self.m)  # max_len defaults to T
    np.testing.assert_allclose(got, (self.x * self.m).sum() / 24, rtol=1e-6)

  def test_group_norm_makes_micro_batches_exact(self):
    # Two micro-batches with different token counts: averaging their group-normed token
    # means equals the token mean of the whole batch.
    total = self.m.sum()
    halves = [
        losses.aggregate("token_mean", self.x[s], self.m[s], group_norm=total / 2)
        for s in (slice(0, 2), slice(2, 4))
    ]
    np.testing.assert_allclose(np.mean(halves), np_token_mean(self.x, self.m), rtol=1e-6)

  def test_unknown(self):
    with self.assertRaisesRegex(ValueError, "unknown aggregation"):
      losses.aggregate("mean", self.x, self.m)


class LteShapingTest(absltest.TestCase):

  def test_value_and_gradient(self):
    logp, old_h, adv, mask = random_batch(4)
    gamma = 0.1
    r_hat = np.exp(logp - old_h)
    f = r_hat / (r_hat + gamma)
    loss, metrics = losses.lte_offpolicy_loss(logp, old_h, adv, mask, gamma)
    np.testing.assert_allclose(loss, np_token_mean(-f * adv, mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["shaping_weight"], np_token_mean(f, mask), rtol=1e-5)

    loss_of = lambda lp: losses.lte_offpolicy_loss(lp, old_h, adv, mask, gamma)[0]
    grad = jax.grad(loss_of)(jnp.asarray(logp, jnp.float32))
    # d/dlogp of -f(r) A / N = -(gamma / (r + gamma)^2) r A / N on mask tokens.
    want = -(gamma / (r_hat + gamma) ** 2) * r_hat * adv / mask.sum() * mask
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)

  def test_no_clip_for_large_ratio(self):
    # r_hat = 100: f = 100 / 100.1, no clip at 1 + eps.
    x = lambda v: np.array([[v]])
    loss, _ = losses.lte_offpolicy_loss(x(math.log(100.0)), x(0.0), x(1.0), x(1.0))
    np.testing.assert_allclose(loss, -100.0 / 100.1, rtol=1e-6)


class MaskGradientTest(parameterized.TestCase):

  @parameterized.parameters("ppo", "lte", "actor", "mixed")
  def test_masked_tokens_get_zero_gradient(self, which):
    logp, old, adv, mask = random_batch(5)
    # garbage on masked tokens must not leak, not even NaN
    old = np.where(mask, old, np.nan)
    adv = np.where(mask, adv, np.inf)
    ref = np.where(mask, logp - 0.3, np.nan)
    hinted = np.array([True, False, True, False])

    def f(lp):
      if which == "ppo":
        return losses.ppo_policy_loss(lp, old, adv, mask)[0]
      if which == "lte":
        return losses.lte_offpolicy_loss(lp, old, adv, mask)[0]
      if which == "actor":
        return losses.ppo_actor_loss(lp, old, adv, mask, ref, kl_coef=0.1)[0]
      return losses.grpo_lte_loss(lp, old, old, adv, mask, hinted, ref_logp=ref,
                                  spec=losses.GroupLoss(kl_coef=0.1))[0]

    lp = jnp.asarray(np.where(mask, logp, 1e4), jnp.float32)
    loss, grad = jax.value_and_grad(f)(lp)
    grad = np.asarray(grad)
    self.assertTrue(np.isfinite(loss))
    self.assertTrue(np.all(grad[~mask] == 0.0))
    self.assertTrue(np.all(np.isfinite(grad)))
    self.assertGreater(np.abs(grad[mask]).sum(), 0.0)

  def test_value_loss_masked_gradient(self):
    rng = np.random.default_rng(6)
    v, old, ret = rng.normal(size=(3, 2, 5))
    mask = rng.random((2, 5)) < 0.5
    mask[0, 0] = True
    ret = np.where(mask, ret, np.nan)
    g = np.asarray(jax.grad(lambda x: losses.value_loss(x, old, ret, mask)[0])(jnp.asarray(v)))
    self.assertTrue(np.all(g[~mask] == 0.0))


class GrpoLteLossTest(absltest.TestCase):

  def test_mix_matches_numpy(self):
    logp, old, adv, mask = random_batch(7)
    old_h = logp + np.random.default_rng(8).normal(scale=1.0, size=logp.shape)
    hinted = np.array([False, True, False, True])
    r = np.exp(logp - old)
    clip = -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv)
    rh = np.exp(logp - old_h)
    shape = -rh / (rh + 0.1) * adv
    per = np.where(hinted[:, None], shape, clip)
    loss, metrics = losses.grpo_lte_loss(logp, old, old_h, adv, mask, hinted)
    np.testing.assert_allclose(loss, np_token_mean(per, mask), rtol=1e-5)
    on = mask & ~hinted[:, None]
    hm = mask & hinted[:, None]
    np.testing.assert_allclose(metrics["hinted_token_frac"], hm.sum() / mask.sum(), rtol=1e-6)

    sep, _ = losses.grpo_lte_loss(logp, old, old_h, adv, mask, hinted,
                                  spec=losses.GroupLoss(separate_norm=True))
    np.testing.assert_allclose(sep, np_token_mean(clip, on) + np_token_mean(shape, hm), rtol=1e-5)

  def test_plain_grpo_equals_ppo_and_optional_terms(self):
    logp, old, adv, mask = random_batch(9)
    l_grpo, _ = losses.grpo_lte_loss(logp, old, None, adv, mask, None,
                                     spec=losses.GroupLoss(clip_high=0.28))
    l_ppo, _ = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    np.testing.assert_allclose(l_grpo, l_ppo, rtol=1e-6)

    ref = logp - 0.2
    ent = np.random.default_rng(10).random(logp.shape)
    loss, m = losses.grpo_lte_loss(
        logp, old, None, adv, mask, None, ref_logp=ref, entropy=ent,
        spec=losses.GroupLoss(clip_high=0.28, kl_coef=0.05, kl_name="k2", entropy_coef=0.001),
    )  # fmt: skip
    k2 = 0.5 * 0.2**2  # d = 0.2 everywhere
    want = float(l_grpo) + 0.05 * k2 - 0.001 * np_token_mean(ent, mask)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    self.assertIn("kl", m)
    self.assertIn("entropy", m)
    with self.assertRaisesRegex(ValueError, "ref_logp"):
      losses.grpo_lte_loss(logp, old, None, adv, mask, None,
                           spec=losses.GroupLoss(kl_coef=0.1))


class ActorLossTest(absltest.TestCase):

  def test_ppo_plus_k3(self):
    logp, old, adv, mask = random_batch(11)
    ref = logp + np.random.default_rng(12).normal(scale=0.5, size=logp.shape)
    r = np.exp(logp - old)
    pg = np_token_mean(-np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv), mask)
    d = logp - ref
    kl = np_token_mean(np.exp(-d) - 1 + d, mask)
    loss, m = losses.ppo_actor_loss(logp, old, adv, mask, ref, kl_coef=0.01)
    np.testing.assert_allclose(loss, pg + 0.01 * kl, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)


class EntropyTest(absltest.TestCase):

  def test_stable_entropy(self):
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(2, 3, 11)) * 5
    logits[0, 0, 0] = 1e4  # near one-hot, naive softmax would overflow
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    want = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    got = losses.entropy_from_logits(logits)
    self.assertEqual(got.shape, (2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
