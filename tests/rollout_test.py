"""The multi-attempt rollout driven by a scripted policy: dialogue text, masks, rewards, calls."""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from mar import models, sampling
from mar.data import prompts
from mar.data.tokenizer import feedback_table
from mar.lte import hints
from mar.rollout import multi_attempt as ma
from mar.rollout.host import AttemptVerifier
from mar.rollout.render import dialogue_text, render_episode
from mar.rollout.runner import RolloutRunner
import testutil
from scripted import counting_predicate, scripted_decode, stop_rule_decode


class _TinyModel(absltest.TestCase):
  """A tiny tokenizer and a random tiny Qwen3, built once per test class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = testutil.tiny_tokenizer()
    cls.cfg = models.QwenConfig.tiny("qwen3", vocab_size=cls.tok.vocab_size)
    cls.params = models.init_params(cls.cfg, jax.random.PRNGKey(0))


class RolloutTest(_TinyModel):

  def _run(self, attempts_text, n_attempts, golds, budget=64, max_attempts=3, hint_len=0):
    tok = self.tok
    b = len(attempts_text)
    enc = [[tok.encode(a) for a in row] for row in attempts_text]
    width = max(len(t) for row in enc for t in row)
    script = np.full((b, max_attempts, width), tok.pad_id, np.int32)
    lengths = np.zeros((b, max_attempts), np.int32)
    for i, row in enumerate(enc):
      for t, ids in enumerate(row):
        script[i, t, :len(ids)] = ids
        lengths[i, t] = len(ids)
    questions = [f"{i}+{i}" for i in range(b)]
    texts = [prompts.multi_attempt_prompt(q, n) for q, n in zip(questions, n_attempts)]
    ids = [tok.encode(t) for t in texts]
    p = max(map(len, ids))
    ptoks = np.full((b, p), tok.pad_id, np.int32)
    pmask = np.zeros((b, p), bool)
    for i, x in enumerate(ids):
      ptoks[i, p - len(x):], pmask[i, p - len(x):] = x, True
    fb_t, fb_l = feedback_table(tok, max_attempts)
    spec = ma.RolloutSpec(max_attempts, budget,
                          ma.cache_len_for(p, budget, max_attempts, max(fb_t.shape[1], hint_len)),
                          sampling.SamplingParams(temperature=0.0),
                          (tok.im_end_id, tok.eos_id), hint_feedback_len=hint_len)
    verifier = AttemptVerifier(tok, testutil.ListVerifier(), golds,
                               feedback_text=hints.hint_feedback_text)
    decode = functools.partial(scripted_decode, jnp.asarray(script), jnp.asarray(lengths))
    fn = jax.jit(lambda: ma.rollout(self.cfg, self.params, spec, counting_predicate(), verifier,
                                    ptoks, pmask, jnp.asarray(n_attempts, jnp.int32),
                                    jnp.arange(b, dtype=jnp.int32), fb_t, fb_l,
                                    jax.random.PRNGKey(0), decode_fn=decode))
    return fn(), texts, verifier

  def test_dialogue_masks_rewards_and_calls(self):
    end = "<|im_end|>"
    scripts = [
        ["\\boxed{5}" + end, "I am not sure" + end, "so \\boxed{7}"],  # wrong, no box, correct
        ["no box here" + end, "still none"],  # never a box
        ["\\boxed{3}"],  # one wrong attempt
        ["\\boxed{9}" + end, "unused"],  # correct at once
    ]
    n_attempts = [3, 2, 1, 2]
    golds = ["7", "1", "4", "9"]
    ep, texts, verifier = self._run(scripts, n_attempts, golds)
    ep = jax.device_get(ep)
    self.assertEqual(verifier.calls, 3)  # one host callback per turn, whole batch
    want = [
        texts[0] + "\\boxed{5}" + prompts.feedback_text(2) + "I am not sure"
        + prompts.feedback_text(1) + "so \\boxed{7}",
        texts[1] + "no box here" + prompts.feedback_text(1) + "still none",
        texts[2] + "\\boxed{3}",
        texts[3] + "\\boxed{9}",
    ]
    for b in range(4):
      self.assertEqual(dialogue_text(self.tok, ep, b), want[b])
    np.testing.assert_allclose(ep.reward, [1.0, -1.0, -0.5, 1.0])
    np.testing.assert_array_equal(ep.attempts_used, [3, 2, 1, 1])
    np.testing.assert_array_equal(ep.correct_turn[:, 0], [False, False, True])
    for b in range(4):
      valid, act, fb = ep.valid[b], ep.action_mask[b], ep.feedback_mask[b]
      self.assertFalse((act & fb).any())
      self.assertTrue(((act | fb) <= valid).all())
      fb_text = self.tok.decode(ep.tokens[b][fb])
      act_text = self.tok.decode(ep.tokens[b][act])
      self.assertEqual(act_text, "".join(s.replace(end, "") for s in scripts[b][:ep.attempts_used[b]]))
      want_fb = "".join(prompts.feedback_text(n_attempts[b] - 1 - t)
                        for t in range(ep.attempts_used[b] - 1))
      self.assertEqual(fb_text, want_fb)
      np.testing.assert_allclose(ep.logprobs[b][act], -0.25)
      self.assertTrue((ep.logprobs[b][~act] == 0).all())
      self.assertEqual(ep.last_action[b], np.flatnonzero(act).max())
    rewards = jax.device_get(ma.token_rewards(ep))
    np.testing.assert_allclose(rewards.sum(1), ep.reward)
    self.assertIn("[feedback>", render_episode(self.tok, ep, 0))

  def test_hybrid_feedback_lists_wrong_answers(self):
    end = "<|im_end|>"
    scripts = [["\\boxed{5}" + end, "\\boxed{6}", "nothing", "\\boxed{7}"]]
    ep, texts, verifier = self._run(scripts, [4], ["7"], max_attempts=4, hint_len=96)
    self.assertEqual(verifier.calls, 4)
    want = (texts[0] + "\\boxed{5}" + hints.hint_feedback_text(3, ["5"]) + "\\boxed{6}"
            + hints.hint_feedback_text(2, ["5", "6"]) + "nothing"
            + hints.hint_feedback_text(1, ["5", "6"]) + "\\boxed{7}")
    self.assertEqual(dialogue_text(self.tok, jax.device_get(ep), 0), want)
    self.assertIn("Hint: possible incorrect answers include 5, 6", want)
    self.assertEqual(float(ep.reward[0]), 1.0)

  def test_shared_budget_truncates(self):
    ep, _, _ = self._run([["aaaa bbbb cccc dddd eeee", "x"]], [2], ["1"], budget=3)
    ep = jax.device_get(ep)
    self.assertEqual(int(ep.action_mask.sum()), 3)
    self.assertTrue(ep.truncated[0])
    self.assertEqual(ep.attempts_used[0], 1)  # budget gone: no second attempt
    self.assertEqual(ep.reward[0], -1.0)


class StopRuleTest(_TinyModel):
  """rollout.stop_at_box: multi-attempt's first-box rule vs LTE's run-to-EOS rule."""

  def _run(self, text, stop_at_box, budget=40):
    tok = self.tok
    runner = RolloutRunner(
        self.cfg, tok, testutil.ListVerifier(), batch_size=2, prompt_len=48, max_attempts=1,
        token_budget=budget, sampling=sampling.SamplingParams(temperature=0.0),
        decode_fn=functools.partial(stop_rule_decode, tok.encode(text)),
        stop_at_box=stop_at_box)
    prompt = hints.chat_prompt(hints.plain_prompt("3+4"))
    return runner.run_host(self.params, [prompt], ["7"], jax.random.PRNGKey(0))

  def test_more_prompts_than_rows_come_back_in_the_given_order(self):
    # Chunks are formed by prompt length; the episodes must still line up with the prompts.
    tok = self.tok
    golds = ["7", "0", "7", "0", "7"]
    for m in (1, 2):
      runner = RolloutRunner(
          self.cfg, tok, testutil.ListVerifier(), batch_size=2, prompt_len=96, max_attempts=m,
          token_budget=16, sampling=sampling.SamplingParams(temperature=0.0),
          decode_fn=functools.partial(stop_rule_decode, tok.encode("\\boxed{7}")))
      texts = [prompts.multi_attempt_prompt("1+" * k + "1", m) for k in (6, 1, 4, 2, 3)]
      ep = jax.device_get(runner.run(self.params, texts, golds, [m] * 5, jax.random.PRNGKey(0)))
      self.assertEqual(ep.correct_turn.any(0).tolist(), [g == "7" for g in golds])
      for i, text in enumerate(texts):
        prompt = ep.valid[i] & ~ep.action_mask[i] & ~ep.feedback_mask[i]
        self.assertEqual(ep.tokens[i][prompt].tolist(), tok.encode(text))

  def test_grpo_response_continues_past_the_first_box_to_eos(self):
    text = "\\boxed{3} no, \\boxed{7}<|im_end|>"
    out = self._run(text, stop_at_box=False)
    self.assertEqual(out.responses[0], self.tok.encode(text))  # EOS kept as an action
    self.assertEqual(out.responses[0][-1], self.tok.im_end_id)
    self.assertEqual(out.answers[0], "7")  # graded on the last box
    self.assertTrue(out.correct[0])
    self.assertFalse(out.truncated[0])

  def test_multi_attempt_rule_stops_at_the_first_box(self):
    out = self._run("\\boxed{3} no, \\boxed{7}<|im_end|>", stop_at_box=True)
    self.assertEqual(out.responses[0], self.tok.encode("\\boxed{3}"))
    self.assertFalse(out.correct[0])

  def test_truncated_response_is_wrong_under_the_eos_rule(self):
    text = "\\boxed{7} and more"
    out = self._run(text, stop_at_box=False, budget=len(self.tok.encode(text)))
    self.assertTrue(out.truncated[0])
    self.assertFalse(out.correct[0])


if __name__ == "__main__":
  absltest.main()
