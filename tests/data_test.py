"""Tests for mar.data: benchmark/training loaders, error messages, synthetic tasks."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from mar.data import datasets
from mar.data import synthetic
from mar.data.datasets import DatasetError
from testutil import DATA_DIR

_TRAIN = os.path.join(DATA_DIR, "train", "math_lvl3to5_8k.jsonl")


class BenchmarkTest(parameterized.TestCase):

  @parameterized.parameters(
      ("math500", 500, 0, "\\left( 3, \\frac{\\pi}{2} \\right)"),
      ("aime24", 30, 7, "025"),
      ("aime25", 30, 0, "70"),
      ("amc23", 40, 0, "27"),
      ("amc23", 40, 15, "-1"),
      ("minerva_math", 272, 0, "1.6"),
      ("olympiadbench", 675, 0, "2"),
      ("gsm8k", 1319, 0, "18"),
  )
  def test_counts_and_golds(self, name, count, index, gold):
    examples = datasets.load_benchmark(name, DATA_DIR)
    self.assertLen(examples, count)
    self.assertEqual(examples[index].answer, gold)
    self.assertEqual(examples[index].index, index)
    self.assertEqual(examples[index].source, name)

  @parameterized.parameters(*datasets.BENCHMARKS)
  def test_every_record_has_question_and_gold(self, name):
    for ex in datasets.load_benchmark(name, DATA_DIR):
      self.assertTrue(ex.question.strip(), ex)
      self.assertTrue(ex.answer.strip(), ex)
      self.assertEqual(ex.answer, ex.answer.strip())

  def test_gold_rules(self):
    amc = datasets.load_benchmark("amc23", DATA_DIR)
    self.assertFalse([e.answer for e in amc if e.answer.endswith(".0")])
    oly = datasets.load_benchmark("olympiadbench", DATA_DIR)
    self.assertFalse([e.answer for e in oly if "$" in e.answer.replace("\\$", "")])
    gsm = datasets.load_benchmark("gsm8k", DATA_DIR)
    self.assertTrue(all(e.answer.lstrip("-").replace(".", "").isdigit() for e in gsm))
    minerva = datasets.load_benchmark("minerva_math", DATA_DIR)
    self.assertIn("4.5e33", [e.answer for e in minerva])
    self.assertNotIn("\\boxed", "".join(e.answer for e in minerva))

  def test_olympiad_multiple_answers_lose_all_dollars(self):
    with open(os.path.join(DATA_DIR, "benchmarks", "olympiadbench", "test.jsonl")) as f:
      records = [json.loads(line) for line in f]
    examples = datasets.load_benchmark("olympiadbench", DATA_DIR)
    for r, ex in zip(records, examples):
      if r["final_answer"][0] == "$69$,$84$":
        self.assertEqual(ex.answer, "69,84")
        break
    else:
      self.fail("expected the '$69$,$84$' record")

  def test_math500_answer_is_last_box_of_solution(self):
    from mar.verify import extract_boxed  # pylint: disable=g-import-not-at-top

    path = datasets.benchmark_path("math500", DATA_DIR)
    for (_, r), ex in zip(datasets.read_jsonl(path), datasets.load_benchmark("math500", DATA_DIR)):
      self.assertEqual(ex.answer, extract_boxed(r["solution"]))

  def test_data_dir_may_be_the_benchmarks_folder(self):
    a = datasets.load_benchmark("aime24", DATA_DIR)
    b = datasets.load_benchmark("aime24", os.path.join(DATA_DIR, "benchmarks"))
    self.assertEqual(a, b)

  def test_unknown_benchmark(self):
    with self.assertRaisesRegex(DatasetError, "unknown benchmark 'math5000'"):
      datasets.load_benchmark("math5000", DATA_DIR)

  def test_missing_data_dir(self):
    with self.assertRaisesRegex(DatasetError, "aime24/test.jsonl: no such file"):
      datasets.load_benchmark("aime24", "/nonexistent/dir")


class TrainTest(absltest.TestCase):

  def test_math_lvl3to5_drops_two_empty_answers(self):
    with self.assertLogs("absl", level="INFO") as logs:
      examples = datasets.load_train_jsonl(_TRAIN)
    self.assertLen(examples, 8523 - 2)
    self.assertTrue(any("8521 examples, 2 dropped" in line for line in logs.output), logs.output)
    self.assertTrue(all(e.answer for e in examples))
    self.assertEqual(examples[0].answer, "118")
    self.assertEqual(examples[0].source, "math_lvl3to5_8k")
    self.assertTrue(examples[0].question.startswith("Let $a$ and $b$"))

  def test_configurable_fields(self):
    path = os.path.join(DATA_DIR, "train", "math_train_deepscaler.jsonl")
    examples = datasets.load_train_jsonl(path, question_key="problem", answer_key="answer", source="deepscaler")
    self.assertLen(examples, 7474 - 4)  # two null and two empty answers
    self.assertEqual(examples[0].source, "deepscaler")


class MalformedInputTest(absltest.TestCase):

  def _write(self, text):
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    self.addCleanup(os.remove, path)
    return path

  def test_bad_json_names_file_and_line(self):
    path = self._write('{"prompt": "q", "answer": "1"}\n{"prompt": "q2", "answer": \n')
    with self.assertRaisesRegex(DatasetError, f"{path}:2: invalid JSON"):
      datasets.load_train_jsonl(path)

  def test_missing_field_names_file_line_field(self):
    path = self._write('{"prompt": "q", "answer": "1"}\n\n{"question": "q2", "answer": "2"}\n')
    with self.assertRaisesRegex(DatasetError, f"{path}:3: field 'prompt': missing"):
      datasets.load_train_jsonl(path)

  def test_wrong_type_says_expected_and_found(self):
    path = self._write('{"prompt": ["q"], "answer": "1"}\n')
    with self.assertRaisesRegex(DatasetError, f"{path}:1: field 'prompt': expected str, found list"):
      datasets.load_train_jsonl(path)

  def test_non_object_record(self):
    path = self._write("[1, 2]\n")
    with self.assertRaisesRegex(DatasetError, f"{path}:1: expected a JSON object, found list"):
      datasets.load_train_jsonl(path)

  def test_empty_file(self):
    path = self._write("\n\n")
    with self.assertRaisesRegex(DatasetError, f"{path}: empty file"):
      datasets.load_train_jsonl(path)

  def test_wrong_path(self):
    with self.assertRaisesRegex(DatasetError, "/no/such/train.jsonl: no such file"):
      datasets.load_train_jsonl("/no/such/train.jsonl")

  def test_benchmark_gold_rule_errors(self):
    root = tempfile.mkdtemp()
    self.addCleanup(lambda: __import__("shutil").rmtree(root))
    os.makedirs(os.path.join(root, "minerva_math"))
    path = os.path.join(root, "minerva_math", "test.jsonl")
    with open(path, "w") as f:
      f.write('{"problem": "p", "solution": "no box here"}\n')
    with self.assertRaisesRegex(DatasetError, f"{path}:1: field 'solution': expected a \\\\boxed"):
      datasets.load_benchmark("minerva_math", root)

  def test_numeric_training_answers(self):
    path = self._write('{"prompt": "q", "answer": 27.0}\n{"prompt": "q", "answer": 2.5}\n')
    self.assertEqual([e.answer for e in datasets.load_train_jsonl(path)], ["27", "2.5"])


class SyntheticTest(parameterized.TestCase):

  def test_seeded(self):
    a = synthetic.make_arithmetic_examples(50, seed=3)
    self.assertEqual(a, synthetic.make_arithmetic_examples(50, seed=3))
    self.assertNotEqual(a, synthetic.make_arithmetic_examples(50, seed=4))

  @parameterized.parameters(
      dict(min_digits=1, max_digits=1, num_operands=2, ops="+"),
      dict(min_digits=2, max_digits=3, num_operands=3, ops="+-"),
      dict(min_digits=1, max_digits=2, num_operands=4, ops="+-*"),
  )
  def test_answers_and_knobs(self, min_digits, max_digits, num_operands, ops):
    examples = synthetic.make_arithmetic_examples(
        200, seed=0, min_digits=min_digits, max_digits=max_digits, num_operands=num_operands, ops=ops
    )
    for i, ex in enumerate(examples):
      self.assertEqual(ex.index, i)
      self.assertTrue(ex.question.startswith("What is ") and ex.question.endswith("?"))
      expr = ex.question[len("What is ") : -1]
      self.assertEqual(str(eval(expr)), ex.answer)  # pylint: disable=eval-used
      numbers = expr.replace("-", " ").replace("+", " ").replace("*", " ").split()
      self.assertLen(numbers, num_operands)
      for n in numbers:
        self.assertBetween(len(n), min_digits, max_digits)
      self.assertTrue(set(c for c in expr if not c.isdigit()) <= set(ops))
      self.assertLess(len(ex.question), 40)

  def test_no_negatives(self):
    examples = synthetic.make_arithmetic_examples(100, seed=1, ops="-", allow_negative=False)
    self.assertTrue(all(int(e.answer) >= 0 for e in examples))

  @parameterized.parameters(
      dict(min_digits=0), dict(min_digits=3, max_digits=2), dict(num_operands=1), dict(ops="/"), dict(ops="")
  )
  def test_bad_knobs(self, **kw):
    with self.assertRaises(ValueError):
      synthetic.make_arithmetic_examples(5, seed=0, **kw)


if __name__ == "__main__":
  absltest.main()
