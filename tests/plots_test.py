"""Plots: PNG files are written, valid, and drawn from the right data."""

import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from mar import metrics
from mar import plots
from mar.evaluation import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_eval_rows() -> list[dict]:
    rows = []
    for step, gain in ((0, 0.0), (50, 0.05), (100, 0.1)):
        for bench, base in (("math500", 0.6), ("aime24", 0.15), ("amc23", 0.4)):
            for att in (1, 2, 3, 4, 5):
                acc = min(1.0, base + gain + (0.03 + gain / 2) * np.log2(att))
                rows.append(report.attempt_row(step, bench, att, acc, 30))
            for k in (1, 2, 4, 8, 16):
                rows.append(report.passk_row(step, bench, k, min(1.0, base + gain + 0.06 * np.log2(k)), 30))
    return rows


def assert_png(test, path):
    test.assertTrue(os.path.exists(path), path)
    test.assertGreater(os.path.getsize(path), 1000)
    with open(path, "rb") as f:
        test.assertEqual(f.read(8), PNG_MAGIC)


class PlotsTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

    def test_attempt_curves_and_passk(self):
        out = plots.plots_dir(self.workdir)
        rows = sample_eval_rows()
        assert_png(self, plots.plot_attempt_curves(rows, os.path.join(out, "attempts.png")))
        assert_png(self, plots.plot_passk(rows, os.path.join(out, "passk.png")))

    def test_average_panel_is_the_mean_over_benchmarks(self):
        curves = plots._curves(sample_eval_rows(), "attempts", "attempts", "accuracy")
        self.assertEqual(list(curves), ["math500", "aime24", "amc23", "average"])
        want = np.mean([curves[b][100][2] for b in ("math500", "aime24", "amc23")])
        self.assertAlmostEqual(curves["average"][100][2], want)

    def test_no_rows_of_a_kind_writes_nothing(self):
        rows = [r for r in sample_eval_rows() if "attempts" in r]
        path = os.path.join(self.workdir, "passk.png")
        self.assertIsNone(plots.plot_passk(rows, path))
        self.assertFalse(os.path.exists(path))

    def test_training_curves_skip_nulls_and_missing_keys(self):
        rows = [{"step": s, "loss": 1.0 / s if s != 3 else None, "reward": s * 0.1, "name": "x"}
                for s in range(1, 40)]
        path = plots.plot_training_curves(rows, ["loss", "reward", "absent"],
                                          os.path.join(self.workdir, "plots", "training.png"), smoothing=0.6)
        assert_png(self, path)
        self.assertEqual(plots._numeric_series(rows, "loss")[0][:3], [1, 2, 4])
        none_path = os.path.join(self.workdir, "none.png")
        self.assertIsNone(plots.plot_training_curves(rows, ["absent"], none_path))

    def test_smoothing_is_tensorboards_debiased_ema(self):
        w = 0.6
        got = plots._ema([2.0, 2.0, 4.0, float("nan"), 1.0], w)
        self.assertAlmostEqual(got[0], 2.0)  # debiased: starts at the first point
        self.assertAlmostEqual(got[1], 2.0)  # a constant stays constant
        self.assertAlmostEqual(got[2], (w * w * 2 + w * 2 + 4) / (1 + w + w * w))
        self.assertTrue(np.isnan(got[3]))  # drawn as is, left out of the average
        acc = (w**3 * 2 + w**2 * 2 + w * 4 + 1) * (1 - w)
        self.assertAlmostEqual(got[4], acc / (1 - w**4))

    def test_plot_all_from_workdir_files(self):
        with metrics.MetricsWriter(self.workdir) as w:
            for s in range(1, 21):
                w.write(s, {"loss": 1.0 / s, "reward/mean": s / 20, "time/sample": 0.5})
        report.append_eval_rows(self.workdir, sample_eval_rows())
        paths = plots.plot_all(self.workdir)
        self.assertEqual([os.path.basename(p) for p in paths], ["training.png", "attempts.png", "passk.png"])
        for p in paths:
            self.assertEqual(os.path.dirname(p), os.path.join(self.workdir, "plots"))
            assert_png(self, p)
        rows = metrics.read_jsonl(os.path.join(self.workdir, "metrics.jsonl"))
        self.assertEqual(plots.default_training_keys(rows), ["loss", "reward/mean", "time/sample"])


if __name__ == "__main__":
    absltest.main()
