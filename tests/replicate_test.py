"""mar.tools.replicate and mar.evaluation.compare: the papers' comparisons, report and figures."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest
import testutil

from configs import miniature
from mar.evaluation import compare, report
from mar.metrics import read_jsonl
from mar.tools import replicate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _ppo_run(root, accs_first, accs_last, last_step=4):
  rows = [report.attempt_row(step, "synthetic", k, a, 10)
          for step, accs in ((0, accs_first), (last_step, accs_last))
          for k, a in enumerate(accs, start=1)]
  _write_jsonl(report.eval_path(root), rows)
  return root


def _sampled(root, first, last, last_step=4):
  """Appends sampled_attempts rows (k = 1, 2) at step 0 and `last_step`."""
  rows = [report.metric_row(step, "synthetic", report.SAMPLED_ATTEMPTS, k, a, 10)
          for step, accs in ((0, first), (last_step, last)) for k, a in enumerate(accs, 1)]
  with open(report.eval_path(root), "a", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return root


def _group_run(root, none_pass, pass1, passk):
  _write_jsonl(os.path.join(root, "metrics.jsonl"),
               [{"step": s + 1, "none_pass": v} for s, v in enumerate(none_pass)])
  rows = []
  for step, (p1, pk) in zip((0, len(none_pass)), zip(pass1, passk)):
    rows += [report.passk_row(step, "synthetic", 1, p1, 10),
             report.passk_row(step, "synthetic", 8, pk, 10)]
  _write_jsonl(report.eval_path(root), rows)
  return root


class CompareTest(absltest.TestCase):
  """The report's numbers from hand-made runs (no training)."""

  def setUp(self):
    super().setUp()
    d = tempfile.mkdtemp()
    self.runs = {
        "multi_attempt": {0: _ppo_run(f"{d}/ma0", [.2, .3, .3, .3], [.4, .6, .7, .7]),
                          1: _ppo_run(f"{d}/ma1", [.2, .3, .3, .3], [.5, .6, .6, .6])},
        "single_turn": {0: _ppo_run(f"{d}/st0", [.2, .3, .3, .3], [.5, .55, .55, .55]),
                        1: _ppo_run(f"{d}/st1", [.2, .3, .3, .3], [.5, .55, .6, .6])},
        "grpo": {0: _group_run(f"{d}/g0", [6, 5, 5, 4, 4, 4], [.3, .4], [.5, .55])},
        "grpo_extra": {0: _group_run(f"{d}/x0", [6, 5, 5, 4, 3, 3], [.3, .4], [.5, .6])},
        "lte": {0: _group_run(f"{d}/l0", [6, 4, 3, 2, 2, 1], [.3, .45], [.5, .7])},
    }

  def test_multi_attempt_gains_and_effect(self):
    rep = compare.build_report(self.runs, "test", tail=2)
    ma = rep["multi_attempt"]
    self.assertAlmostEqual(ma["arms"]["multi_attempt"]["seeds"]["0"]["gain_1_to_2"], 0.2)
    self.assertAlmostEqual(ma["arms"]["multi_attempt"]["gain_1_to_2"]["mean"], 0.15)
    self.assertAlmostEqual(ma["arms"]["single_turn"]["gain_1_to_2"]["mean"], 0.05)
    self.assertAlmostEqual(ma["arms"]["multi_attempt"]["accuracy"]["1"]["min"], 0.4)
    self.assertAlmostEqual(ma["arms"]["multi_attempt"]["accuracy_before"]["2"]["mean"], 0.3)
    self.assertTrue(ma["effect"]["holds"])
    self.assertEqual(ma["effect"]["seeds_where_it_holds"], "2/2")

  def test_lte_tail_none_pass_and_final_passk(self):
    rep = compare.build_report(self.runs, "test", tail=2)
    lte = rep["lte"]
    self.assertAlmostEqual(lte["arms"]["grpo"]["final_none_pass"]["mean"], 4.0)
    self.assertAlmostEqual(lte["arms"]["lte"]["final_none_pass"]["mean"], 1.5)
    self.assertAlmostEqual(lte["arms"]["lte"]["final_pass@k"]["mean"], 0.7)
    self.assertAlmostEqual(lte["arms"]["grpo_extra"]["first_pass@1"]["mean"], 0.3)
    self.assertTrue(lte["effect"]["holds"])
    # An effect that does not appear is reported as such, with its numbers.
    self.runs["lte"] = {0: _group_run(tempfile.mkdtemp(), [6, 6, 6, 6, 6, 6],
                                      [.3, .3], [.5, .5])}
    effect = compare.build_report(self.runs, "test", tail=2)["lte"]["effect"]
    self.assertFalse(effect["holds"])
    self.assertEqual(effect["none_pass"]["lte"], 6.0)

  def test_judged_arms_and_claims(self):
    # Sampled twins: the metric of record of the PPO arms and claim (a)'s gains.
    for (arm, seed), last in {("multi_attempt", 0): (.30, .40), ("multi_attempt", 1): (.32, .44),
                              ("single_turn", 0): (.31, .33), ("single_turn", 1): (.29, .30)
                              }.items():
      _sampled(self.runs[arm][seed], (.10, .12), last)
    rep = compare.build_report(self.runs, "test", tail=2)
    ma = rep["arms"]["multi_attempt"]
    self.assertEqual(ma["metric"], "sampled_att@1")
    self.assertAlmostEqual(ma["start"], 0.10)
    self.assertAlmostEqual(ma["end_mean"], 0.31)
    half = 12.7062047 * 0.01  # t(0.975, 1) * sd / sqrt(n), sd = 0.01 * sqrt(2)
    np.testing.assert_allclose(ma["end_ci95"], [0.31 - half, 0.31 + half], rtol=1e-6)
    self.assertTrue(ma["above_start"])  # 0.183 > 0.10
    lte = rep["arms"]["lte"]
    self.assertEqual((lte["metric"], lte["start"], lte["end_mean"]), ("pass@1", .3, .45))
    self.assertFalse(lte["above_start"])  # one seed: no interval, so not shown above
    (a, b) = rep["claims"]
    self.assertEqual(a["gains"]["multi_attempt"], [pytest.approx(.10), pytest.approx(.12)])
    self.assertAlmostEqual(a["difference"], 0.11 - 0.015)
    self.assertLess(a["ci95"][0], a["difference"])
    # Claim (b) needs >= 2 seeds per arm for its intervals: one seed cannot hold.
    self.assertFalse(b["holds"])
    self.assertAlmostEqual(b["tests"]["none_pass: lte - grpo"]["difference"], 1.5 - 4.0)

  def test_interval_and_welch_difference(self):
    lo, hi = compare.interval95([1.0, 2.0, 3.0])
    self.assertAlmostEqual((hi - lo) / 2, 4.302652730 * 1.0 / 3 ** 0.5, places=6)
    d = compare.difference95([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    self.assertAlmostEqual(d["difference"], 2.0)
    self.assertAlmostEqual(d["df"], 2.0)  # all variance on one side: df = n - 1
    self.assertAlmostEqual(d["ci95"][0], 2.0 - 4.302652730 / 3 ** 0.5, places=6)

  def test_figures_written(self):
    rep = compare.build_report(self.runs, "test")
    out = tempfile.mkdtemp()
    paths = compare.write_figures(rep, out)
    self.assertEqual(sorted(os.path.basename(p) for p in paths), sorted(compare.FIGURES.values()))
    for p in paths:
      self.assertGreater(os.path.getsize(p), 5000)

  def test_markdown_has_both_tables_and_the_papers_rows(self):
    md = compare.markdown(compare.build_report(self.runs, "test", tail=2))
    self.assertIn("| multi-attempt PPO, trained | 2 | 45.0 ± 5.0 | 60.0 ± 0.0 |", md)
    self.assertIn("| paper: multi-attempt PPO | - | 45.6 | 52.5 | - | 53.8 | +6.9 |", md)
    self.assertIn("| LTE | 1 | 1.5 ± 0.0 | 45.0 ± 0.0 | 70.0 ± 0.0 |", md)
    self.assertIn("| paper: LTE | - | - | 49.01 | 66.78 (k=16) | - |", md)

  def test_missing_eval_file_names_it(self):
    with self.assertRaisesRegex(FileNotFoundError, "eval.jsonl"):
      compare.attempt_accuracy(tempfile.mkdtemp())


class ConfigTest(absltest.TestCase):

  def test_arms_share_task_and_warm_start(self):
    from mar import demo

    keys = {demo.warm_start_key(replicate.arm_config(a, seed)) for a in miniature.ARMS
            for seed in (0, 1)}
    self.assertLen(keys, 1)
    c = replicate.arm_config("single_turn", 3, overrides=["train.num_steps=7"])
    self.assertEqual((c.seed, c.train.num_steps, c.rollout.prompt), (3, 7, "single_turn"))
    self.assertEqual(c.eval.kinds, ("attempts",))  # the multi-attempt curve, as the other arm
    with self.assertRaisesRegex(KeyError, "train.num_stepz"):
      replicate.arm_config("lte", 0, overrides=["train.num_stepz=7"])
    with self.assertRaisesRegex(ValueError, "variant"):
      miniature.get_config("ppo")

  def test_paper_commands(self):
    cmds = replicate.paper_commands("/r", ["grpo_extra", "single_turn"], [0, 1])
    self.assertLen(cmds, 4)
    self.assertIn("--config=configs/grpo_qwen.py:extra --config.model.path=/ckpt/Qwen3-8B-Base --workdir=/r/grpo_extra/seed_0", cmds[0])
    self.assertIn("--config=configs/ppo_qwen.py", cmds[2])
    self.assertIn("--config.seed=1", cmds[3])


@pytest.mark.slow
class ReplicateEndToEndTest(absltest.TestCase):
  """The whole miniature suite with tiny settings, then `--suite=paper` on the same layout."""

  def test_tiny_suite(self):
    # One seed keeps this to a few CPU minutes; spreads over seeds are CompareTest's job.
    # Two worker processes share the five arms (the suite's design).
    work = tempfile.mkdtemp()
    env = testutil.subprocess_env()
    cmd = [sys.executable, "-m", "mar.tools.replicate", "--suite=miniature", "--tiny",
           "--seeds=0", "--jobs=2", f"--workdir={work}"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=2400)
    with open(os.path.join(work, replicate.REPORT_FILE)) as f:
      rep = json.load(f)
    self.assertEqual(set(rep["runs"]), set(miniature.ARMS))
    for arm in miniature.PPO_ARMS:
      a = rep["multi_attempt"]["arms"][arm]
      self.assertEqual(set(a["seeds"]), {"0"})
      self.assertEqual(set(a["accuracy"]), {"1", "2"})
      self.assertEqual(a["gain_1_to_2"]["n"], 1)
      self.assertEqual(a["sampled_gain_1_to_2"]["n"], 1)
      self.assertEqual(rep["arms"][arm]["metric"], "sampled_att@1")
    for arm in miniature.GROUP_ARMS:
      seed = rep["lte"]["arms"][arm]["seeds"]["0"]
      self.assertEqual(sorted(seed["none_pass"]), ["1", "2"])  # one value per training step
      self.assertEqual(sorted(seed["pass@k"]), ["0", "1", "2"])  # eval every step in tiny
      self.assertEqual(seed["k"], 4)
    self.assertIn("holds", rep["multi_attempt"]["effect"])
    self.assertIn("holds", rep["lte"]["effect"])
    self.assertEqual(set(rep["arms"]), set(miniature.ARMS))
    self.assertEqual([c["claim"][:3] for c in rep["claims"]], ["(a)", "(b)"])
    self.assertEqual(set(rep["timings_s"]["arms"]), {f"{a}/seed_0" for a in miniature.ARMS})
    self.assertEqual(rep["timings_s"]["suite_runs"][0]["jobs"], 2)
    # Every run logs eval/expected_accuracy with its evaluations, step 0 included.
    for arm in miniature.ARMS:
      rows = read_jsonl(os.path.join(work, arm, "seed_0", "metrics.jsonl"))
      self.assertIn("eval/expected_accuracy", rows[-1])
    # Step 0 (the shared warm start) was evaluated once per evaluation kind and copied.
    ppo_start = [[r for r in report.read_eval_rows(os.path.join(work, arm, "seed_0"))
                  if r["step"] == 0] for arm in miniature.PPO_ARMS]
    self.assertEqual(ppo_start[0], ppo_start[1])
    self.assertLen(ppo_start[0], 5)  # att@1, att@2, their sampled twins, E[acc]
    for name in compare.FIGURES.values():
      self.assertGreater(os.path.getsize(os.path.join(work, replicate.FIGURES_DIR, name)), 5000)
    # A rerun finds every arm finished and trains nothing.
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600,
                         capture_output=True, text=True)
    self.assertIn("already finished", out.stderr)
    # The paper suite prints its commands and reports on whichever runs exist in its layout.
    out = subprocess.run([sys.executable, "-m", "mar.tools.replicate", "--suite=paper",
                          "--seeds=0", f"--workdir={work}"], cwd=REPO, env=env, check=True,
                         timeout=600, capture_output=True, text=True)
    self.assertIn("configs/lte_qwen.py", out.stdout)
    self.assertIn("grpo_qwen.py:extra", out.stdout)
    with open(os.path.join(work, replicate.REPORT_FILE)) as f:
      self.assertEqual(json.load(f)["suite"], "paper")


if __name__ == "__main__":
  absltest.main()
