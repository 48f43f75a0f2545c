"""The continuous engine on a ('data', 'fsdp', 'tensor') = (2, 2, 2) mesh of 8 CPU devices.

Same queue, same key: the sharded program with B = Q rows and with B < Q rows (refills) gives
the episodes of the one-device program, single-turn (greedy and sampled) and multi-attempt.
Runs in a child process that sets the device count before importing jax (see
sampling_sharded_test.py).
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__" and "--child" in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"

from absl.testing import absltest  # noqa: E402
import pytest  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELDS = ("tokens", "valid", "action_mask", "feedback_mask", "attempt_id", "reward",
           "attempts_used", "truncated")


def _child() -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mar import models  # pylint: disable=g-import-not-at-top
  from mar.data.tiny_tokenizer import build_tiny_tokenizer  # pylint: disable=g-import-not-at-top
  from mar.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from mar.models import sharding  # pylint: disable=g-import-not-at-top
  from mar.sampling import generation  # pylint: disable=g-import-not-at-top
  import continuous_test as ct  # pylint: disable=g-import-not-at-top
  import sampling_test as st  # pylint: disable=g-import-not-at-top

  def compare(ref, got):
    (a, _), (b, _) = ref, got
    same = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in _FIELDS)
    return same, float(np.abs(a.logprobs - b.logprobs).max())

  out = {"devices": jax.device_count()}
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, config, params = st.hf_tiny("qwen2")
  placed = generation.shard_for_mesh(config, params, mesh)
  prompts = st.prompts_for(lens=ct.PROMPT_LENS)
  stop_ids = tuple(range(1, 300, 9))
  for temperature in (0.0, 1.0):
    run = lambda p, rows: ct.single_turn(config, p, prompts, rows=rows, budget=16,  # pylint: disable=cell-var-from-loop
                                         temperature=temperature, stop_ids=stop_ids, key=5)
    ref = run(params, len(prompts))
    for rows in (len(prompts), 3):
      out[f"single_t{temperature}_rows{rows}"] = compare(ref, run(placed, rows))

  d = tempfile.mkdtemp()
  build_tiny_tokenizer(d)
  tok = Tokenizer.from_dir(d)
  cfg = models.QwenConfig.tiny("qwen3", vocab_size=tok.vocab_size)
  p0 = models.init_params(cfg, jax.random.PRNGKey(0))
  ref = ct.multi_attempt_sampled(cfg, p0, tok, rows=6)
  out["multi_feedback"] = bool(ref[0].feedback_mask.any())
  placed = generation.shard_for_mesh(cfg, p0, mesh)
  for rows in (6, 2):
    out[f"multi_rows{rows}"] = compare(ref, ct.multi_attempt_sampled(cfg, placed, tok, rows=rows))
  return out


class ShardedContinuousTest(absltest.TestCase):

  @pytest.mark.slow
  def test_mesh_2x2x2_matches_one_device(self):
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=_REPO)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(got["devices"], 8)
    self.assertTrue(got.pop("multi_feedback"))
    keys = [k for k in got if k != "devices"]
    self.assertLen(keys, 6)
    for k in keys:
      same, diff = got[k]
      self.assertTrue(same, k)
      self.assertLess(diff, 1e-4, k)


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(json.dumps(_child()))
  else:
    absltest.main()
