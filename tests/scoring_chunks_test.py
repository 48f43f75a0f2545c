"""Scoring in row chunks (`update.map_rows`): the same log-probs, values and advantages as
scoring the whole batch in one forward, padded or packed, with and without a mesh."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import models, parallel
from mar.models import sharding
from mar.rl import grpo, optim, packing, ppo
from mar.rl import update

import testutil

TOL = 2e-6  # f32: a chunk's matmuls may tile differently from the whole batch's


class ChunkCountTest(absltest.TestCase):

  def test_fewest_equal_chunks_within_the_bound(self):
    self.assertEqual(update.chunk_count(16, 0), 1)
    self.assertEqual(update.chunk_count(16, 16), 1)
    self.assertEqual(update.chunk_count(16, 4), 4)
    self.assertEqual(update.chunk_count(16, 5), 4)  # 16 / 5 -> 4 chunks of 4
    self.assertEqual(update.chunk_count(12, 5, shards=2), 3)  # 3 chunks of 4 = 2 x 2
    self.assertEqual(update.chunk_count(12, 5, shards=4), 3)
    self.assertEqual(update.chunk_count(8, 1, shards=4), 2)  # chunks keep whole shards
    self.assertEqual(update.chunk_count(7, 2), 7)  # prime: one row each

  def test_map_rows_keeps_row_order(self):
    x = jnp.arange(24.0).reshape(12, 2)
    seen = []

    def fn(b):
      seen.append(b["x"].shape)
      return {"y": b["x"] * 2.0, "s": b["x"].sum(1)}

    out = update.map_rows(fn, {"x": x}, 4)
    self.assertEqual(seen, [(4, 2)])  # traced once, on one chunk's rows
    np.testing.assert_array_equal(out["y"], x * 2.0)
    np.testing.assert_array_equal(out["s"], x.sum(1))


def _models():
  config = testutil.tiny_model_config()
  init = lambda k: jax.device_get(models.init_params(config, jax.random.key(k), std=0.2))
  critic = {"backbone": init(1),
            "value_head": np.asarray(models.init_value_head(config, jax.random.key(2)))}
  return config, init(0), init(4), critic


def _mesh(with_mesh: bool):
  return sharding.make_mesh(2, 2, 2) if with_mesh else None


def _place(learner, mesh, params, ref, critic):
  if mesh is None:
    return params, ref, critic
  sh = learner.shardings
  return (parallel.shard_tree(params, sh.params), parallel.shard_tree(ref, sh.params),
          parallel.shard_tree(critic, sh.critic))


class PPOScoringTest(parameterized.TestCase):

  @parameterized.product(pack_len=[0, 48], with_mesh=[False, True])
  def test_chunked_equals_whole(self, pack_len, with_mesh):
    config, params, ref, critic = _models()
    mesh = _mesh(with_mesh)
    ep = ppo.scored_fields(testutil.episodes())
    hp = ppo.PPOHparams(logprob_chunk=8)
    opt = optim.make_optimizer(1e-3, 10)
    out = {}
    for rows in (0, 4):
      learner = ppo.PPOLearner(config, hp, opt, opt, mesh=mesh, pack_len=pack_len,
                               score_rows=rows)
      pol, rf, cri = _place(learner, mesh, params, ref, critic)
      index = seg = None
      if pack_len:
        p = learner.plan(np.asarray(ep.valid), 1)
        index, seg = parallel.put_batch((p.index, p.segment_ids), mesh)
        self.assertEqual(update.chunk_count(p.num_rows, rows, learner.shards) > 1, bool(rows))
      out[rows] = jax.device_get(learner.score(pol, rf, cri, parallel.put_batch(ep, mesh),
                                               index, seg))
      if rows:  # the chunked program maps the forwards over chunks of 4 rows
        hlo = learner.score.lower(pol, rf, cri, parallel.put_batch(ep, mesh), index,
                                  seg).as_text()
        self.assertIn("while", hlo)
    self.assertEqual(sorted(out[0]), sorted(out[4]))
    for k in out[0]:
      np.testing.assert_allclose(out[4][k], out[0][k], rtol=TOL, atol=TOL, err_msg=k)
    self.assertGreater(np.abs(out[0]["ref_logp"]).max(), 0.1)  # a real reference pass
    self.assertGreater(np.abs(out[0]["old_values"]).max(), 0.0)


class GRPOScoringTest(parameterized.TestCase):

  @parameterized.product(pack_len=[0, 48], with_mesh=[False, True])
  def test_chunked_logprobs_equal_whole(self, pack_len, with_mesh):
    config, params, _, _ = _models()
    mesh = _mesh(with_mesh)
    batch = testutil.group_batch()
    hp = grpo.GRPOHparams(logprob_chunk=8)
    out = {}
    for rows in (0, 4):
      learner = grpo.GRPOLearner(config, hp, optim.make_optimizer(1e-3, 10), response_len=16,
                                 mesh=mesh, pack_len=pack_len, score_rows=rows)
      pol = params if mesh is None else parallel.shard_tree(params, learner.shardings.params)
      out[rows] = learner.logprobs_host(pol, batch["tokens"], batch["valid"])
    np.testing.assert_allclose(out[4], out[0], rtol=TOL, atol=TOL)
    self.assertLess(out[0][batch["action_mask"]].max(), 0.0)


if __name__ == "__main__":
  absltest.main()
