"""Sampler on a ('data', 'fsdp', 'tensor') = (2, 2, 2) mesh of 8 simulated CPU devices.

jax fixes its device count at first import, and other test modules import jax first, so
the check runs in a child process (this file with --child) that sets XLA_FLAGS before
importing jax and prints its findings as JSON.
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

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child() -> dict:
  """Runs in the 8-device process: greedy vs HF, sharded vs unsharded sampling."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mar import sampling  # pylint: disable=g-import-not-at-top
  from mar.models import sharding  # pylint: disable=g-import-not-at-top
  from mar.sampling import generation  # pylint: disable=g-import-not-at-top
  import testutil  # pylint: disable=g-import-not-at-top

  out = {"devices": jax.device_count()}
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  prompts = testutil.prompts_for(lens=(5, 17, 1, 9, 3, 12))  # 6 rows: padded to 8 on the mesh
  for model_type in ("qwen2", "qwen3"):
    model, config, params = testutil.hf_tiny(model_type)
    ref = testutil.hf_greedy(model, prompts, 32)
    res = sampling.generate(config, params, prompts, 32, mesh=mesh)
    out[f"{model_type}_greedy_equal"] = res.tokens == ref
    out[f"{model_type}_distinct"] = len({t for r in ref for t in r})
    kw = dict(temperature=1.0, top_k=20, seed=3)
    a = sampling.generate(config, params, prompts, 16, mesh=mesh, **kw)
    b = sampling.generate(config, params, prompts, 16, **kw)
    out[f"{model_type}_sampled_equal"] = a.tokens == b.tokens
    out[f"{model_type}_logprob_diff"] = float(max(
        np.abs(x - y).max() for x, y in zip(a.logprobs, b.logprobs)))
  # The lower-level API keeps rows over (data, fsdp) and KV heads over tensor.
  placed = generation.shard_for_mesh(config, params, mesh)
  toks, mask = sampling.pad_prompts(prompts + prompts[:2], 32, 8)
  toks, mask = (jax.device_put(x, generation.batch_sharding(mesh, 2)) for x in (toks, mask))
  state = sampling.prefill(config, placed, toks, mask, 64)
  state = sampling.decode(config, placed, state, max_new=4)
  out["cache_spec"] = [str(a) for a in jax.tree.leaves(state.cache.k)[0].sharding.spec]
  return out


class ShardedSamplingTest(absltest.TestCase):

  def test_mesh_2x2x2_matches_hf_and_unsharded(self):
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=_REPO)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(got["devices"], 8)
    # Layer 0's keys (prefill makes the per-layer layout decode runs in): [B, K, Dh, S]
    self.assertEqual(got["cache_spec"][0:2], ["('data', 'fsdp')", "tensor"])
    for model_type in ("qwen2", "qwen3"):
      self.assertTrue(got[f"{model_type}_greedy_equal"], model_type)
      self.assertGreater(got[f"{model_type}_distinct"], 20)
      self.assertTrue(got[f"{model_type}_sampled_equal"], model_type)
      self.assertLess(got[f"{model_type}_logprob_diff"], 1e-4)


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(json.dumps(_child()))
  else:
    absltest.main()
