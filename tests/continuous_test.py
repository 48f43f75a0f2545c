"""The continuous rollout engine: schedule-independent results, HF parity, multi-attempt semantics."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import episodes as episodes_lib
from mar import models, sampling
from mar.data import prompts
from mar.data.tokenizer import feedback_table
from mar.lte import hints
from mar.rollout import continuous
from mar.rollout import spec as spec_lib
from mar.rollout.host import AttemptVerifier
from mar.rollout.render import dialogue_text, render_episode
import testutil
import scripted


def responses(ep):
  return [ep.tokens[q][ep.action_mask[q]].tolist() for q in range(len(ep.tokens))]


class SingleTurnTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.hf, cls.config, cls.params = testutil.hf_tiny("qwen2")
    cls.prompts = testutil.prompts_for(lens=testutil.ENGINE_PROMPT_LENS)

  @parameterized.parameters(((),),  # every prompt prefilled at the queue's width P = 17
                            ((4, 8, 16),))  # its own: 1 -> 4, 5..7 -> 8, 9..14 -> 16, 17 -> P
  def test_greedy_equals_hf_with_refills(self, widths):
    ref = testutil.hf_greedy(self.hf, self.prompts, 20)
    ep, stats = testutil.engine_single_turn(self.config, self.params, self.prompts, rows=3, budget=20,
                            widths=widths)
    self.assertEqual(responses(ep), ref)
    self.assertEqual(int(stats["prefill_rows"]), len(self.prompts))
    self.assertGreater(int(stats["prefill_calls"]), 1)
    np.testing.assert_array_equal(ep.attempts_used, 1)
    np.testing.assert_array_equal(ep.truncated, True)  # all ran out of budget

  def test_greedy_equals_hf_with_a_cache_window(self):
    """4-slot blocks: the 37-slot cache keeps an 8-slot window that refills write into and
    decode reads first, then live blocks past it; the tokens stay HF's."""
    config = self.config.replace(attn_block=4)
    self.assertEqual(models.model.window_slots(config, max(testutil.ENGINE_PROMPT_LENS) + 20), 8)
    ref = testutil.hf_greedy(self.hf, self.prompts, 20)
    ep, stats = testutil.engine_single_turn(config, self.params, self.prompts, rows=3, budget=20,
                                            widths=(4, 8, 16))
    self.assertEqual(responses(ep), ref)
    self.assertGreater(int(stats["prefill_calls"]), 1)

  @parameterized.parameters(0.0, 1.0)
  def test_same_results_with_any_number_of_rows(self, temperature):
    # Many stop ids: episodes end at different lengths, so rows free up at different steps.
    stop_ids = tuple(range(1, 300, 9))
    runs = [testutil.engine_single_turn(self.config, self.params, self.prompts, rows=rows, budget=24,
                        temperature=temperature, stop_ids=stop_ids, key=5)
            for rows in (len(self.prompts), 3)]
    (a, sa), (b, sb) = runs
    self.assertEqual(int(sa["prefill_calls"]), 1)  # B = Q: no refills
    self.assertGreater(int(sb["prefill_calls"]), 2)
    lengths = a.action_mask.sum(1)
    self.assertGreater(len(set(lengths.tolist())), 2)  # the schedule really differed
    for name in ("tokens", "valid", "action_mask", "feedback_mask", "attempt_id", "truncated"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    self.assertTrue((a.logprobs[a.action_mask] < 0).all())
    # No sampled stop token is kept, and tokens sit right after their prompt slots.
    p = max(testutil.ENGINE_PROMPT_LENS)
    for q in range(len(self.prompts)):
      self.assertTrue(a.action_mask[q, p:p + lengths[q]].all())
      self.assertFalse(set(a.tokens[q][a.action_mask[q]].tolist()) & set(stop_ids))
    self.assertEqual(int(sb["sampled"]), int(sa["sampled"]))

  def test_repeated_prompts_copy_the_prefill(self):
    """GRPO groups queue one prompt several times in a row: one fill prefills it once and
    copies its row; the episodes equal HF's (greedy) and those of one row at a time
    (sampled, where no fill holds two of them)."""
    p = self.prompts
    queue = [p[0]] * 3 + [p[1]] + [p[2]] * 2 + [p[3]] * 3
    ref = testutil.hf_greedy(self.hf, queue, 12)
    ep, _ = testutil.engine_single_turn(self.config, self.params, queue, rows=len(queue),
                                        budget=12, widths=(4, 8, 16))
    self.assertEqual(responses(ep), ref)
    runs = [testutil.engine_single_turn(self.config, self.params, queue, rows=rows, budget=12,
                                        temperature=1.0, key=7, refill_rows=1)
            for rows in (len(queue), 1)]
    (a, _), (b, _) = runs
    self.assertGreater(len({tuple(r) for r in responses(a)[:3]}), 1)  # samples differ
    for name in ("tokens", "valid", "action_mask"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


class MultiAttemptTest(absltest.TestCase):
  """Scripted attempts: dialogue text, masks, rewards, feedback turns; the same with any B."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = testutil.tiny_tokenizer()
    cls.cfg = models.QwenConfig.tiny("qwen3", vocab_size=cls.tok.vocab_size)
    cls.params = models.init_params(cls.cfg, jax.random.PRNGKey(0))

  def _inputs(self, attempts_text, n_attempts, max_attempts):
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
    texts = [prompts.multi_attempt_prompt(f"{i}+{i}", n) for i, n in enumerate(n_attempts)]
    ids = [tok.encode(t) for t in texts]
    p = max(map(len, ids))
    ptoks = np.full((b, p), tok.pad_id, np.int32)
    pmask = np.zeros((b, p), bool)
    for i, x in enumerate(ids):
      ptoks[i, p - len(x):], pmask[i, p - len(x):] = x, True
    return script, lengths, texts, ptoks, pmask

  def _run(self, attempts_text, n_attempts, golds, rows, budget=64, max_attempts=3,
           hint_len=0, verify_every=2):
    """([(episodes, stats) per entry of `rows`], prompt texts, the last run's verifier)."""
    tok = self.tok
    script, lengths, texts, ptoks, pmask = self._inputs(attempts_text, n_attempts, max_attempts)
    p = ptoks.shape[1]
    fb_t, fb_l = feedback_table(tok, max_attempts)
    spec = spec_lib.RolloutSpec(
        max_attempts, budget,
        spec_lib.cache_len_for(p, budget, max_attempts, max(fb_t.shape[1], hint_len)),
        sampling.SamplingParams(temperature=0.0), (tok.im_end_id, tok.eos_id),
        hint_feedback_len=hint_len)
    args = (ptoks, pmask, jnp.asarray(n_attempts, jnp.int32))
    choose = scripted.script_chooser(script, lengths)
    runs = []
    for r in rows:  # scanned layers: the engine compiles faster, computes the same
      verifier = AttemptVerifier(tok, testutil.ListVerifier(), golds,
                                 feedback_text=hints.hint_feedback_text)
      espec = continuous.EngineSpec(spec, rows=r, refill_rows=1, refill_wait=1,
                                    verify_every=verify_every, unroll=False)
      runs.append(jax.device_get(jax.jit(lambda: continuous.rollout(  # pylint: disable=cell-var-from-loop
          self.cfg, self.params, espec, None, verifier, *args, fb_t, fb_l, jax.random.key(0),
          choose_fn=choose))()))
    return runs, texts, verifier

  def test_sampled_results_do_not_depend_on_rows(self):
    (a, sa), (b, sb) = (testutil.engine_multi_attempt_sampled(self.cfg, self.params, self.tok, rows=r)
                        for r in (6, 2))
    self.assertEqual(int(sa["prefill_calls"]), 1)
    self.assertGreater(int(sb["prefill_calls"]), 2)
    self.assertGreater(int(a.attempts_used.sum()), 8)  # feedback turns happened
    self.assertTrue(a.feedback_mask.any())
    for name in ("tokens", "valid", "action_mask", "feedback_mask", "attempt_id", "reward",
                 "attempts_used", "attempted_turn", "truncated"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)

  def _assert_same(self, a, b):
    for name in ("tokens", "valid", "action_mask", "feedback_mask", "attempt_id", "logprobs",
                 "reward", "last_action", "attempts_used", "correct_turn", "attempted_turn",
                 "boxed_turn", "truncated"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)

  def test_dialogues_masks_rewards_with_any_rows(self):
    end = "<|im_end|>"
    scripts = [
        ["\\boxed{5}" + end, "I am not sure" + end, "so \\boxed{7}"],  # wrong, no box, right
        ["no box here" + end, "still none"],  # never a box
        ["\\boxed{3}"],  # one wrong attempt
        ["\\boxed{9}" + end, "unused"],  # correct at once
        ["a much longer first attempt that ends \\boxed{2}", "then \\boxed{4}", "x"],
    ]
    n_attempts = [3, 2, 1, 2, 3]
    golds = ["7", "1", "4", "9", "4"]
    runs, texts, _ = self._run(scripts, n_attempts, golds, rows=(5, 2))
    (ep, full), (other, refilled) = runs
    self._assert_same(ep, other)
    self.assertEqual(int(full["prefill_calls"]), 1)
    self.assertGreater(int(refilled["prefill_calls"]), 1)
    self.assertEqual(int(refilled["prefill_rows"]), 5)
    want = [
        texts[0] + "\\boxed{5}" + prompts.feedback_text(2) + "I am not sure"
        + prompts.feedback_text(1) + "so \\boxed{7}",
        texts[1] + "no box here" + prompts.feedback_text(1) + "still none",
        texts[2] + "\\boxed{3}",
        texts[3] + "\\boxed{9}",
        texts[4] + "a much longer first attempt that ends \\boxed{2}" + prompts.feedback_text(2)
        + "then \\boxed{4}",
    ]
    for q in range(5):
      self.assertEqual(dialogue_text(self.tok, ep, q), want[q])
    np.testing.assert_allclose(ep.reward, [1.0, -1.0, -0.5, 1.0, 1.0])
    np.testing.assert_array_equal(ep.attempts_used, [3, 2, 1, 1, 2])
    np.testing.assert_array_equal(ep.correct_turn[:, 0], [False, False, True])
    for q in range(5):
      valid, act, fb = ep.valid[q], ep.action_mask[q], ep.feedback_mask[q]
      self.assertFalse((act & fb).any())
      self.assertTrue(((act | fb) <= valid).all())
      used = ep.attempts_used[q]
      self.assertEqual(self.tok.decode(ep.tokens[q][act]),
                       "".join(s.replace(end, "") for s in scripts[q][:used]))
      self.assertEqual(self.tok.decode(ep.tokens[q][fb]),
                       "".join(prompts.feedback_text(n_attempts[q] - 1 - t)
                               for t in range(used - 1)))
      np.testing.assert_allclose(ep.logprobs[q][act], -0.25)
      self.assertTrue((ep.logprobs[q][~act] == 0).all())
      self.assertEqual(ep.last_action[q], np.flatnonzero(act).max())
    rewards = jax.device_get(episodes_lib.token_rewards(ep))
    np.testing.assert_allclose(rewards.sum(1), ep.reward)
    self.assertIn("[feedback>", render_episode(self.tok, ep, 0))

  def test_shared_budget_truncates(self):
    scripts = [["aaaa bbbb cccc dddd eeee", "x"], ["\\boxed{1}", "y"]]
    runs, _, _ = self._run(scripts, [2, 2], ["1", "1"], rows=(2, 1), budget=3)
    (ep, _), (other, _) = runs
    self._assert_same(ep, other)
    self.assertEqual(int(ep.action_mask[0].sum()), 3)
    self.assertTrue(ep.truncated[0])
    self.assertEqual(ep.attempts_used[0], 1)  # budget gone: no second attempt
    self.assertEqual(ep.reward[0], -1.0)

  def test_hybrid_feedback_lists_wrong_answers(self):
    end = "<|im_end|>"
    scripts = [["\\boxed{5}" + end, "\\boxed{6}", "nothing", "\\boxed{7}"],
               ["\\boxed{1}", "\\boxed{2}", "\\boxed{7}", "z"]]
    runs, texts, verifier = self._run(scripts, [4, 4], ["7", "7"], rows=(2, 1),
                                      max_attempts=4, hint_len=96)
    (ep, _), (other, _) = runs
    self._assert_same(ep, other)
    want = (texts[0] + "\\boxed{5}" + hints.hint_feedback_text(3, ["5"]) + "\\boxed{6}"
            + hints.hint_feedback_text(2, ["5", "6"]) + "nothing"
            + hints.hint_feedback_text(1, ["5", "6"]) + "\\boxed{7}")
    self.assertEqual(dialogue_text(self.tok, ep, 0), want)
    self.assertIn("Hint: possible incorrect answers include 5, 6", want)
    np.testing.assert_allclose(ep.reward, [1.0, 1.0])
    self.assertGreater(verifier.stalled, 0.0)


class RunnerTest(absltest.TestCase):
  """RolloutRunner: any number of prompts in one queue, both stop rules."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = testutil.tiny_tokenizer()
    cls.cfg = models.QwenConfig.tiny("qwen3", vocab_size=cls.tok.vocab_size)
    cls.params = models.init_params(cls.cfg, jax.random.PRNGKey(0))

  def _runner(self, texts, max_attempts, stop_at_box):
    from mar.rollout.runner import RolloutRunner, RunnerSpec  # pylint: disable=g-import-not-at-top
    enc = [[self.tok.encode(t) for t in row] for row in texts]
    width = max(len(x) for row in enc for x in row)
    script = np.zeros((len(enc), max_attempts, width), np.int32)
    lengths = np.ones((len(enc), max_attempts), np.int32)
    for q, row in enumerate(enc):
      for t, ids in enumerate(row):
        script[q, t, :len(ids)], lengths[q, t] = ids, len(ids)
    return RolloutRunner(self.cfg, self.tok, testutil.ListVerifier(), RunnerSpec(batch_size=2,
        prompt_len=64, max_attempts=max_attempts, token_budget=40,
        sampling=sampling.SamplingParams(temperature=0.0), stop_at_box=stop_at_box, refill_rows=1,
        refill_wait=1, verify_every=2), choose_fn=scripted.script_chooser(script, lengths))

  def test_single_turn_queue_and_stop_rules(self):
    n = 5
    texts = [[f"\\boxed{{{q}}} no, \\boxed{{{q + 1}}}<|im_end|>"] for q in range(n)]
    golds = [str(q + 1) if q % 2 == 0 else str(q) for q in range(n)]
    prompt = [hints.chat_prompt(hints.plain_prompt(f"{q}+1")) for q in range(n)]
    for stop_at_box in (False, True):
      runner = self._runner(texts, 1, stop_at_box)
      out = runner.run_host(self.params, prompt, golds, jax.random.PRNGKey(0))
      self.assertLen(out.responses, n)
      for q in range(n):
        want = texts[q][0] if not stop_at_box else f"\\boxed{{{q}}}"
        self.assertEqual(out.responses[q], self.tok.encode(want))
        self.assertEqual(bool(out.correct[q]), (q % 2 == 0) != stop_at_box)
      self.assertFalse(out.truncated.any())
      stats = runner.take_stats()
      self.assertEqual(stats["rollout/prefill_rows"], n)
      self.assertGreater(stats["rollout/slot_utilization"], 0.3)
      self.assertEqual(runner.take_stats(), {})

  def test_multi_attempt_queue(self):
    n = 5
    texts = [[f"\\boxed{{{q}}}<|im_end|>", f"\\boxed{{{q + 10}}}"] for q in range(n)]
    golds = [str(q) if q < 2 else str(q + 10) for q in range(n)]
    runner = self._runner(texts, 2, True)
    prompt = [prompts.multi_attempt_prompt(f"{q}+q", 2) for q in range(n)]
    ep = jax.device_get(runner.run(self.params, prompt, golds, [2, 2, 2, 1, 2],
                                   jax.random.PRNGKey(0)))
    self.assertLen(ep.reward, n)
    np.testing.assert_array_equal(ep.attempts_used, [1, 1, 2, 1, 2])
    np.testing.assert_allclose(ep.reward, [1.0, 1.0, 1.0, -0.5, 1.0])
    self.assertEqual(dialogue_text(self.tok, ep, 2),
                     prompt[2] + "\\boxed{2}" + prompts.feedback_text(1) + "\\boxed{12}")
    self.assertEqual(runner.take_stats()["rollout/prefill_rows"], n)


if __name__ == "__main__":
  absltest.main()
