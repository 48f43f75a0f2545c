"""The paths a new user walks after the demo, as subprocesses of the real commands.

A short demo run (tiny warm start, 3 RL steps, a checkpoint each step), then:
`mar.tools.export_hf --workdir=<the demo's workdir>` gives an HF folder that transformers
loads, whose weights are the checkpoint's policy; a flipped-byte latest checkpoint makes
the next run resume from the one before with one warning and no traceback; a config
error is one line and a non-zero exit.
"""

import glob
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest
import testutil
import torch
import transformers

from mar import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's structure at a few seconds' cost: warm start of 4 steps, 3 RL steps of 8 episodes.
DEMO_FLAGS = ("--config=configs/demo.py", "--config.model.demo.sft_steps=4",
              "--config.model.demo.sft_batch=8", "--config.rollout.prompts_per_step=8",
              "--config.eval.at_start=False", "--config.eval.at_end=False",
              "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=3",
              "--config.verify.workers=1")


def run_cli(args, env, check=True):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900, check=check)


def flip_bytes(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  for i in range(0, len(data), 7):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


@pytest.mark.slow
class DemoWorkdirTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.env = testutil.subprocess_env(MAR_CACHE=tempfile.mkdtemp())
    cls.work = tempfile.mkdtemp()
    run_cli(["mar.main", *DEMO_FLAGS, "--config.train.num_steps=2", f"--workdir={cls.work}"],
            cls.env)

  def test_1_export_hf_from_the_demo_workdir(self):
    out = tempfile.mkdtemp()
    run_cli(["mar.tools.export_hf", f"--workdir={self.work}", f"--out={out}", "--dtype=float32"],
            self.env)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ckpt_dir = checkpoint.checkpoint_dir(self.work)
    step = checkpoint.committed_steps(ckpt_dir)[-1]
    embed = checkpoint.read_state_leaf(ckpt_dir, step, ("policy", "embed"), dtype="float32")
    np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(),
                                  np.asarray(embed))
    self.assertTrue(os.path.isfile(os.path.join(out, "tokenizer.json")))

  def test_2_corrupt_latest_checkpoint_resumes_with_one_warning(self):
    ckpt_dir = checkpoint.checkpoint_dir(self.work)
    latest = checkpoint.committed_steps(ckpt_dir)[-1]
    for f in glob.glob(os.path.join(ckpt_dir, str(latest), "state", "d", "*")):
      flip_bytes(f)
    res = run_cli(["mar.main", *DEMO_FLAGS, "--config.train.num_steps=3", f"--workdir={self.work}"],
                  self.env)
    self.assertNotIn("Traceback", res.stderr)
    warnings = [l for l in res.stderr.splitlines() if "corrupt" in l]
    self.assertLen(warnings, 1, res.stderr[-3000:])
    self.assertIn(f"resumed from step {latest - 1}", warnings[0])
    self.assertEqual(checkpoint.committed_steps(ckpt_dir)[-1], 3)
    self.assertLen(glob.glob(os.path.join(ckpt_dir, f"{latest}.invalid-*")), 1)


class ConfigErrorTest(absltest.TestCase):

  def test_missing_model_path_is_one_line_and_exit_1(self):
    res = run_cli(["mar.main", "--config=configs/lte_qwen.py", f"--workdir={tempfile.mkdtemp()}"],
                  testutil.subprocess_env(), check=False)
    self.assertEqual(res.returncode, 1)
    self.assertNotIn("Traceback", res.stderr)
    self.assertEqual(res.stderr.strip().splitlines()[-1],
                     "mar.main: config error: config.model.path is not set; "
                     "pass --config.model.path=PATH")


if __name__ == "__main__":
  absltest.main()
