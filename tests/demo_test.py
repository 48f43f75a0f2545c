"""The README's first command, end to end: the demo must visibly learn (issue: the CPU demo)."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest
import testutil

from mar.evaluation import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accuracy(rows, step, attempts):
  (row,) = [r for r in rows if r["step"] == step and r.get("attempts") == attempts]
  return row["accuracy"]


@pytest.mark.slow
class DemoTest(absltest.TestCase):

  def test_demo_learns_and_two_attempts_beat_one(self):
    work = tempfile.mkdtemp()
    env = testutil.subprocess_env()
    subprocess.run([sys.executable, "-m", "mar.main", "--config=configs/demo.py",
                    f"--workdir={work}"], cwd=REPO, env=env, check=True, timeout=1500)
    rows = report.read_eval_rows(work)
    last = max(r["step"] for r in rows)
    before1, after1 = _accuracy(rows, 0, 1), _accuracy(rows, last, 1)
    after2 = _accuracy(rows, last, 2)
    print(f"demo: att@1 {before1:.3f} -> {after1:.3f}; att@2 after {after2:.3f}")
    self.assertGreaterEqual(after1 - before1, 0.05)
    self.assertGreater(after2, after1)
    for name in ("attempts.png", "training.png"):
      self.assertGreater(os.path.getsize(os.path.join(work, "plots", name)), 1000)


if __name__ == "__main__":
  absltest.main()
