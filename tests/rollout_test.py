"""The runner's stop rules and queue order, driven by a scripted policy (`scripted`).

The engine's dialogue text, masks, rewards and feedback turns are checked in
continuous_test.py; here the runner's single-turn rules (multi-attempt's first box vs
LTE's run-to-EOS) and that any prompts come back in the given order.
"""

from absl.testing import absltest
import jax
import numpy as np

from mar import models, sampling
from mar.data import prompts
from mar.lte import hints
from mar.rollout.runner import RolloutRunner, RunnerSpec
import scripted
import testutil


class StopRuleTest(absltest.TestCase):
  """rollout.stop_at_box: multi-attempt's first-box rule vs LTE's run-to-EOS rule."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = testutil.tiny_tokenizer()
    cls.cfg = models.QwenConfig.tiny("qwen3", vocab_size=cls.tok.vocab_size)
    cls.params = models.init_params(cls.cfg, jax.random.PRNGKey(0))

  def _runner(self, text, stop_at_box, budget=40, max_attempts=1, prompt_len=48):
    return RolloutRunner(self.cfg, self.tok, testutil.ListVerifier(), RunnerSpec(batch_size=2,
        prompt_len=prompt_len, max_attempts=max_attempts, token_budget=budget,
        sampling=sampling.SamplingParams(temperature=0.0), stop_at_box=stop_at_box, refill_rows=1,
        refill_wait=1, verify_every=2), choose_fn=scripted.text_chooser(self.tok, text))

  def _run(self, text, stop_at_box, budget=40):
    prompt = hints.chat_prompt(hints.plain_prompt("3+4"))
    return self._runner(text, stop_at_box, budget).run_host(self.params, [prompt], ["7"],
                                                            jax.random.PRNGKey(0))

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
    head = "\\boxed{7} and more"
    out = self._run(head + " and more still", stop_at_box=False,
                    budget=len(self.tok.encode(head)))
    self.assertEqual(out.responses[0], self.tok.encode(head))
    self.assertTrue(out.truncated[0])
    self.assertFalse(out.correct[0])

  def test_more_prompts_than_rows_come_back_in_the_given_order(self):
    # Prompts of different lengths and buckets in one queue over 2 rows.
    golds = ["7", "0", "7", "0", "7"]
    for m in (1, 2):
      runner = self._runner("\\boxed{7}", stop_at_box=True, budget=16, max_attempts=m,
                            prompt_len=96)
      texts = [prompts.multi_attempt_prompt("1+" * k + "1", m) for k in (6, 1, 4, 2, 3)]
      ep = jax.device_get(runner.run(self.params, texts, golds, [m] * 5, jax.random.PRNGKey(0)))
      self.assertEqual(ep.correct_turn.any(0).tolist(), [g == "7" for g in golds])
      for i, text in enumerate(texts):
        prompt = ep.valid[i] & ~ep.action_mask[i] & ~ep.feedback_mask[i]
        self.assertEqual(ep.tokens[i][prompt].tolist(), self.tok.encode(text))
      np.testing.assert_array_equal(ep.attempts_used, [1, m, 1, m, 1])


if __name__ == "__main__":
  absltest.main()
