"""GRPO / LTE iterations end to end with a policy that fails unless it is given a hint."""

import functools
import tempfile

from absl.testing import absltest
import numpy as np

from mar import setup, train
from mar.data.datasets import Example
from mar.lte import hints
from mar.rollout.runner import RolloutRunner
from scripted import hint_aware_decode
from train_test import tiny_config


def _questions(n):
  """Questions whose answer is always 7, so one scripted answer fits all."""
  return [Example(question=f"What is {a}+{7 - a}?", answer="7", source="t", index=i)
          for i, a in enumerate(range(1, n + 1))]


def _hint_token(tok, questions):
  """A token id present in every hinted prompt and in no plain one."""
  plain = set().union(*(tok.encode(hints.chat_prompt(hints.plain_prompt(q))) for q in questions))
  hinted = [set(tok.encode(hints.chat_prompt(hints.hint_prompt(q, ["-1"], [False]))))
            for q in questions]
  candidates = set.intersection(*hinted) - plain
  assert candidates, "no token tells hinted prompts apart"
  return min(candidates)


class LTEPipelineTest(absltest.TestCase):

  def _run(self, method, steps=2):
    config = tiny_config("lte")
    config.method = method
    config.rollout.prompts_per_step = 2
    config.grpo.group_size = 4
    run = setup.build_run(config, tempfile.mkdtemp())
    examples = _questions(2)
    tok = run.tokenizer
    decode = functools.partial(hint_aware_decode, _hint_token(tok, [e.question for e in examples]),
                               tok.encode("\\boxed{-1}"), tok.encode("\\boxed{7}"))
    r = run.runner
    run.runner = RolloutRunner(run.model_config, tok, run.verifier, batch_size=r.batch_size,
                               prompt_len=r.prompt_len, max_attempts=1,
                               token_budget=config.rollout.token_budget,
                               sampling=r.spec.sampling, decode_fn=decode)
    state = train.init_state(config, run)
    before = np.asarray(state["policy"]["final_norm"]).copy()
    out = []
    for step in range(steps):
      state, m = train.group_iteration(config, run, state, examples, step)
      out.append(m)
    run.close()
    return out, before, np.asarray(state["policy"]["final_norm"])

  def test_lte_rescues_none_pass_groups_with_hints(self):
    metrics, before, after = self._run("lte")
    m = metrics[0]
    self.assertEqual(m["none_pass"], 2)  # the scripted policy fails without a hint
    self.assertEqual(m["lte/num_rescued"], 2)  # ... and succeeds with one
    self.assertEqual(m["lte/num_cap_bound"], 2)  # 4 correct hinted > cap G - 1 = 3
    self.assertEqual(m["lte/num_replaced"], 6)
    self.assertAlmostEqual(m["hinted_token_frac"], 0.75, places=5)
    self.assertTrue(np.isfinite(m["loss"]))
    self.assertFalse(np.allclose(before, after))  # the update moved the policy

  def test_extra_rollouts_baseline_stays_all_fail(self):
    metrics, _, _ = self._run("grpo_extra", steps=1)
    self.assertEqual(metrics[0]["lte/num_rescued"], 0)  # un-hinted extra samples fail too

  def test_plain_grpo_skips_hints(self):
    metrics, _, _ = self._run("grpo", steps=1)
    self.assertEqual(metrics[0]["none_pass"], 2)
    self.assertNotIn("lte/num_rescued", metrics[0])
    self.assertEqual(metrics[0]["hinted_token_frac"], 0.0)


class FittingHintTest(absltest.TestCase):

  def _run_with_limit(self, chars):
    runner = type("R", (), {"fits": staticmethod(lambda text: len(text) <= chars)})()
    return type("Run", (), {"runner": runner})()

  def test_hint_shrinks_to_fit_the_prompt_bucket(self):
    q = "What is 1+1?"
    answers = ["3", "x" * 500, "4"]
    full = hints.chat_prompt(hints.hint_prompt(q, ["3", "x" * 64, "4"], [False] * 3))
    run = self._run_with_limit(len(full))
    self.assertEqual(train._fitting_hint(run, q, answers, [False] * 3),
                     hints.hint_prompt(q, ["3", "x" * 64, "4"], [False] * 3))
    short = hints.chat_prompt(hints.hint_prompt(q, ["3"], [False]))
    run = self._run_with_limit(len(short))
    self.assertEqual(train._fitting_hint(run, q, answers, [False] * 3),
                     hints.hint_prompt(q, ["3"], [False]))
    run = self._run_with_limit(10)
    self.assertEqual(train._fitting_hint(run, q, answers, [False] * 3), hints.plain_prompt(q))


if __name__ == "__main__":
  absltest.main()
