"""The trainer end to end on the tiny demo model: iterations, compile counts, resume, errors."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np
import pytest
import testutil

from mar import algorithms
from mar import metrics, setup, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache_size(fn) -> int:
  return fn._cache_size()


class TrainerTest(absltest.TestCase):

  def test_ppo_iterations_compile_once(self):
    config = testutil.tiny_config("ppo")
    run = setup.build_run(config, tempfile.mkdtemp())
    state = algorithms.family(config).init_state(config, run)
    rewards = []
    for step in range(3):
      idx = train.batch_indices(config, len(run.train_data), step)
      state, m = algorithms.ppo.iteration(config, run, state, [run.train_data[i] for i in idx], step)
      rewards.append(m["reward_mean"])
      self.assertTrue(np.isfinite(m["loss"]))
      self.assertIn("success_at_attempt/1", m)
    run.close()
    programs = list(run.runner._continuous.values())
    self.assertEqual(sum(map(_cache_size, programs)), 1)  # one rollout program
    # Packed learner batches: one program per row-count bucket, never one per step.
    buckets = len(run.learner._packed)
    self.assertLessEqual(_cache_size(run.learner.score), 2)
    for actor, critic in run.learner._packed.values():
      self.assertEqual(_cache_size(actor), 1)
      self.assertEqual(_cache_size(critic), 1)
    self.assertLessEqual(buckets, 2)
    self.assertGreater(m["train/real_tokens"], 0)
    self.assertLessEqual(m["train/padded_positions"], 8 * run.runner.spec.cache_len)

  def test_batch_indices_cover_epochs(self):
    config = testutil.tiny_config("ppo")
    seen = np.concatenate([train.batch_indices(config, 64, s) for s in range(8)])
    self.assertEqual(sorted(seen.tolist()), list(range(64)))
    np.testing.assert_array_equal(train.batch_indices(config, 64, 3),
                                  train.batch_indices(config, 64, 3))


def _main_cmd(workdir, *overrides):
  return [sys.executable, "-m", "mar.main", "--config=configs/demo.py", f"--workdir={workdir}",
          *overrides]


def _tiny_flags():
  c = testutil.tiny_config("ppo")
  return [f"--config.model.demo.enabled=False", f"--config.model.path={c.model.path}",
          "--config.train.num_steps=4", "--config.rollout.prompts_per_step=8",
          "--config.eval.at_start=False", "--config.eval.at_end=False",
          "--config.data.synthetic.num_examples=64", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.async_save=False", "--config.verify.workers=1"]


class MainTest(absltest.TestCase):

  def _env(self):
    return testutil.subprocess_env()

  def test_config_typo_is_an_error(self):
    out = subprocess.run(_main_cmd(tempfile.mkdtemp(), "--config.rollout.temprature=0.5"),
                         cwd=REPO, env=self._env(), capture_output=True, text=True, timeout=120)
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("temprature", out.stderr)

  def test_missing_model_path_names_the_key(self):
    out = subprocess.run(
        _main_cmd(tempfile.mkdtemp(), "--config.model.demo.enabled=False",
                  "--config.model.path=/no/such/model"),
        cwd=REPO, env=self._env(), capture_output=True, text=True, timeout=300)
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("config.model.path", out.stderr)
    self.assertIn("/no/such/model", out.stderr)

  @pytest.mark.slow
  def test_resume_after_kill_matches_uninterrupted_run(self):
    flags = _tiny_flags()
    ref_dir = tempfile.mkdtemp()
    subprocess.run(_main_cmd(ref_dir, *flags), cwd=REPO, env=self._env(), check=True,
                   capture_output=True, timeout=900)
    reference = metrics.read_jsonl(os.path.join(ref_dir, "metrics.jsonl"))
    self.assertLen(reference, 4)

    work = tempfile.mkdtemp()
    proc = subprocess.Popen(_main_cmd(work, *flags), cwd=REPO, env=self._env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step2 = os.path.join(work, "checkpoints", "2")
    deadline = time.time() + 900
    while not os.path.isdir(step2) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_main_cmd(work, *flags), cwd=REPO, env=self._env(), check=True,
                   capture_output=True, timeout=900)
    resumed = metrics.read_jsonl(os.path.join(work, "metrics.jsonl"))
    self.assertEqual([r["step"] for r in resumed], [1, 2, 3, 4])
    for a, b in zip(reference, resumed):
      ra, rb = testutil.replayable_metrics(a), testutil.replayable_metrics(b)
      self.assertEqual(ra.keys(), rb.keys())
      for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  absltest.main()


class EvaluateTest(absltest.TestCase):

  def test_benchmark_eval_rows_and_table(self):
    from mar import evaluate
    from mar.evaluation import report

    config = testutil.tiny_config("ppo")
    config.data.dir = testutil.DATA_DIR
    config.rollout.prompt_len = 512
    config.eval.update(dict(benchmarks=["amc23", "aime24"], kinds=["attempts", "passk"],
                            max_problems=3, max_attempts=2, num_samples=2, ks=[1, 2],
                            batch_size=8))
    config.rollout.token_budget = 8
    work = tempfile.mkdtemp()
    run = setup.build_run(config, work)
    rows = evaluate.run_eval(config, run, run.params, work, step=7)
    run.close()
    self.assertLen(rows, 2 * (2 + 2))
    for r in rows:
      self.assertEqual(r["step"], 7)
      self.assertIn(r["benchmark"], ("amc23", "aime24"))
      if "attempts" in r:
        self.assertEqual(set(r), {"step", "benchmark", "attempts", "accuracy", "n"})
      else:
        self.assertEqual(set(r), {"step", "benchmark", "metric", "k", "value", "n"})
      self.assertEqual(r["n"], 3)
    self.assertEqual(report.read_eval_rows(work), rows)
    table = report.format_table(rows, 7)
    self.assertIn("amc23", table)
    self.assertIn("average", table)


class ShowRolloutTest(absltest.TestCase):

  def test_prints_marked_dialogues(self):
    from mar.tools import show_rollout

    config = testutil.tiny_config("ppo")
    texts = show_rollout.show(config, tempfile.mkdtemp(), num=2, attempts=2)
    self.assertLen(texts, 2)
    for t in texts:
      self.assertIn("── attempt 1", t)
      self.assertIn("You have 2 attempts", t)
      self.assertRegex(t, r"reward [+-]\d\.\d, attempts used [12]/2")


class EvalOnlyTest(absltest.TestCase):

  def test_evaluates_the_latest_checkpoint(self):
    from mar import eval_only

    config = testutil.tiny_config("ppo")
    config.train.num_steps = 1
    work = tempfile.mkdtemp()
    train.train(config, work)
    config.mode = "eval"
    config.eval.update(dict(benchmarks=["synthetic"], max_attempts=1, batch_size=8))
    config.eval.synthetic.num_examples = 4
    rows = eval_only.evaluate_checkpoint(config, work)
    self.assertEqual([r["step"] for r in rows], [1])
