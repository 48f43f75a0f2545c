"""Every config in configs/ (each variant) runs a real training step and its evaluation.

The paper configs run as written except for sizes: the demo's tiny model stands in for the
checkpoint, and the step is scaled down with its structure kept — more prompts per step
than rows per rollout program (several rollout chunks), several mini- and micro-batches,
the config's dtype and remat, every benchmark it evaluates (two problems each). One paper
config also keeps its mesh (FSDP over the 8 simulated devices); the others run on one device
to keep CI within its budget (the sharded programs are tested in parallel_test.py).
A config that cannot run is a failing test.
"""

import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import testutil

from mar import eval_only, metrics, train
from testutil import apply_overrides, shared_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config module, variant) for every config file and every variant it documents.
VARIANTS = [
    ("multi_attempt_qwen", None), ("multi_attempt_qwen", "eval"), ("ppo_qwen", None),
    ("hybrid_qwen", None), ("grpo_qwen", None), ("grpo_qwen", "drgrpo"),
    ("grpo_qwen", "clip_higher"), ("grpo_qwen", "dapo"), ("grpo_qwen", "extra"),
    ("grpo_qwen", "eval"),
    ("lte_qwen", None), ("lte_qwen", "entropy"), ("lte_qwen", "eval"),
    ("demo", None), ("demo", "single"), ("demo", "lte"), ("demo", "hybrid"),
]

# Scaled sizes, structure kept. PPO: 32 episodes in rollout programs of 16 rows, 2
# mini-batches of 16, 2 micro-batches each. GRPO/LTE: 4 prompts x G = 4 = 16 sequences in
# programs of 8 rows, 2 mini-batches, 2 micro-batches.
_COMMON = {"train.num_steps": 1, "eval.at_start": False, "eval.max_problems": 2,
           "checkpoint.async_save": False, "verify.workers": 1}
_PPO = {"rollout.prompts_per_step": 32, "rollout.batch_size": 16, "rollout.token_budget": 12,
        "ppo.mini_batches": 2, "ppo.micro_batches": 2, "eval.batch_size": 16}
_GRPO = {"rollout.prompts_per_step": 4, "rollout.batch_size": 8, "rollout.token_budget": 12,
         "grpo.group_size": 4, "grpo.mini_batches": 2, "grpo.micro_batches": 2,
         "eval.batch_size": 8, "eval.num_samples": 2, "eval.ks": (1, 2)}
_DEMO = {"model.demo.enabled": False, "data.synthetic.num_examples": 64,
         "eval.synthetic.num_examples": 8}
_ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
SHARDED = ("lte_qwen", None)  # runs on the config's own mesh


def load_config(name: str, variant: str | None):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def scaled_overrides(name: str, config, variant=None) -> dict:
  over = dict(_COMMON, **(_PPO if config.method == "ppo" else _GRPO))
  if (name, variant) != SHARDED:
    over.update(_ONE_DEVICE)
  over["model.path"] = shared_model()
  if config.grpo.overlong_buffer:  # DAPO's buffer, as the same share of the scaled budget
    share = config.grpo.overlong_buffer / config.rollout.token_budget
    over["grpo.overlong_buffer"] = max(1, round(share * over["rollout.token_budget"]))
  if name == "demo":
    over.update(_DEMO)
  else:
    over.update({"data.dir": testutil.DATA_DIR,
                 "data.train": os.path.join(testutil.DATA_DIR, "train",
                                            "math_lvl3to5_8k.jsonl")})
  return over


def eval_benchmarks(workdir: str) -> set[str]:
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    return {json.loads(line)["benchmark"] for line in f}


class PaperConfigsTest(parameterized.TestCase):

  @parameterized.parameters(*VARIANTS)
  @pytest.mark.slow
  def test_runs_a_step_and_its_evaluation(self, name, variant):
    config = load_config(name, variant)
    structure = lambda c: (c.method, c.model.dtype, c.model.remat, c.rollout.stop_at_box,
                           c.rollout.max_attempts, c.eval.kinds, c.eval.benchmarks,
                           c.grpo.clip_high, c.grpo.agg, c.grpo.dynamic_sampling,
                           c.grpo.overlong_buffer > 0, c.grpo.mask_truncated)
    paper = structure(config)
    mesh = dict(config.mesh)
    config = apply_overrides(config, scaled_overrides(name, config, variant))
    self.assertEqual(paper, structure(config))  # the scaling kept what the paper runs
    if (name, variant) == SHARDED:
      self.assertEqual(mesh, dict(config.mesh))
    work = tempfile.mkdtemp()
    if config.mode == "eval":
      eval_only.evaluate_checkpoint(config, work)
    else:
      if config.method == "ppo":  # more episodes per step than rows per rollout program
        self.assertGreater(config.rollout.prompts_per_step, config.rollout.batch_size)
      else:
        self.assertGreater(config.rollout.prompts_per_step * config.grpo.group_size,
                           config.rollout.batch_size)
      last = train.train(config, work)
      rows = metrics.read_jsonl(os.path.join(work, "metrics.jsonl"))
      self.assertEqual([r["step"] for r in rows], [1])
      self.assertIn("loss", last)
      if config.method == "lte":
        self.assertIn("lte/hint_shortened", last)
      if config.grpo.dynamic_sampling:
        self.assertEqual(last["dapo/zero_variance_groups_trained"], 0.0)
        self.assertIn("dapo/oversample_exhausted", last)
      self.assertIn("rollout/logp_gap_max", last)  # every method logs the sampler's gap
    self.assertEqual(eval_benchmarks(work), set(config.eval.benchmarks))


class CommandLineTest(absltest.TestCase):

  @pytest.mark.slow
  def test_main_runs_a_paper_config_with_sequence_overrides(self):
    # The README's command with scaled sizes; sequence keys set on the command line.
    work = tempfile.mkdtemp()
    config = load_config("grpo_qwen", "eval")
    # A tuple flag given twice appends (absl), so each key is given once.
    over = dict(scaled_overrides("grpo_qwen", config), **{"eval.benchmarks": "amc23,aime24",
                                                         "eval.ks": "(1,2)"})
    flags = [f"--config.{k}={v}" for k, v in over.items()]
    out = subprocess.run(
        [sys.executable, "-m", "mar.main", "--config=configs/grpo_qwen.py:eval",
         f"--workdir={work}", *flags],
        cwd=REPO, env=testutil.subprocess_env(), capture_output=True, text=True, timeout=900)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertEqual(eval_benchmarks(work), {"amc23", "aime24"})
    with open(os.path.join(work, "config.json")) as f:
      saved = json.load(f)
    self.assertEqual(saved["eval"]["ks"], [1, 2])

  def test_every_config_file_is_covered(self):
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    names.discard("__init__")
    # configs/miniature.py's arms each train and evaluate in replicate_test's end-to-end run.
    self.assertEqual(names - {"miniature"}, {n for n, _ in VARIANTS})

  def test_unknown_variant_is_an_error(self):
    for name in ("multi_attempt_qwen", "grpo_qwen", "lte_qwen"):
      with self.assertRaisesRegex(ValueError, "unknown variant 'nope'"):
        load_config(name, "nope")


if __name__ == "__main__":
  absltest.main()
