"""GRPO / LTE iterations end to end with a policy that fails unless it is given a hint."""

import tempfile

from absl.testing import absltest
import jax
import numpy as np

from mar import algorithms
from mar import models, setup
from mar.algorithms import refined
from mar.data.datasets import Example
from mar.lte import hints
from mar.rl import grpo
from mar.rollout.runner import RolloutRunner, RunnerSpec
import scripted
from testutil import tiny_config


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


class HintAwareRunner:
  """A policy that answers right only under a hint: a hinted queue goes to a runner scripted
  to answer 7, any other to one scripted to answer -1 (whose stats the step reads)."""

  def __init__(self, run, hint_id):
    r, tok = run.runner, run.tokenizer
    self.hint_id, self.tok = hint_id, tok
    make = lambda text: RolloutRunner(run.model_config, tok, run.verifier,
        RunnerSpec(batch_size=r.batch_size, prompt_len=r.prompt_len, max_attempts=1,
        token_budget=r.spec.token_budget, sampling=r.spec.sampling,
        stop_at_box=r.stop_predicate is not None), choose_fn=scripted.text_chooser(tok, text))
    self.wrong, self.right = make("\\boxed{-1}"), make("\\boxed{7}")

  def run_host(self, params, texts, answers, key, n_attempts=None):
    hinted = self.hint_id in self.tok.encode(texts[0])
    return (self.right if hinted else self.wrong).run_host(params, texts, answers, key,
                                                           n_attempts)

  def __getattr__(self, name):  # fits, prompt_len, verify_fn, take_stats, ...
    return getattr(self.wrong, name)


class LTEPipelineTest(absltest.TestCase):

  def _run(self, method, steps=2):
    config = tiny_config("lte")
    config.method = method
    config.rollout.prompts_per_step = 2
    config.grpo.group_size = 4
    run = setup.build_run(config, tempfile.mkdtemp())
    examples = _questions(2)
    run.runner = HintAwareRunner(run, _hint_token(run.tokenizer, [e.question for e in examples]))
    state = algorithms.family(config).init_state(config, run)
    before = np.asarray(state["policy"]["final_norm"]).copy()
    out = []
    for step in range(steps):
      state, m = algorithms.group.iteration(config, run, state, examples, step)
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


class HintedLogprobsTest(absltest.TestCase):

  def test_old_logp_hinted_is_a_forward_over_the_hinted_prompt(self):
    config = tiny_config("lte")
    run = setup.build_run(config, tempfile.mkdtemp())
    tok, q = run.tokenizer, "What is 3+4?"
    response = tok.encode("\\boxed{7}")
    hinted = hints.chat_prompt(hints.hint_prompt(q, ["-1", "12"], [False, False]))
    plain = hints.chat_prompt(hints.plain_prompt(q))
    got = refined.hinted_logprobs(run, run.params, [hinted], [response])
    _, _, action = grpo.pack_sequences([tok.encode(plain)], [response], run.runner.prompt_len,
                                       config.rollout.token_budget, tok.pad_id)
    got = got[0][action[0]]

    def reference(prompt: str) -> np.ndarray:  # plain forward, no padding, no packing
      ids = tok.encode(prompt) + response
      logits = models.forward(run.model_config, run.params, np.asarray([ids], np.int32))
      logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0, :-1], axis=-1)
      return np.take_along_axis(logp, np.asarray(ids[1:])[:, None], -1)[-len(response):, 0]

    run.close()
    np.testing.assert_allclose(got, reference(hinted), atol=2e-4, rtol=1e-4)
    self.assertGreater(np.abs(reference(hinted) - reference(plain)).max(), 1e-3)
    self.assertGreater(np.abs(got - reference(plain)).max(), 1e-3)


class FittingHintTest(absltest.TestCase):

  @staticmethod
  def _fits(chars):
    return lambda text: len(text) <= chars

  def test_long_answers_are_quoted_whole_when_they_fit(self):
    q = "Solve x^2 > 1."
    answers = ["(-\\infty, -1) \\cup (1, \\infty) \\text{ for all real } x" + "0" * 48,
               "(-\\infty, -1) \\cup (1, \\infty) \\text{ for all real } x" + "1" * 48]
    self.assertGreaterEqual(len(answers[0]), 100)
    user, kind, shortened = refined.fitting_hint(self._fits(10_000), q, answers, [False] * 2)
    self.assertEqual(user, hints.hint_prompt(q, answers, [False] * 2))
    self.assertIn(answers[0], user)
    self.assertIn(answers[1], user)
    self.assertEqual((kind, shortened), ("hint", False))

  def test_hint_drops_answers_from_the_end_to_fit(self):
    q = "What is 1+1?"
    answers = ["3", "x" * 500, "4"]
    full = hints.hint_prompt(q, answers, [False] * 3)
    self.assertEqual(refined.fitting_hint(self._fits(len(hints.chat_prompt(full))), q,
                                           answers, [False] * 3), (full, "hint", False))
    two = hints.hint_prompt(q, ["3", "x" * 500], [False, False])
    self.assertEqual(refined.fitting_hint(self._fits(len(hints.chat_prompt(two))), q, answers,
                                           [False] * 3), (two, "hint", True))
    one = hints.hint_prompt(q, ["3"], [False])
    self.assertEqual(refined.fitting_hint(self._fits(len(hints.chat_prompt(one)) + 100), q,
                                           answers, [False] * 3), (one, "hint", True))
    self.assertEqual(refined.fitting_hint(self._fits(10), q, answers, [False] * 3),
                     (hints.plain_prompt(q), "plain", True))
    concise = refined.fitting_hint(self._fits(10), q, answers, [False, True, False])
    self.assertEqual(concise[1:], ("concise", True))

  def test_max_chars_and_separator(self):
    q = "What is 1+1?"
    user, _, shortened = refined.fitting_hint(self._fits(10_000), q, ["12345", "3"],
                                               [False] * 2, max_chars=3, sep=" ; ")
    self.assertEqual(user, hints.hint_prompt(q, ["123", "3"], [False] * 2, sep=" ; "))
    self.assertTrue(shortened)

  def test_public_entry_point(self):
    import mar.lte

    self.assertIs(mar.lte.hint_prompt, hints.hint_prompt)


if __name__ == "__main__":
  absltest.main()
