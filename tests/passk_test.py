"""Evaluation: pass@k against brute-force enumeration of k-subsets; eval.jsonl rows and table."""

import itertools
import json
import math
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from mar.evaluation import passk
from mar.evaluation import report


def brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


class PassAtKTest(parameterized.TestCase):

    def test_matches_enumeration_for_all_small_cases(self):
        for n in range(1, 9):
            for c in range(n + 1):
                for k in range(1, n + 1):
                    self.assertAlmostEqual(passk.pass_at_k(n, c, k), brute_force(n, c, k), places=12,
                                           msg=f"n={n} c={c} k={k}")

    def test_pass_at_1_is_fraction_correct_and_pass_at_n_is_any(self):
        self.assertAlmostEqual(passk.pass_at_k(16, 5, 1), 5 / 16)
        self.assertEqual(passk.pass_at_k(16, 1, 16), 1.0)
        self.assertEqual(passk.pass_at_k(16, 0, 16), 0.0)

    def test_large_n_is_finite_and_matches_exact_binomials(self):
        n, c, k = 1000, 3, 500
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        self.assertAlmostEqual(passk.pass_at_k(n, c, k), exact, places=12)

    @parameterized.parameters((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5))
    def test_bad_arguments(self, n, c, k):
        with self.assertRaises(ValueError):
            passk.pass_at_k(n, c, k)

    def test_mean_over_problems(self):
        rng = np.random.default_rng(0)
        correct = rng.random((7, 6)) < 0.3
        for k in (1, 2, 6):
            want = np.mean([brute_force(6, int(row.sum()), k) for row in correct])
            self.assertAlmostEqual(passk.mean_pass_at_k(correct, k), want, places=12)
        self.assertEqual(set(passk.pass_at_ks(correct, [1, 4, 16])), {1, 4})
        with self.assertRaisesRegex(ValueError, r"\[problems, n\]"):
            passk.mean_pass_at_k(np.zeros(5), 1)


class ReportTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

    def test_rows_have_exact_keys(self):
        a = report.attempt_row(np.int64(10), "math500", 2, np.float32(0.5), 500)
        p = report.passk_row(10, "aime24", 16, 0.25, 30)
        self.assertEqual(a, {"step": 10, "benchmark": "math500", "attempts": 2, "accuracy": 0.5, "n": 500})
        self.assertEqual(p, {"step": 10, "benchmark": "aime24", "metric": "pass@k", "k": 16, "value": 0.25,
                             "n": 30})
        self.assertEqual([type(v) for v in a.values()], [int, str, int, float, int])

    def test_append_and_read_round_trip(self):
        rows = [report.attempt_row(0, "math500", 1, 0.5, 4), report.passk_row(0, "math500", 1, 0.5, 4)]
        path = report.append_eval_rows(self.workdir, rows[:1])
        report.append_eval_rows(self.workdir, rows[1:])
        self.assertEqual(path, os.path.join(self.workdir, "eval.jsonl"))
        with open(path) as f:
            self.assertEqual(f.readline(),
                             '{"step": 0, "benchmark": "math500", "attempts": 1, "accuracy": 0.5, "n": 4}\n')
        self.assertEqual(report.read_eval_rows(path), rows)
        self.assertEqual(report.read_eval_rows(self.workdir), rows)

    def test_bad_rows_are_rejected(self):
        with self.assertRaisesRegex(ValueError, r"'accuracy': expected a fraction in \[0, 1\], found 73.4"):
            report.attempt_row(0, "math500", 1, 73.4, 500)
        with self.assertRaisesRegex(ValueError, "expected"):
            report.append_eval_rows(self.workdir, [{"step": 0, "benchmark": "x", "accuracy": 0.1, "n": 1}])
        path = os.path.join(self.workdir, "eval.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(report.attempt_row(0, "a", 1, 0.1, 1)) + "\n")
            bad = {"step": 0, "benchmark": "a", "metric": "pass@k", "k": 1, "value": 2.0, "n": 1}
            f.write(json.dumps(bad) + "\n")
        with self.assertRaisesRegex(ValueError, r"eval.jsonl: row 2: .*'value'"):
            report.read_eval_rows(path)

    def test_format_table(self):
        rows = [report.attempt_row(0, "aime24", 1, 0.1, 30)]
        rows += [report.attempt_row(100, "math500", k, a, 500) for k, a in [(1, 0.734), (2, 0.8), (4, 0.83)]]
        rows += [report.attempt_row(100, "aime24", k, 0.267, 30) for k in (4, 2, 1)]
        rows += [report.passk_row(100, "math500", 16, 0.9, 500), report.passk_row(100, "aime24", 16, 0.5, 30)]
        rows += [report.passk_row(100, "math500", 1, 0.5, 500)]  # aime24 lacks pass@1: no average
        rows += [report.attempt_row(100, "aime24", 1, 0.3, 30)]  # a rerun row replaces the earlier one
        want = "\n".join([
            "eval at step 100: att@k = accuracy (%) with k attempts, pass@k (%)",
            "benchmark    n  att@1  att@2  att@4  pass@1  pass@16",
            "----------------------------------------------------",
            "math500    500   73.4   80.0   83.0    50.0     90.0",
            "aime24      30   30.0   26.7   26.7       -     50.0",
            "----------------------------------------------------",
            "average          51.7   53.4   54.9       -     70.0",
        ])
        self.assertEqual(report.format_table(rows), want)
        self.assertIn("aime24     30   10.0", report.format_table(rows, step=0))
        self.assertEqual(report.format_table(rows, step=7), "no eval rows at step 7 (steps: [0, 100])")
        self.assertEqual(report.format_table([]), "no eval rows")


if __name__ == "__main__":
    absltest.main()
