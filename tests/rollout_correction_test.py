"""Rollout correction: the sampler's log-probs kept with the episodes, the rollout/* gap metrics
and token-level truncated importance sampling (TIS) in the PPO and GRPO / LTE losses."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import models, sampling
from mar.episodes import GroupBatch
from mar.rl import grpo, losses, optim, ppo
from mar.rollout import continuous
from mar.rollout import spec as spec_lib
import testutil  # the shared demo model

TEMPERATURE = 0.7
BUDGET = 10


def tiny_model(dtype="float32"):
  config = models.QwenConfig.tiny("qwen2", vocab_size=64).replace(
      hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
      num_layers=2, dtype=dtype)
  return config, models.init_params(config, jax.random.key(0), std=0.5)


def sampled_episodes(config, params, n=6, rows=4):
  """Single-turn episodes of the continuous engine (left-padded prompts of 3..8 tokens)."""
  rng = np.random.default_rng(0)
  ids = [rng.integers(3, config.vocab_size, size=3 + i).tolist() for i in range(n)]
  p = max(map(len, ids))
  toks, mask = sampling.pad_prompts(ids, p, n)
  spec = continuous.EngineSpec(
      rollout=spec_lib.RolloutSpec(max_attempts=1, token_budget=BUDGET, cache_len=p + BUDGET,
                             sampling=sampling.SamplingParams(temperature=TEMPERATURE),
                             stop_ids=(1,), keep_stop_token=True),
      rows=rows, refill_rows=2, refill_wait=2)
  fb = np.zeros((1, 1), np.int32), np.zeros((1,), np.int32)
  fn = jax.jit(lambda prm, t, m: continuous.rollout(
      config, prm, spec, None, None, t, m, jnp.ones(n, jnp.int32), *fb, jax.random.key(3)))
  return jax.device_get(fn(params, toks, mask)[0])


def group_batch(ep, hinted=None, old_logp_hinted=None):
  """A GRPO batch straight from the engine's [Q, S] slots (prompt | response, contiguous)."""
  n, s = ep.tokens.shape
  return GroupBatch(tokens=ep.tokens, valid=ep.valid, action_mask=ep.action_mask,
                    sampler_logp=ep.logprobs,
                    advantages=np.linspace(-1, 1, n).astype(np.float32),
                    hinted=np.zeros(n, bool) if hinted is None else hinted,
                    old_logp_hinted=(np.zeros((n, s), np.float32) if old_logp_hinted is None
                                     else old_logp_hinted))


def grpo_learner(config, pack_len=0, tis_cap=0.0):
  hp = grpo.GRPOHparams(temperature=TEMPERATURE, logprob_chunk=8, tis_cap=tis_cap)
  return grpo.GRPOLearner(config, hp, optim.make_optimizer(1e-3, 10), response_len=BUDGET,
                          pack_len=pack_len)


class FormulaTest(absltest.TestCase):

  def test_weights_equal_the_truncated_ratio(self):
    rng = np.random.default_rng(1)
    old = rng.normal(-2, 1, (3, 7)).astype(np.float32)
    sampler = old + rng.normal(0, 1, (3, 7)).astype(np.float32)
    mask = rng.random((3, 7)) < 0.7
    w, m = losses.rollout_correction(old, sampler, mask, tis_cap=2.0)
    ratio = np.exp(old - sampler)
    np.testing.assert_allclose(np.asarray(w), np.where(mask, np.minimum(ratio, 2.0), 0.0),
                               rtol=1e-6)
    gap = np.abs(old - sampler)[mask]
    self.assertAlmostEqual(float(m["rollout/logp_gap_max"]), gap.max(), places=5)
    self.assertAlmostEqual(float(m["rollout/logp_gap_mean"]), gap.mean(), places=5)
    k3 = (ratio - 1 - np.log(ratio))[mask].mean()
    self.assertAlmostEqual(float(m["rollout/k3_kl"]), k3, places=5)
    self.assertAlmostEqual(float(m["rollout/tis_weight_mean"]),
                           np.minimum(ratio, 2.0)[mask].mean(), places=5)
    self.assertAlmostEqual(float(m["rollout/tis_clipped_frac"]), (ratio > 2.0)[mask].mean(),
                           places=6)
    w0, _ = losses.rollout_correction(old, sampler, mask, tis_cap=0.0)  # off: weight 1
    np.testing.assert_array_equal(np.asarray(w0), mask.astype(np.float32))

  def test_tis_scales_the_token_losses(self):
    """With TIS the GRPO loss is the weighted sum of the per-token clipped terms."""
    rng = np.random.default_rng(2)
    logp = rng.normal(-2, 0.3, (2, 5)).astype(np.float32)
    old = logp + 0.1
    sampler = old - rng.normal(0, 1, (2, 5)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    adv = np.asarray([1.0, -0.5], np.float32)
    loss, _ = losses.grpo_lte_loss(logp, old, None, adv, mask, sampler_logp=sampler,
                                   spec=losses.GroupLoss(tis_cap=2.0))
    per_token, _, _ = losses.ppo_clip_token_loss(logp, old, adv, mask)
    w = np.minimum(np.exp(old - sampler), 2.0)
    self.assertAlmostEqual(float(loss), float((np.asarray(per_token) * w).mean()), places=5)


  def test_ppo_actor_loss_takes_the_weights(self):
    rng = np.random.default_rng(3)
    logp = rng.normal(-2, 0.3, (2, 5)).astype(np.float32)
    old = logp - 0.05
    adv = rng.normal(0, 1, (2, 5)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    w = rng.uniform(0.5, 2.0, (2, 5)).astype(np.float32)
    loss, _ = losses.ppo_actor_loss(logp, old, adv, mask, kl_coef=0.0, token_weight=w)
    per_token, _, _ = losses.ppo_clip_token_loss(logp, old, adv, mask)
    self.assertAlmostEqual(float(loss), float((np.asarray(per_token) * w).mean()), places=5)


class GapTest(parameterized.TestCase):
  """In f32 the sampler's log-probs are the learner's pi_old up to rounding."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config, cls.params = tiny_model()
    cls.ep = sampled_episodes(cls.config, cls.params)

  @parameterized.parameters(0, -1)  # padded rows, packed rows
  def test_grpo_gap_in_f32(self, pack_len):
    learner = grpo_learner(self.config, pack_len)
    params = jax.tree.map(jnp.copy, self.params)
    _, _, m = learner.step(params, learner.optimizer.init(params), group_batch(self.ep))
    self.assertLessEqual(m["rollout/logp_gap_max"], 1e-4)
    self.assertGreater(m["rollout/logp_gap_max"], 0.0 - 1e-12)
    self.assertAlmostEqual(m["rollout/tis_weight_mean"], 1.0, places=4)

  def test_hinted_rows_compare_with_the_hinted_log_probs(self):
    """LTE's hinted samples were drawn after the hinted prompt: their pi_old is
    old_logp_hinted; here that is the sampler's prompt, so the gap stays small, and an
    offset in old_logp_hinted shows in the gap."""
    learner = grpo_learner(self.config)
    old = np.asarray(learner.logprobs(self.params, self.ep.tokens, self.ep.valid))
    hinted = np.arange(len(self.ep.tokens)) % 2 == 0
    for offset, low, high in ((0.0, 0.0, 1e-4), (0.5, 0.5 - 1e-4, 0.5 + 1e-4)):
      params = jax.tree.map(jnp.copy, self.params)
      batch = group_batch(self.ep, hinted, np.where(hinted[:, None], old + offset, 0.0))
      _, _, m = learner.step(params, learner.optimizer.init(params), batch)
      self.assertBetween(m["rollout/logp_gap_max"], low, high)

  @parameterized.parameters(0, -1)
  def test_ppo_gap_in_f32(self, pack_len):
    hp = ppo.PPOHparams(temperature=TEMPERATURE, logprob_chunk=8, kl_coef=0.0)
    opt = optim.make_optimizer(1e-3, 10)
    learner = ppo.PPOLearner(self.config, hp, opt, opt, pack_len=pack_len)
    critic = {"backbone": models.init_params(self.config, jax.random.key(1), std=0.2),
              "value_head": models.init_value_head(self.config, jax.random.key(2))}
    params = jax.tree.map(jnp.copy, self.params)
    out = learner.step(params, opt.init(params), critic, opt.init(critic), None, self.ep)
    self.assertLessEqual(out[4]["rollout/logp_gap_max"], 1e-4)
    self.assertIn("rollout/k3_kl", out[4])


class Bf16SamplingTest(absltest.TestCase):

  def test_bf16_sampler_shows_a_gap_and_tis_weights_where_it_is(self):
    """The demo model sampled with bf16 weights and compute, scored in f32: the gap is real
    and the TIS weights differ from 1 exactly where it is (and equal the formula)."""
    config, params = models.load_hf(testutil.shared_model(), dtype=jnp.float32)
    cfg16 = config.replace(dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ep = sampled_episodes(cfg16, params16)
    learner = grpo_learner(config, tis_cap=2.0)
    old = np.asarray(learner.logprobs(params, ep.tokens, ep.valid))
    mask = np.asarray(ep.action_mask)
    gap = np.abs(old - ep.logprobs)[mask]
    self.assertGreater(gap.max(), 1e-3)
    w, _ = losses.rollout_correction(old, ep.logprobs, mask, tis_cap=2.0)
    w = np.asarray(w)[mask]
    np.testing.assert_allclose(w, np.minimum(np.exp((old - ep.logprobs)[mask]), 2.0),
                               rtol=1e-5)
    self.assertTrue((np.abs(w - 1) > 1e-6)[gap > 1e-5].all())
    _, _, m = learner.step(jax.tree.map(jnp.copy, params), learner.optimizer.init(params),
                           group_batch(ep))
    self.assertGreater(m["rollout/logp_gap_max"], 1e-3)
    self.assertNotAlmostEqual(m["rollout/tis_weight_mean"], 1.0, places=4)


if __name__ == "__main__":
  absltest.main()
