"""bench/sampler.py's matmul floor: the program it times must hold every weight matmul whole."""
import collections
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from bench import sampler as bench_sampler
from mar.models import init as init_lib
from mar.models import model as qwen
from mar.models.config import QwenConfig


def _dot_output_shapes(hlo: str) -> collections.Counter:
  return collections.Counter(
      tuple(int(n) for n in m.split(","))
      for m in re.findall(r"f32\[([\d,]+)\]\{[\d,]*\} dot\(", hlo))


class MatmulFloorTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_every_weight_matmul_runs_at_full_width(self, tied):
    cfg = QwenConfig(vocab_size=112, hidden_size=32, intermediate_size=40, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
    params = qwen.unstack_layers(init_lib.init_params(cfg, jax.random.key(0)))
    b, d = 3, cfg.hidden_size
    program = bench_sampler.matmul_floor_program(cfg, b, new=5)
    x0 = jnp.ones((b, d), jnp.float32)
    hlo = program.lower(params, x0).compile().as_text()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    want = collections.Counter({(b, qkv): 3, (b, d): 6, (b, 2 * cfg.intermediate_size): 3,
                                (b, cfg.vocab_size): 1})
    self.assertEqual(_dot_output_shapes(hlo), want)
    self.assertTrue(np.isfinite(np.asarray(program(params, x0))).all())


if __name__ == "__main__":
  absltest.main()
