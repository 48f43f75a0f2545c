"""bench/sampler.py's matmul floors: the programs it times must hold every weight matmul whole."""
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

  def test_hf_floor_runs_every_linear_once_per_step(self):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=g-import-not-at-top

    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=112, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    calls = collections.Counter()
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.Linear):
        module.register_forward_hook(lambda m, i, o, name=name: calls.update([(name, o.shape)]))
    run = bench_sampler.hf_matmul_floor_runner(model, b=3, new=5)["hf_floor"]
    self.assertGreater(run(), 0.0)
    linears = [(n, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    self.assertEqual(len(linears), 3 * 7 + 1)
    self.assertEqual(calls, collections.Counter({(n, (3, out)): 5 for n, out in linears}))


if __name__ == "__main__":
  absltest.main()
