"""mar's verifier against graders' own test cases (tests/data/grader_cases.jsonl).

The cases are facts from published grader test suites (Math-Verify's tests, Hendrycks
MATH's is_equiv tests, Qwen2.5-Math's math_equal tests) and the graders' rules (Minerva's
"The final answer is $X$. I hope it is correct.", OlympiadBench's judge), written as
(response, gold, expected) under the papers' rule: the last answer statement of the response
(last box, or a later Minerva final-answer phrase) against the gold answer (a gold solution's
last box). Math-Verify cases that read every box were relabelled for the last box (`note`).
Half the cases are `heldout`, fixed by a hash of the id before the verifier was changed.

Known disagreements: bare lists (`10, 4, -2`) are compared in any order, as Math-Verify and
OlympiadBench do and the MATH "enter all solutions" answers need; Hendrycks' string grader
treats them as ordered (2 cases). Tuples and intervals are ordered. Math-Verify's
numina_cases/24 holds `W(x)=1orW(x)=-1` equal to a malformed gold (`\\\\boxed{` unclosed),
which Math-Verify reads as its last number, -1; on the well-formed gold Math-Verify says
unequal too (1 case). The cases of issue 23 item 6 (thousands separators, ordered triples,
plain-text fractions) were written for its fixes (394/407 agreed before them); their split
is sha256(id) parity.

  python tests/grader_cases_test.py --report   # agreement overall and held-out, as JSON
"""

import collections
import json
import os
import sys
import tempfile

from absl.testing import absltest

from mar import verify
from mar.data import datasets

CASES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "grader_cases.jsonl")
MIN_AGREEMENT = 0.99  # 404/407 at issue 23 item 6 (the 3 known disagreements above)
MIN_HELDOUT_AGREEMENT = 0.98  # 193/195 then
_FIELDS = {"id": str, "split": str, "class": str, "expected": bool, "gold": str, "response": str, "source": str}


def load_cases(path: str = CASES_PATH) -> list[dict]:
  """The case records; a malformed record raises naming the file, line and field."""
  cases = []
  for lineno, record in datasets.read_jsonl(path):
    for field, kind in _FIELDS.items():
      if not isinstance(record.get(field), kind):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a {kind.__name__}")
    if record["split"] not in ("dev", "heldout"):
      raise ValueError(f"{path}:{lineno}: field 'split' must be 'dev' or 'heldout'")
    cases.append(record)
  return cases


def grade(cases: list[dict]) -> list[bool]:
  """mar's verdict on each case (3 s deadline, as the papers' grader)."""
  return [verify.is_equivalent(c["response"], c["gold"], timeout=3.0) for c in cases]


def agreement_report(cases: list[dict], verdicts: list[bool]) -> dict:
  """Agreement overall, per split and per class, with the disagreeing case ids."""
  total = collections.Counter()
  agree = collections.Counter()
  misses = []
  for c, v in zip(cases, verdicts):
    for key in ("all", c["split"], "class:" + c["class"]):
      total[key] += 1
      agree[key] += v == c["expected"]
    if v != c["expected"]:
      misses.append(c)
  return {
      "agreement": {k: round(agree[k] / total[k], 4) for k in sorted(total)},
      "counts": dict(sorted(total.items())),
      "disagreements": [
          f"{c['id']} ({c['split']}, {c['class']}): expected {c['expected']}, gold {c['gold'][:60]!r}, "
          f"response ...{c['response'][-80:]!r}"
          for c in misses
      ],
  }


class GraderCasesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cases = load_cases()
    cls.report = agreement_report(cls.cases, grade(cls.cases))

  def test_enough_cases_of_every_class(self):
    self.assertGreaterEqual(len(self.cases), 300)
    classes = collections.Counter(c["class"] for c in self.cases)
    for name in ("decimal_comma", "trailing_backslash", "answer_own_line", "minerva_final_answer",
                 "base_n", "ordered_list", "thousands_separator", "ordered_triple",
                 "fraction_last_number"):
      self.assertGreaterEqual(classes[name], 5, name)
    splits = collections.Counter(c["split"] for c in self.cases)
    self.assertGreater(splits["heldout"], 0.4 * len(self.cases))

  def test_ids_are_unique(self):
    ids = [c["id"] for c in self.cases]
    self.assertEqual(len(ids), len(set(ids)))

  def test_agreement_overall_and_heldout(self):
    agreement = self.report["agreement"]
    msg = "disagreements:\n" + "\n".join(self.report["disagreements"])
    self.assertGreaterEqual(agreement["all"], MIN_AGREEMENT, msg)
    self.assertGreaterEqual(agreement["heldout"], MIN_HELDOUT_AGREEMENT, msg)

  def test_bad_record_names_line_and_field(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "cases.jsonl")
      with open(path, "w") as f:
        f.write(json.dumps(self.cases[0]) + "\n")
        f.write(json.dumps({**self.cases[0], "expected": "yes"}) + "\n")
      with self.assertRaisesRegex(ValueError, r"cases.jsonl:2: field 'expected'"):
        load_cases(path)


if __name__ == "__main__":
  if "--report" in sys.argv:
    all_cases = load_cases()
    print(json.dumps(agreement_report(all_cases, grade(all_cases)), indent=2))
  else:
    absltest.main()
