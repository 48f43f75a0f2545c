"""Every method's step is consistent with itself (issue 23): the sampler's log-probs are the
learner's pi_old, the first mini-batch is on-policy, every reward is its decoded text's
verdict, and the metrics that say so are in each run's metrics.jsonl.

Each miniature arm (`configs/miniature.py`, `,tiny`) trains two steps in process on one
warm start, with the rollout's outputs captured on their way to the learner.
"""

import dataclasses
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import testutil

from configs import miniature
from mar import metrics as metrics_lib
from mar import models
from mar import train
from mar import verify
from mar.algorithms import group
from mar.episodes import episode_reward
from mar.models import model as qwen
from mar.rl import optim, ppo
from mar.rollout.runner import RolloutRunner

# The keys, every step of every method; PPO's entropy on top.
KEYS = ("train/first_minibatch_approx_kl", "rollout/logp_gap_max", "rollout/logp_gap_mean")
PPO_KEYS = KEYS + ("train/entropy",)
GAP_TOL = 1e-4  # f32 sampler vs f32 learner: rounding only
KL_TOL = 1e-8

# ,tiny's 4 SFT steps never close a box; 60 make boxed, right and wrong answers (cached
# under $MAR_CACHE like any warm start, shared by every arm here).
WARM_START = dict(sft_steps=60, sft_batch=32)


def arm_config(arm: str, **overrides):
  c = miniature.get_config(f"{arm},tiny")
  c.model.demo.update(WARM_START)
  c.eval.update(dict(at_start=False, at_end=False, every_steps=0))
  c.checkpoint.update(dict(every_steps=c.train.num_steps, async_save=False))
  if arm in miniature.GROUP_ARMS:
    # Two mini-batches: pi_old is then its own forward (one mini-batch reuses the update's).
    c.grpo.mini_batches = 2
  return testutil.apply_overrides(c, overrides)


def train_arm(arm: str, **overrides):
  """(metrics.jsonl rows, [(tokenizer, answers, rollout output)] of every rollout).

  Group arms that re-sample (GRPO + extra, LTE) have every re-sampled member counted
  correct on its way to the refinement, so rescued members enter the learner's batch
  every step (their own verdicts are captured before)."""
  seen = []
  run, run_host, resample = RolloutRunner.run, RolloutRunner.run_host, group._resample

  def capture(fn):
    def wrapped(self, params, prompts, answers, *args, **kwargs):
      out = fn(self, params, prompts, answers, *args, **kwargs)
      seen.append((self.tok, list(answers), jax.device_get(out)))
      return out
    return wrapped

  def rescue_all(*args, **kwargs):
    extra, users, hint_metrics = resample(*args, **kwargs)
    if extra is not None:
      extra = dataclasses.replace(extra, correct=np.ones_like(extra.correct))
    return extra, users, hint_metrics

  work = tempfile.mkdtemp()
  with mock.patch.object(RolloutRunner, "run", capture(run)), \
       mock.patch.object(RolloutRunner, "run_host", capture(run_host)), \
       mock.patch.object(group, "_resample", rescue_all):
    train.train(arm_config(arm, **overrides), work)
  return metrics_lib.read_jsonl(os.path.join(work, "metrics.jsonl")), seen


def verdict(text: str, gold: str) -> tuple[bool, bool]:
  """(correct, boxed) of one attempt's text, in process (the runs use the worker pool)."""
  boxed = verify.extract_boxed(text) is not None
  answer = verify.extract_answer(text)
  return boxed and answer is not None and verify.answers_match(answer, gold), boxed


class ArmsTest(parameterized.TestCase):

  def assert_consistent(self, rows, keys, steps=2):
    self.assertLen(rows, steps)
    for row in rows:
      for k in keys:
        self.assertIn(k, row)
        self.assertTrue(np.isfinite(row[k]), (k, row[k]))
      self.assertLessEqual(row["rollout/logp_gap_max"], GAP_TOL)
      self.assertLessEqual(row["rollout/logp_gap_mean"], row["rollout/logp_gap_max"])
      self.assertLess(row["train/first_minibatch_approx_kl"], KL_TOL)

  # Packed (train.pack_len=-1) and padded (0) learner batches; two micro-batches in one case.
  @parameterized.named_parameters(
      ("multi_attempt_packed_micro", "multi_attempt", -1, 2),
      ("multi_attempt_padded", "multi_attempt", 0, 1),
      ("single_turn_packed", "single_turn", -1, 1))
  def test_ppo_arm(self, arm, pack_len, micro):
    rows, seen = train_arm(arm, **{"train.pack_len": pack_len, "ppo.micro_batches": micro})
    self.assert_consistent(rows, PPO_KEYS)
    for row in rows:  # pi_old's entropy on the action tokens: within (0, log V]
      self.assertBetween(row["train/entropy"], 1e-3, np.log(512))
    # Every attempt's verdict and every episode's reward, from its decoded tokens.
    boxed_total = correct_total = 0
    for tok, answers, ep in seen:
      self.assertLen(answers, len(ep.reward))
      for b, gold in enumerate(answers):
        flags = []
        for t in range(ep.correct_turn.shape[0]):
          ids = ep.tokens[b][ep.attempt_id[b] == t + 1]
          made = bool(ep.attempted_turn[t, b])
          self.assertEqual(made, len(ids) > 0, (b, t))
          correct, boxed = verdict(tok.decode(ids.tolist()), gold) if made else (False, False)
          self.assertEqual(bool(ep.correct_turn[t, b]), correct, (b, t, tok.decode(ids.tolist())))
          self.assertEqual(bool(ep.boxed_turn[t, b]), boxed, (b, t))
          flags.append((correct, boxed))
        any_correct, any_boxed = (any(f[i] for f in flags) for i in (0, 1))
        self.assertEqual(float(ep.reward[b]), float(episode_reward(any_correct, any_boxed)))
        boxed_total += any_boxed
        correct_total += any_correct
    self.assertLen(seen, 2)
    # The check saw right and wrong boxes, not only -1 episodes.
    self.assertGreater(boxed_total, correct_total)
    self.assertGreater(correct_total, 0)

  @parameterized.named_parameters(
      ("grpo_packed", "grpo", -1, 1), ("grpo_extra_packed", "grpo_extra", -1, 1),
      ("lte_packed", "lte", -1, 1), ("lte_padded_micro", "lte", 0, 2))
  def test_group_arm(self, arm, pack_len, micro):
    rows, seen = train_arm(arm, **{"train.pack_len": pack_len, "grpo.micro_batches": micro})
    self.assert_consistent(rows, KEYS)
    resampled = sum(row["none_pass"] > 0 for row in rows) if arm != "grpo" else 0
    if arm != "grpo":  # rescued members are in the batch: LTE's hinted ones compare with
      # their old log-probs under the hinted prompt they were sampled after
      self.assertGreater(sum(row["lte/num_replaced"] for row in rows), 0)
      self.assertEqual(any(row["hinted_token_frac"] > 0 for row in rows), arm == "lte")
    boxed_total = correct_total = 0
    for tok, answers, host in seen:
      self.assertLen(answers, len(host.responses))
      for i, gold in enumerate(answers):
        text = tok.decode(host.responses[i])
        self.assertEqual(text, host.texts[i])
        correct, boxed = verdict(text, gold)
        # Run to EOS: a response the budget cut is wrong.
        self.assertEqual(bool(host.correct[i]), correct and not host.truncated[i], (i, text))
        self.assertEqual(float(host.reward[i]),
                         float(episode_reward(host.correct[i], boxed)), (i, text))
        boxed_total += boxed
        correct_total += bool(host.correct[i])
    self.assertLen(seen, 2 + resampled)
    self.assertGreater(boxed_total, correct_total)
    self.assertGreater(correct_total, 0)


class EntropyTest(absltest.TestCase):

  def test_ppo_entropy_is_pi_old_on_action_tokens_packed_or_not(self):
    """train/entropy is the mean over action tokens of pi_old's entropy (at the sampling
    temperature), computed from the full softmax here; packed rows give the same."""
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.5)
    critic = {"backbone": params, "value_head": models.init_value_head(config, jax.random.key(1))}
    ep = testutil.episodes()
    hp = ppo.PPOHparams(temperature=0.7, logprob_chunk=8, kl_coef=0.0)
    h = qwen.hidden_states(config, params, jnp.asarray(ep.tokens), None,
                           attention_mask=jnp.asarray(ep.valid))
    logits = np.asarray(qwen.logits_from_hidden(config, params, h), np.float64) / 0.7
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ent = -(np.exp(logp) * logp).sum(-1)  # [B, S]: the distribution predicting slot s + 1
    action = np.asarray(ep.action_mask)
    want = ent[:, :-1][action[:, 1:]].mean()
    got = []
    for pack_len in (0, -1):
      opt = optim.make_optimizer(1e-3, 10)
      learner = ppo.PPOLearner(config, hp, opt, opt, pack_len=pack_len)
      p, c = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, critic)
      out = learner.step(p, opt.init(p), c, opt.init(c), None, ep)
      got.append(out[4]["train/entropy"])
      self.assertLess(out[4]["train/first_minibatch_approx_kl"], KL_TOL)
    self.assertAlmostEqual(got[0], want, places=4)
    self.assertAlmostEqual(got[1], want, places=4)
    self.assertGreater(want, 0.1)


if __name__ == "__main__":
  absltest.main()
