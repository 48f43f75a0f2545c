"""Tests for mar.verify: extraction, equivalence tables, fuzzing, the worker pool."""

import fractions
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from mar import verify
from mar.verify import equivalence
from mar.verify import normalize
from mar.verify import numeric
from testutil import DATA_DIR

# A returned verdict may be late by this much on a loaded 2-core machine; the
# property tested is "bounded by the deadline", not speed.
_SLACK_S = 10.0  # 5 s was exceeded (7.0 s) at a load average of 11

# (prediction, gold): equal. Golds cover the formats of all benchmarks.
EQUAL = [
    # integers: aime (zero-padded), amc (float in the file), gsm8k
    ("204", "204"),
    ("25", "025"),
    ("73", "073"),
    ("27", "27.0"),
    ("27.0", "27"),
    ("-1", "-1"),
    ("3159", "3159"),
    ("1000", "1,000"),
    # decimals, relative tolerance 1e-4
    ("0.35625", ".35625"),
    (".5", "0.5"),
    ("3.50", "3.5"),
    ("1.60003", "1.6"),
    ("0.0000672", ".0000672"),
    ("1.1", "1.1"),
    # fractions and mixed numbers
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "\\frac12"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac34", "0.75"),
    ("0.34", "\\dfrac{17}{50}"),
    ("4\\frac{2}{3}", "\\frac{14}{3}"),
    ("137.5", "137 \\frac{1}{2}"),
    ("1.8", "1\\frac{4}{5}"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("\\frac{9}{19}", "\\frac9{19}"),
    ("\\frac{1}{3}", "0.3333"),
    ("-\\frac{35}{9}", "-\\frac{35}{9}"),
    ("\\frac{-1}{1997}", "-\\frac{1}{1997}"),
    # percentages (Qwen2.5-Math: gold, gold/100, gold*100)
    ("50\\%", "50"),
    ("0.5", "50\\%"),
    ("50", "0.5"),
    ("17.5", "17.5%"),
    ("0.175", "17.5%"),
    ("8", "$8 \\%$"),
    ("62.5\\%", "62.5%"),
    # scientific notation (minerva golds are written 4.5e33)
    ("4.5\\times 10^{33}", "4.5e33"),
    ("4.5 \\cdot 10^{33}", "4.5e33"),
    ("4.50e33", "4.5e33"),
    ("1\\times10^{-5}", "1e-5"),
    ("10^{-5}", "1e-5"),
    ("2.7778 \\times 10^{-6}", "2.7778e-6"),
    ("3 \\times 10^8", "3e8"),
    ("0.065", "6.5e-2"),
    ("14903", "1.4903e4"),
    # units, degrees, money, thousands separators
    ("90", "90^\\circ"),
    ("90^{\\circ}", "90^\\circ"),
    ("90°", "90"),
    ("5.4", "5.4 \\text{ cents}"),
    ("864", "864 \\mbox{ inches}^2"),
    ("15", "15\\mbox{ cm}^2"),
    ("1.6 \\mathrm{~cm}", "1.6"),
    ("32348", "\\$32,\\!348"),
    ("\\$18.90", "18.9"),
    ("\\$36", "36"),
    ("10080", "10,\\!080"),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100"),
    ("58500", "58,500"),
    ("42 apples", "42"),
    ("18.8^\\circ", "18.8^{\\circ}"),
    # radicals and symbolic expressions
    ("2\\sqrt{5}", "\\sqrt{20}"),
    ("11\\sqrt{2}", "11\\sqrt2"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("3\\sqrt{13}", "\\sqrt{117}"),
    ("\\pi", "\\pi"),
    ("2\\pi+18", "18+2\\pi"),
    ("x^3+3x-6", "-6+3x+x^3"),
    ("ab+2a+5b+10", "(a+5)(b+2)"),
    ("\\frac{11}{20}+\\frac{9a}{20}", "\\frac{11+9a}{20}"),
    ("\\frac{1}{2(n+1)}", "\\frac{1}{2 n+2}"),
    ("n^2+1", "$n^{2}+1$"),
    ("2^{1009}", "2^{1009}"),
    ("\\binom{2n}{n}", "$\\binom{2n}{n}$"),
    ("\\frac{\\sqrt{3}}{2}", "0.8660"),
    ("0.866", "\\frac{\\sqrt{3}}{2}"),
    ("4-2\\sqrt{3}", "$4-2 \\sqrt{3}$"),
    ("\\frac{8}{\\sqrt[3]{7}}", "$\\frac{8}{\\sqrt[3]{7}}$"),
    # complex numbers
    ("6-5i", "6 - 5i"),
    ("7i-2", "-2 + 7i"),
    ("2i+1", "1+2i"),
    # `x = 3` vs `3`, equations
    ("x=5", "5"),
    ("5", "x=5"),
    ("2n-1", "$k=2 n-1$"),
    ("k=2n-1", "$k=2 n-1$"),
    ("x+1", "$f(x)=x+1$"),
    ("y=3+2x", "y = 2x + 3"),
    ("5x-7y+11z+4=0", "5x - 7y + 11z + 4 = 0"),
    # tuples, intervals, sets, lists
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(6,31,-1)", "(6, 31, -1)"),
    ("(3,4]", "\\left(3,4\\right]"),
    ("(-\\infty,0]", "(-\\infty, 0]"),
    ("(2,\\infty)", "(2, \\infty)"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("[-2,7]", "x \\in [-2,7]"),
    ("\\left[\\frac{1}{2}, 8\\right]", "$[\\frac{1}{2}, 8]$"),
    ("-2, 1", "1,-2"),
    ("7, 3, 5", "3, 5, 7"),
    ("\\{-2, 1+\\sqrt{5}, 1-\\sqrt{5}\\}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"),
    ("(4,5,7),(1,8,19),(2,7,13)", "$(1,8,19), (2,7,13), (4,5,7)$"),
    ("69, 84", "$69$,$84$"),
    ("\\frac{1}{3}, -2, 5", "$\\frac{1}{3},-2,5$"),
    (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
    ),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
    # plain-text answers and multiple choice
    ("\\text{Evelyn}", "Evelyn"),
    ("evelyn", "\\text{Evelyn}"),
    ("east", "\\text{east}"),
    ("\\text{ellipse}", "\\text{ellipse}"),
    ("Even", "\\text{even}"),
    ("C", "\\text{(C)}"),
    ("(C)", "\\text{(C)}"),
    ("\\textbf{(E)}", "\\text{(E)}"),
    ("B", "(B)"),
    # base subscripts
    ("52_8", "52_8"),
    ("4210_{5}", "4210_{5}"),
    # whole responses: last box, else the last math expression or number
    ("We compute it, so the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("First \\boxed{3}, then I fix it: \\boxed{4}", "4"),
    ("Therefore we conclude that $x = 4$.", "4"),
    ("The final result is 42.", "42"),
    ("**Answer:** the value is $\\frac{3}{4}$", "0.75"),
    ("Step 1: 2+2=4\nStep 2: so 12", "12"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    # issue 14 item 10: decimal commas where no thousands separator is meant
    ("1000,99", "1000.99"),
    ("1.22", "1,22"),
    ("0.111", "0,111"),
    ("The length is 2,75 m.", "2.75"),
    ("14 {, }916", "14{,}916"),
    # a trailing backslash ends no value
    ("185\\", "185"),
    ("The answer is \\boxed{185\\ }", "185"),
    ("x+1 \\\\", "1+x"),
    # base-n numerals, digit for digit
    ("1112122_3", "1112122_{3}"),
    ("\\boxed{10001_2}", "10001_2"),
    ("59_{10}", "59"),
    # a Minerva final-answer phrase after earlier boxes is the last answer statement
    ("So \\boxed{3}. Wait, that is off by two. Final Answer: The final answer is $5$. I hope it is correct.", "5"),
    ("\\boxed{1} The final answer is $2$. I hope it is correct. Then \\boxed{3}", "3"),
    ("\\boxed{3}. The final answer is $", "3"),
    ("Answer:\n$$\n12\n$$", "12"),
    # a set gold is unordered even against a tuple
    ("(2,1)", "\\{1,2\\}"),
    # issue 23 item 6: MATH's thousands separators, in a list too; ordered triples
    ("The answer is $\\boxed{11,\\! 111,\\! 111,\\! 100}$.", "11111111100"),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100"),
    ("1{,}000", "1000"),
    ("(1{,}000, 2)", "(1000, 2)"),
    ("(1,000, 2, 3)", "(1000,2,3)"),
    ("1,000, 2,500", "2500, 1000"),
    ("\\left(1,2,3\\right)", "(1, 2, 3)"),
    ("(0.5, 0, -3)", "\\left( \\frac{1}{2}, 0, -3 \\right)"),
    # a plain-text fraction is the last number whole
    ("So the probability that Alice wins is 2/3.", "\\frac{2}{3}"),
]

# (prediction, gold): not equal.
NOT_EQUAL = [
    ("3", "4"),
    ("-3", "3"),
    ("27.5", "27"),
    ("10001", "10000"),
    ("26", "025"),
    ("1.6002", "1.6"),
    ("\\frac{1}{3}", "0.33"),
    ("\\sqrt{2}", "1.414"),
    ("\\pi", "3.14"),
    ("1e-6", "1e-5"),
    ("4.5\\times10^{34}", "4.5e33"),
    ("3.1\\times 10^{8}", "3e8"),
    ("(3,4)", "(3,4]"),
    ("[1,2)", "(1,2)"),
    ("(2,1)", "(1,2)"),
    ("(1,2),(3,4)", "(1,2)"),
    ("(2,102)", "(2,12) \\cup (12,102)"),
    ("2,1,3", "1,2"),
    ("q-p", "p - q"),
    ("5-6i", "6 - 5i"),
    ("x^2", "x^3"),
    ("2x", "2y"),
    ("2^{1008}", "2^{1009}"),
    ("y=5", "x=5"),
    ("west", "\\text{east}"),
    ("odd", "\\text{even}"),
    ("(D)", "\\text{(C)}"),
    ("12", "\\text{(C)}"),
    ("C", "\\text{(B)}"),
    ("", "3"),
    ("\\boxed{}", "3"),
    ("x", "3"),
    ("\\infty", "3"),
    ("I do not know.", "3"),
    ("\\boxed{5", "5x"),
    ("The answer is \\boxed{3} and then \\boxed{5}", "3"),
    ("\\frac{1}{0}", "1"),
    ("9^{9^{9^{9}}}", "1"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    # issue 14 item 10 repros and classes
    ("1112112_3", "1112122_3"),  # 1e-5 apart as numbers, different numerals
    ("\\boxed{1112112_3}", "1112122_3"),
    ("1000001_2", "1000000_2"),
    ("2012_3", "59"),
    ("So \\boxed{3}. Wait, that is off by two. Final Answer: The final answer is $5$. I hope it is correct.", "3"),
    ("32, 349", "32349"),  # a list, not a thousands separator
    ("1,000", "1.0"),  # thousands, not a decimal comma
    ("999,99", "1000.99"),
    ("Answer $ \n 9 \n $", "9"),
    ("Answer \\( \n 9 \n \\)", "9"),
    ("(4, 10, -2)", "10, 4, -2"),
    ("4, 10, -2", "(10, 4, -2)"),
    ("\\{4,10,-2\\}", "(10,4,-2)"),
    ("[3, 1]", "[1, 3]"),
    # issue 23 item 6: `,\\!` separates thousands only before three digits; triples in order
    ("1,\\!2", "12"),
    ("(1,\\!2,3)", "(12,3)"),
    ("1,2", "12"),
    ("12", "1,2"),
    ("11,\\! 111,\\! 111,\\! 101", "11111111100"),
    ("(1,000,2, 3)", "(1000,2,3)"),  # `1,000,2`: no thousands group ends the item
    ("(1,2,3)", "(1,3,2)"),
    ("(1,2,3)", "(1,23)"),
    ("The ratio of the two areas is 2/3.", "3"),
]

BOXED = [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("a \\boxed{1} b \\boxed{2}", "2"),
    ("a \\boxed{1} b \\boxed{2", None),
    ("x \\fbox{7} y", "7"),
    ("\\boxed{1} \\fbox{2}", "2"),
    ("\\boxed {3}", "3"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{a_{b_{c}}}", "a_{b_{c}}"),
    ("\\boxed{}", ""),
    ("\\boxed{" * 200, None),
    ("no box at all", None),
    ("}}}\\boxed{x}}}", "x"),
    ("\\boxed{\\boxed{4}}", "4"),
]

ANSWERS = [
    ("The answer is $x^2$ and then $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("so it is 3.5. then $y$", "y"),
    ("$y$, so it is 3.5.", "3.5"),
    ("costs \\$5 and then 6", "6"),
    ("$$ 42 $$", "42"),
    ("\\[ \\frac12 \\]", "\\frac12"),
    ("value 1,234 total", "1,234"),
    ("\\boxed{7} and 8", "7"),
    ("nothing here", None),
    ("", None),
    ("\\boxed{3} then The final answer is $5$. I hope it is correct.", "5"),
    ("The final answer is $\\boxed{15}$. I hope it is correct.", "15"),
    ("The final answer is $7$. I hope it is correct. So \\boxed{8}", "8"),
    ("\\boxed{3}. The final answer is $", "3"),
    ("Answer $\n 9 \n$", None),
    ("Answer \\(\n 9 \n\\)", None),
    ("Answer $$\n 9 \n$$", "9"),
    ("Answer \\[\n 9 \n\\]", "9"),
    ("x is $ 7 $ and then $\n 9 \n$", "7"),
    ("Soucis : 2,74 $ a..", "2,74"),
    ("the probability is 2/3. <|im_start|>user", "2/3"),
    ("so x = -1/2", "-1/2"),
    ("on 12/25/2020", "2020"),
]


def _benchmark_golds():
  from mar.data import datasets  # pylint: disable=g-import-not-at-top

  return {
      name: [ex.answer for ex in datasets.load_benchmark(name, DATA_DIR)]
      for name in datasets.BENCHMARKS
  }


class ExtractTest(parameterized.TestCase):

  @parameterized.parameters(*BOXED)
  def test_extract_boxed(self, text, want):
    self.assertEqual(verify.extract_boxed(text), want)
    self.assertEqual(verify.has_closed_box(text), want is not None)

  @parameterized.parameters(*ANSWERS)
  def test_extract_answer(self, text, want):
    self.assertEqual(verify.extract_answer(text), want)

  def test_non_strings(self):
    for x in (None, 3, b"\\boxed{1}", ["\\boxed{1}"]):
      self.assertIsNone(verify.extract_boxed(x))
      self.assertIsNone(verify.extract_answer(x))
      self.assertFalse(verify.has_closed_box(x))


class EquivalenceTest(parameterized.TestCase):

  @parameterized.parameters(*EQUAL)
  def test_equal(self, pred, gold):
    self.assertTrue(verify.is_equivalent(pred, gold), f"{pred!r} should equal {gold!r}")

  @parameterized.parameters(*NOT_EQUAL)
  def test_not_equal(self, pred, gold):
    self.assertFalse(verify.is_equivalent(pred, gold, timeout=1.0), f"{pred!r} should not equal {gold!r}")

  def test_numeric_gold(self):
    self.assertTrue(verify.is_equivalent("27", 27.0))
    self.assertTrue(verify.is_equivalent("2.5", 2.5))
    self.assertFalse(verify.is_equivalent("28", 27.0))

  def test_bad_types_are_wrong(self):
    for pred, gold in ((None, "1"), (1, "1"), ("1", None), ("1", ["1"])):
      self.assertFalse(verify.is_equivalent(pred, gold))

  def test_every_benchmark_gold_equals_itself_boxed(self):
    for name, golds in _benchmark_golds().items():
      for gold in golds:
        response = f"Reasoning... so the answer is $\\boxed{{{gold}}}$."
        self.assertTrue(verify.is_equivalent(response, gold), f"{name}: {gold!r}")

  def test_math500_solutions_match_answers(self):
    with open(os.path.join(DATA_DIR, "benchmarks", "math500", "test.jsonl")) as f:
      records = [json.loads(line) for line in f]
    for r in records:
      self.assertTrue(verify.is_equivalent(r["solution"], r["answer"]), r["answer"])

  def test_numeric_gold_plus_one_is_wrong(self):
    golds = [g for gs in _benchmark_golds().values() for g in gs]
    ints = [g for g in golds if g.lstrip("-").isdigit()]
    self.assertGreater(len(ints), 1000)
    for g in ints[::7]:
      self.assertFalse(verify.is_equivalent(str(int(g) + 1), g), g)

  def test_timeout_is_wrong_and_bounded(self):
    start = time.monotonic()
    self.assertFalse(verify.is_equivalent("9^{9^{9^{9}}}", "2", timeout=0.5))
    self.assertLess(time.monotonic() - start, 0.5 + _SLACK_S)

  def test_deadline_restores_handler_and_timer(self):
    before = signal.getsignal(signal.SIGALRM)
    verify.is_equivalent("x^{x^{x}}", "y", timeout=0.2)
    self.assertIs(signal.getsignal(signal.SIGALRM), before)
    self.assertEqual(signal.getitimer(signal.ITIMER_REAL), (0.0, 0.0))

  def test_deadline_never_interrupts_an_import(self):
    # In a fresh interpreter, a deadline far shorter than `import sympy` must
    # fire only after the import, leaving sympy whole.
    code = (
        "import time\n"
        "from mar.verify.equivalence import deadline, VerificationTimeout\n"
        "try:\n"
        "  with deadline(0.001):\n"
        "    import sympy\n"
        "    while True: time.sleep(0.01)\n"
        "except VerificationTimeout:\n"
        "  print(sympy.simplify(sympy.sympify('sin(x)**2+cos(x)**2')))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    self.assertEqual(out.stdout.strip(), "1", out.stderr)

  def test_alarm_waits_out_collector_callbacks(self):
    # The collector runs gc.callbacks hooks, weakref callbacks (WeakKeyDictionary's are in
    # weakref.py) and __del__ methods wherever it happens to run; an exception raised there
    # is only printed, so the alarm must wait for the next firing instead.
    def frame_in(filename, name="<module>"):
      ns = {"sys": sys}
      exec(compile(f"def {name}():\n  return sys._getframe()\nframe = {name}()", filename,
                   "exec"), ns)
      return ns["frame"]

    def gc_hook(*_):
      return sys._getframe()

    equivalence._Alarm.armed = True
    gc.callbacks.append(gc_hook)
    try:
      equivalence._on_alarm(signal.SIGALRM, frame_in(weakref.__file__, "remove"))
      equivalence._on_alarm(signal.SIGALRM, frame_in(__file__, "__del__"))
      equivalence._on_alarm(signal.SIGALRM, gc_hook())
      with self.assertRaises(equivalence.VerificationTimeout):
        equivalence._on_alarm(signal.SIGALRM, frame_in(__file__, "remove"))
    finally:
      equivalence._Alarm.armed = False
      gc.callbacks.remove(gc_hook)

  def test_off_main_thread_uses_pool(self):
    out = {}

    def run():
      out["eq"] = verify.is_equivalent("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}")
      out["ne"] = verify.is_equivalent("\\sqrt{3}", "\\frac{1}{2}\\sqrt{3}")

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    self.assertEqual(out, {"eq": True, "ne": False})


class NormalizeTest(parameterized.TestCase):

  @parameterized.parameters(
      ("$\\frac{1}{2}$.", "\\frac{1}{2}"),
      ("\\left( 3, \\frac{\\pi}{2} \\right)", "( 3, \\frac{\\pi}{2} )"),
      ("10,\\!080", "10080"),
      ("\\dfrac43", "\\frac{4}{3}"),
      ("\\text{(C)}", "(C)"),
      ("5.4 \\text{ cents}", "5.4"),
      ("\\boxed{x}", "x"),
      ("90^\\circ", "90"),
      ("\\sqrt2", "\\sqrt{2}"),
      (".5", "0.5"),
      ("185\\", "185"),
      ("185 \\\\", "185"),
      ("14 {, }916", "14916"),
      ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
      ("1{,}000.5", "1000.5"),
      ("1,\\!2", "1,2"),  # no thousands group follows: a comma
      ("(1,\\!2,3)", "(1,2,3)"),
      ("1{,}5", "1,5"),
  )
  def test_normalize(self, raw, want):
    self.assertEqual(normalize.normalize(raw), want)

  @parameterized.parameters(
      ("27", 27), ("-3.5", -3.5), ("1,234", 1234), ("4.5e3", 4500), ("2\\times10^{3}", 2000),
      ("10^{-2}", 0.01), ("\\frac{3}{4}", 0.75), ("-3/4", -0.75), ("1\\frac{1}{2}", 1.5), ("5 cm", 5),
  )
  def test_parse_number(self, s, want):
    self.assertEqual(normalize.parse_number(s), fractions.Fraction(str(want)))

  @parameterized.parameters("x", "3x", "1e999", "\\frac{1}{0}", "2^{10}", "1,2", "", "32, 349", "1, 000")
  def test_not_a_plain_number(self, s):
    self.assertIsNone(normalize.parse_number(s))

  @parameterized.parameters(
      ("1,000, 2", "1000, 2"), ("(1,000,000, 2,500)", "(1000000, 2500)"), ("11,000, 1.5", "11000, 1.5"),
      ("1,000,2", "1,000,2"), ("1,000,2, 3", "1,000,2, 3"), ("1,0000, 2", "1,0000, 2"),
      ("x_1,000, 2", "x_1,000, 2"), ("0,100, 2", "0,100, 2"),
  )
  def test_join_item_thousands(self, s, want):
    self.assertEqual(normalize.join_item_thousands(s), want)

  @parameterized.parameters(
      ("1000,99", "1000.99"), ("0,111", "0.111"), ("1,22", "1.22"), ("-3,5", "-3.5"), ("1,0000", "1"),
      ("1,000", None), ("12,345", None), ("1,000,000", None), ("1, 5", None), ("x,5", None),
  )
  def test_decimal_comma(self, s, want):
    got = normalize.decimal_comma(s)
    self.assertEqual(got, None if want is None else fractions.Fraction(want))

  @parameterized.parameters(
      ("1112122_3", "1112122", 3), ("4210_{5}", "4210", 5), ("A3_{16}", "A3", 16), ("59_{10}", "59", 10),
      ("1112132_3", None, None), ("x_3", None, None), ("12_1", None, None), ("12_{40}", None, None),
      ("a_{16}", None, None), ("12", None, None),
  )
  def test_base_numeral(self, s, digits, base):
    got = normalize.parse_base_numeral(s)
    self.assertEqual(got, None if digits is None else normalize.BaseNumeral(digits, base))


class NumericTest(parameterized.TestCase):

  @parameterized.parameters(
      ("3\\sqrt{13}", 3 * 13**0.5),
      ("\\frac{\\sqrt{3}}{2}", 3**0.5 / 2),
      ("\\frac12+\\frac{1}{3}", 5 / 6),
      ("2^{10}", 1024.0),
      ("10^-3", 0.001),
      ("(-2)^3", -8.0),
      ("\\sqrt[3]{27}", 3.0),
      ("18+2\\pi", 18 + 2 * 3.141592653589793),
      ("2(9)", 18.0),
      ("\\frac{4 \\cdot {9}}{4}", 9.0),
      ("\\ln 2 \\times 3", 3 * 0.6931471805599453),
  )
  def test_evaluate(self, s, want):
    v = numeric.evaluate(s)
    self.assertIsNotNone(v)
    self.assertAlmostEqual(v.value, want, places=12)
    self.assertLess(v.err, 1e-12 * max(abs(want), 1))

  @parameterized.parameters(
      "x", "e", "i", "1,2", "\\infty", "3!", "1\\frac{4}{5}", "2^23", "9^{9^{9}}", "\\frac{1}{0}",
      "\\sqrt{-1}", "x^2", "(1", "", "\\frac{" * 100, "(" * 200 + "1" + ")" * 200,
  )
  def test_outside_grammar(self, s):
    self.assertIsNone(numeric.evaluate(s))

  def test_cancellation_is_undecided(self):
    one = numeric.evaluate("1")
    self.assertIsNone(numeric.compare(numeric.evaluate("10^{20}+1-10^{20}"), one, 1e-4))
    self.assertIsNone(numeric.compare(numeric.evaluate("\\sin\\pi"), numeric.evaluate("0"), 1e-4))
    self.assertTrue(numeric.compare(numeric.evaluate("\\frac{1}{3}"), numeric.evaluate("0.33334"), 1e-4))
    self.assertFalse(numeric.compare(numeric.evaluate("\\sqrt{2}"), numeric.evaluate("1.414"), 1e-4))


def _adversarial_strings():
  return [
      "\\boxed{" * 200,
      "}" * 500 + "{" * 500,
      "9^{9^{9^{9}}}",
      "\\boxed{9^{9^{9^{9}}}}",
      "10^{10^{10}}",
      "(10^{10})!",
      "2^{10000000000}",
      "x^{x^{x^{x^{x^{x}}}}}",
      "\x00" * 100,
      "\\boxed{1\x002}",
      "1" * 100_000,
      "\\boxed{" + "1" * 100_000 + "}",
      "a" * 1_000_000 + " \\boxed{3}",
      "$" * 10_000,
      "\\(" * 5000,
      "{" * 5000 + "}" * 5000,
      "\\frac{" * 1000,
      "\\sqrt{" * 300 + "2" + "}" * 300,
      "\\left(" * 1000,
      "\\begin{pmatrix}" * 50,
      "\\boxed{" * 100 + "1" + "}" * 100,
      "1e99999",
      "nan",
      "inf",
      "-\\infty",
      "\ud800\udfff",
      "\u202e\u0301" * 50,
      "\\\\" * 1000,
      "\\text{" * 300,
      "(" * 3000 + ")" * 3000,
      ",".join(["1"] * 5000),
      "(" + ",".join(["x"] * 200) + ")",
      "\\{" + ",".join(str(i) for i in range(100)) + "\\}",
      "\\int_0^\\infty e^{-x^2} dx",
      "\\sum_{n=1}^{\\infty} \\frac{1}{n^2}",
      "\\lim_{x\\to 0} \\frac{\\sin x}{x}",
      "x = y = z = 1",
      "=" * 1000,
      "%" * 1000,
      "\\%",
      "\\frac{1}{0}",
      "0^0",
      "\\log 0",
      "The final answer is $" * 5000,
      "\\boxed{1} final answer is $2$" * 2000,
      "$ \n" * 5000,
      "\\( \n" * 5000 + "\\)",
      "1," * 20_000,
      "1000,99" * 5000,
      "1" * 5000 + "_3",
      "Z" * 300 + "_{36}",
      "1,\\! " * 5000,
      "1" + " " * 50_000 + ",\\!" + " " * 50_000 + "000",
      "1{,}" * 5000,
      "(" + "1,000, " * 3000 + ")",
      "(" + "1,000, " * 250 + "1,000,2)",  # under MAX_ANSWER_CHARS: reaches the list rule
      "1" + " " * 900 + ",\\!" + " " * 900 + "00",
      "1,000," * 5000 + " 2",
      "1/" * 20_000,
  ]


_PIECES = [
    "\\boxed{", "{", "}", "\\frac", "\\sqrt", "^", "_", "9", "1", "0", ".", "-", "+", "x", "=", ",",
    "(", ")", "[", "]", "\\{", "\\}", "$", "\\left(", "\\right)", "\\text{", "\\pi", "\\infty", "i",
    "e", "%", "\\%", " ", "\n", "!", "\x00", "\\cdot", "10^{", "\\times", "\\cup", "\\begin{pmatrix}",
    "\\\\", "&", "\\end{pmatrix}", "\\le", "<", "\\pm", "\\$", "°", "é", "\\", "*", "/",
    ",\\!", "{,}", "000", ", ",
]


def _random_strings(n, seed):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    k = rng.randint(0, 40)
    if rng.random() < 0.2:
      out.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(k)))
    else:
      out.append("".join(rng.choice(_PIECES) for _ in range(k)))
  return out


class FuzzTest(parameterized.TestCase):

  def _check_in_process(self, strings, timeout):
    golds = ["3", "\\frac{1}{2}", "(1,2)", "x^2+1", "\\text{(C)}", "4.5e33"]
    for i, s in enumerate(strings):
      for pred, gold in ((s, golds[i % len(golds)]), (golds[i % len(golds)], s)):
        start = time.monotonic()
        try:
          result = verify.is_equivalent(pred, gold, timeout=timeout)
        except BaseException as e:  # pylint: disable=broad-except
          self.fail(f"exception escaped on {pred[:80]!r} vs {gold[:80]!r}: {e!r}")
        self.assertIsInstance(result, bool)
        self.assertLess(time.monotonic() - start, timeout + _SLACK_S, repr(pred[:80]))
      for fn in (verify.extract_boxed, verify.extract_answer, verify.has_closed_box):
        fn(s)

  def test_adversarial_in_process(self):
    self._check_in_process(_adversarial_strings(), timeout=0.5)

  def test_random_in_process(self):
    self._check_in_process(_random_strings(1500, seed=0), timeout=0.5)

  def test_pool_fuzz(self):
    strings = _adversarial_strings() + _random_strings(1500, seed=1)
    golds = ["3", "\\frac{1}{2}", "(1,2)", "x^2+1", "\\text{(C)}", "4.5e33"] * (len(strings) // 6 + 1)
    golds = golds[: len(strings)]
    with verify.BatchVerifier(num_workers=2, timeout=0.5, grace=1.0) as v:
      start = time.monotonic()
      out = v.verify(strings, golds)
      elapsed = time.monotonic() - start
      out_rev = v.match_answers(golds, strings)
    self.assertEqual(len(out), len(strings))
    self.assertTrue(all(isinstance(x, bool) for x in out + out_rev))
    # Every item within its hard deadline (timeout + grace), two at a time.
    self.assertLess(elapsed, (0.5 + 1.0) * len(strings) / 2 + _SLACK_S)

  @pytest.mark.slow
  def test_random_in_process_large(self):
    self._check_in_process(_random_strings(10_000, seed=2), timeout=0.5)


class BatchVerifierTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.v = verify.BatchVerifier(num_workers=2, timeout=2.0, grace=1.0)

  @classmethod
  def tearDownClass(cls):
    cls.v.close()
    super().tearDownClass()

  def test_matches_is_equivalent(self):
    pairs = EQUAL + NOT_EQUAL
    preds = [f"Some reasoning. \\boxed{{{p}}}" if "boxed" not in p else p for p, _ in pairs]
    golds = [g for _, g in pairs]
    want = [verify.is_equivalent(p, g, timeout=2.0) for p, g in zip(preds, golds)]
    self.assertEqual(self.v.verify(preds, golds), want)

  def test_duplicates_and_empty(self):
    preds = ["\\boxed{\\frac{\\sqrt{3}}{2}}"] * 5 + ["no answer", ""]
    golds = ["\\frac{1}{2}\\sqrt{3}"] * 5 + ["1", "1"]
    self.assertEqual(self.v.verify(preds, golds), [True] * 5 + [False, False])
    self.assertEqual(self.v.verify([], []), [])

  def test_length_mismatch_raises(self):
    with self.assertRaisesRegex(ValueError, "2 predictions but 1 golds"):
      self.v.verify(["a", "b"], ["a"])

  def test_require_box(self):
    with verify.BatchVerifier(num_workers=1, require_box=True) as v:
      self.assertEqual(v.verify(["so 5", "\\boxed{5}"], ["5", "5"]), [False, True])

  def test_from_another_thread(self):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", self.v.verify(["\\boxed{x^2-1}"], ["(x-1)(x+1)"])))
    t.start()
    t.join(120)
    self.assertEqual(out["r"], [True])

  def test_pool_is_used_for_symbolic_answers(self):
    pairs = self._slow_pairs(4)
    before = self.v.stats["pool"]
    self.assertEqual(self.v.verify([p for p, _ in pairs], [g for _, g in pairs]), [True] * 4)
    self.assertEqual(self.v.stats["pool"] - before, 4)

  def _slow_pairs(self, n):
    # Distinct pairs that need sympy (not decided by the cheap rules).
    return [(f"\\boxed{{(x+{k})^2}}", f"x^2+{2 * k}x+{k * k}") for k in range(2, 2 + n)]

  def test_hung_worker_is_killed_and_its_item_wrong(self):
    with verify.BatchVerifier(num_workers=2, timeout=1.0, grace=1.0) as v:
      stopped = v.worker_pids[0]
      os.kill(stopped, signal.SIGSTOP)  # a hang that no SIGALRM can end
      pairs = self._slow_pairs(6)
      out = v.verify([p for p, _ in pairs], [g for _, g in pairs])
      self.assertEqual(sorted(out), [False] + [True] * 5)
      self.assertNotIn(stopped, v.worker_pids)
      self.assertEqual(v.stats["timeouts"], 1)
      # The replacement works.
      self.assertEqual(v.verify([p for p, _ in pairs], [g for _, g in pairs]), [True] * 6)

  def test_dead_worker_is_replaced(self):
    with verify.BatchVerifier(num_workers=2, timeout=1.0) as v:
      dead = v.worker_pids[1]
      os.kill(dead, signal.SIGKILL)
      time.sleep(0.2)
      pairs = self._slow_pairs(6)
      out = v.verify([p for p, _ in pairs], [g for _, g in pairs])
      self.assertNotIn(dead, v.worker_pids)
      self.assertGreaterEqual(v.stats["restarts"], 1)
      self.assertEqual(out.count(True), 6 - v.stats["crashes"])

  def test_closed_verifier_raises(self):
    v = verify.BatchVerifier(num_workers=1)
    pids = v.worker_pids
    v.close()
    with self.assertRaisesRegex(RuntimeError, "closed"):
      v.verify(["\\boxed{3}"], ["3"])
    for pid in pids:  # reaped: no such process
      with self.assertRaises(ProcessLookupError):
        os.kill(pid, 0)


if __name__ == "__main__":
  absltest.main()
