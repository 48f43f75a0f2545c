"""LTE hint prompts (exact strings) and group refinement."""

from absl.testing import absltest
import numpy as np

from mar.lte import hints
from mar.lte import refine

Q = "What is $1+1$?"
STEP = "Let's think step by step and output the final answer within \\boxed{}."
CONCISE = "Let's think concisely and output the final answer within \\boxed{}."
DONT = "Do not use or mention the hint explicitly in any of your intermediate steps."


class HintPromptTest(absltest.TestCase):

  def test_plain(self):
    want = "What is $1+1$?\nLet's think step by step and output the final answer within \\boxed{}."
    self.assertEqual(hints.plain_prompt(Q), want)
    # no usable answer, none truncated -> the plain prompt
    self.assertEqual(hints.hint_prompt(Q, [None, None, None], [False, False, False]), want)

  def test_hint(self):
    got = hints.hint_prompt(Q, ["2", "4", None, "2", " 4 "], [False] * 5)
    want = (
        "What is $1+1$?\n"
        "Hint: possible incorrect answers include 2, 4\n"
        "Do not use or mention the hint explicitly in any of your intermediate steps. "
        "Let's think step by step and output the final answer within \\boxed{}."
    )
    self.assertEqual(got, want)
    self.assertEqual(hints.hint_kind(["2", "4", None, "2", " 4 "], [False] * 5), "hint")

  def test_concise_hint_uses_only_finished_rollouts(self):
    got = hints.hint_prompt(Q, ["7", "3", "9", "3"], [True, False, True, False])
    want = f"{Q}\nHint: possible incorrect answers include 3\n{DONT} {CONCISE}"
    self.assertEqual(got, want)

  def test_concise_all_truncated(self):
    want = "What is $1+1$?\nLet's think concisely and output the final answer within \\boxed{}."
    self.assertEqual(hints.hint_prompt(Q, ["5", None], [True, True]), want)

  def test_concise_some_truncated_no_answer(self):
    self.assertEqual(hints.hint_prompt(Q, [None, "5"], [False, True]), f"{Q}\n{CONCISE}")

  def test_first_seen_order_and_separator(self):
    got = hints.hint_prompt(Q, ["\\frac{1}{2}", "x=3", "\\frac{1}{2}", "0"], [False] * 4, sep=" ")
    listed = "\\frac{1}{2} x=3 0"
    self.assertEqual(got, f"{Q}\nHint: possible incorrect answers include {listed}\n{DONT} {STEP}")

  def test_chat_prompt(self):
    want = "<|im_start|>user\nhi\nthere<|im_end|>\n<|im_start|>assistant\n"
    self.assertEqual(hints.chat_prompt("hi\nthere"), want)

  def test_length_mismatch(self):
    with self.assertRaisesRegex(ValueError, "differ in length: 2 vs 1"):
      hints.hint_prompt(Q, ["1", "2"], [False])


class RefineTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.g = 4
    # prompt 0 passes; 1, 2, 3 none-pass
    self.rewards = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    self.none_pass = np.array([False, True, True, True])
    self.hinted_rewards = np.array(
        [[1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32
    )  # row 0 ignored; 1: two correct; 2: four (cap 3 binds); 3: none

  def plan(self, seed=0, hinted_rewards=None, cap=None):
    hr = self.hinted_rewards if hinted_rewards is None else hinted_rewards
    rng = np.random.default_rng(seed)
    return refine.refine_groups(self.rewards, hr, self.none_pass, rng, cap=cap)

  def test_counts_and_cap(self):
    plan = self.plan()
    self.assertEqual(plan.num_none_pass, 3)
    self.assertEqual(plan.num_rescued, 2)
    self.assertEqual(plan.num_cap_bound, 1)
    self.assertEqual(plan.num_replaced, 2 + 3)
    np.testing.assert_array_equal(plan.hinted.sum(1), [0, 2, 3, 0])
    np.testing.assert_array_equal(plan.rewards.sum(1), [2, 2, 3, 0])
    np.testing.assert_array_equal(plan.rewards[0], self.rewards[0])  # passing group untouched
    self.assertEqual(sorted(plan.source[1][plan.source[1] >= 0].tolist()), [1, 3])
    used = plan.source[2][plan.source[2] >= 0]
    self.assertLen(set(used.tolist()), 3)  # distinct hinted samples
    self.assertEqual(self.plan(cap=4).num_cap_bound, 0)
    self.assertEqual(self.plan(cap=4).hinted.sum(), 6)
    self.assertEqual(self.plan(cap=1).num_cap_bound, 2)

  def test_determinism_and_randomness(self):
    a, b = self.plan(seed=3), self.plan(seed=3)
    np.testing.assert_array_equal(a.source, b.source)
    sources = {tuple(self.plan(seed=s).source[1]) for s in range(20)}
    self.assertGreater(len(sources), 1)  # replaced members vary with the seed

  def test_compact_layout_same_plan(self):
    full = self.plan(seed=5)
    compact = self.plan(seed=5, hinted_rewards=self.hinted_rewards[self.none_pass])
    np.testing.assert_array_equal(full.source, compact.source)
    np.testing.assert_array_equal(compact.hint_row, [-1, 0, 1, 2])
    np.testing.assert_array_equal(full.hint_row, [-1, 1, 2, 3])

  def test_rejects_inconsistent_none_pass(self):
    self.rng = np.random.default_rng(0)
    with self.assertRaisesRegex(ValueError, "marked none_pass but have a reward > 0"):
      refine.refine_groups(self.rewards, self.hinted_rewards, np.ones(4, bool), self.rng)
    with self.assertRaisesRegex(ValueError, "hinted arrays have 2 prompt rows"):
      refine.refine_groups(self.rewards, self.hinted_rewards[:2], self.none_pass, self.rng)

  def test_apply_plan(self):
    p, g, tp, tr = 4, self.g, 3, 5
    prompt = np.arange(p * g * tp).reshape(p * g, tp)  # un-hinted prompt tokens, flat layout
    response = 1000 + np.arange(p * g * tr).reshape(p * g, tr)
    old_logp = -np.ones((p, g, tr), np.float32)  # grouped layout
    hinted = {
        "response": 5000 + np.arange(3 * g * tr).reshape(3 * g, tr),  # compact: 3 none-pass rows
        "old_logp": -(2.0 + np.arange(3 * g * tr, dtype=np.float32)).reshape(3, g, tr),
        "rewards": self.hinted_rewards[self.none_pass],
        "hinted_prompt": np.full((3 * g, 9), 7),  # not in original -> ignored
    }
    plan = refine.refine_groups(
        self.rewards, hinted["rewards"], self.none_pass, np.random.default_rng(1)
    )
    out = refine.apply_plan(
        plan,
        {"prompt": prompt, "response": response, "old_logp": old_logp, "rewards": self.rewards},
        hinted,
    )
    want_keys = {"prompt", "response", "old_logp", "rewards", "hinted", "old_logp_hinted"}
    self.assertEqual(set(out), want_keys)
    np.testing.assert_array_equal(out["prompt"], prompt)  # every member keeps the un-hinted prompt
    np.testing.assert_array_equal(out["rewards"], plan.rewards)
    self.assertEqual(out["hinted"].shape, (p, g))
    np.testing.assert_array_equal(out["hinted"], plan.hinted)
    for i in range(p):
      for j in range(g):
        flat = i * g + j
        src = plan.source[i, j]
        if src < 0:
          np.testing.assert_array_equal(out["response"][flat], response[flat])
          np.testing.assert_array_equal(out["old_logp_hinted"][i, j], 0.0)
          np.testing.assert_array_equal(out["old_logp"][i, j], old_logp[i, j])
        else:
          row = plan.hint_row[i]
          np.testing.assert_array_equal(out["response"][flat], hinted["response"][row * g + src])
          np.testing.assert_array_equal(out["old_logp_hinted"][i, j], hinted["old_logp"][row, src])
          self.assertEqual(out["rewards"][i, j], 1.0)

  def test_apply_plan_extra_rollouts_baseline(self):
    plan = self.plan()
    orig = {"response": np.zeros((16, 2), np.int32), "old_logp": np.zeros((16, 2), np.float32)}
    extra = {"response": np.ones((16, 2), np.int32), "old_logp": np.ones((16, 2), np.float32)}
    out = refine.apply_plan(plan, orig, extra, as_hinted=False)
    self.assertFalse(out["hinted"].any())
    self.assertNotIn("old_logp_hinted", out)
    np.testing.assert_array_equal(out["response"][:, 0], plan.hinted.reshape(-1))


if __name__ == "__main__":
  absltest.main()
