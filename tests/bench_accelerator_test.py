"""bench/accelerator.py's paper_decode section: the paper shapes, and a smoke run's JSON."""
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from bench import accelerator
import testutil

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PaperShapesTest(absltest.TestCase):

  def test_defaults_are_the_paper_configs_models_and_caches(self):
    shapes = accelerator.paper_shapes("multi_attempt_qwen2_5_math_1_5b,lte_qwen3_8b_base",
                                      "4128,9216", "1200,2000", smoke=False)
    cfg, cache, live = shapes["multi_attempt_qwen2_5_math_1_5b"]
    self.assertEqual((cfg.model_type, cfg.hidden_size, cfg.num_layers, cache, live),
                     ("qwen2", 1536, 28, 4128, 1200))
    cfg, cache, live = shapes["lte_qwen3_8b_base"]
    self.assertEqual((cfg.model_type, cfg.hidden_size, cfg.num_layers, cfg.tie_word_embeddings,
                      cache, live), ("qwen3", 4096, 36, False, 9216, 2000))

  def test_smoke_keeps_the_model_type_and_an_unknown_shape_is_an_error(self):
    shapes = accelerator.paper_shapes("lte_qwen3_8b_base", "512,768", "128,160", smoke=True)
    cfg, cache, live = shapes["lte_qwen3_8b_base"]
    self.assertEqual((cfg.model_type, cfg.hidden_size, cache, live), ("qwen3", 256, 768, 160))
    with self.assertRaisesRegex(ValueError, "--paper_models: unknown shape 'qwen9'"):
      accelerator.paper_shapes("qwen9", "1", "1", smoke=True)


class PaperDecodeSmokeTest(absltest.TestCase):

  @pytest.mark.slow
  def test_smoke_run_writes_both_caches_and_their_ratio(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "paper.json")
      subprocess.run([sys.executable, os.path.join(_ROOT, "bench", "accelerator.py"), "--smoke",
                      "--sections=paper_decode", "--paper_models=lte_qwen3_8b_base",
                      f"--out={out}"], check=True, cwd=_ROOT, env=testutil.subprocess_env(),
                     capture_output=True, timeout=900)
      with open(out) as f:
        result = json.load(f)
    self.assertEqual(set(result), {"machine", "paper_decode"})
    r = result["paper_decode"]["lte_qwen3_8b_base"]
    self.assertNotIn("error", r)
    self.assertEqual((r["rows"], r["cache_slots"], r["live_cache_slots"], r["live_tokens"]),
                     (2, 768, 192, [160, 168]))  # 160 + 8 new, rounded up to 64-slot blocks
    for k in ("cache", "live"):
      self.assertEqual(set(r[k]), {"slots", "compile_s", "tokens_per_s", "roofline_live_kv"})
      roof = r[k]["roofline_live_kv"]
      self.assertGreater(roof["share_of_bandwidth_roofline"], 0)
      self.assertGreater(roof["bytes_per_step_mb"], 0)
    # Both runs read the same live KV: the same bytes per step.
    self.assertEqual(r["cache"]["roofline_live_kv"]["bytes_per_step_mb"],
                     r["live"]["roofline_live_kv"]["bytes_per_step_mb"])
    self.assertGreater(r["bytes_per_step_mb_whole_cache"],
                       r["live"]["roofline_live_kv"]["bytes_per_step_mb"])
    ratio = r["step_ratio_cache_over_live"]
    self.assertTrue(math.isfinite(ratio) and ratio > 0, ratio)


if __name__ == "__main__":
  absltest.main()
