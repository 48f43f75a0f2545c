"""Packed learner batches: the same losses and gradients as the padded [N, S] layout."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import models
from mar.models import model as M
from mar.rl import grpo, optim, packing, ppo
from mar.rl.update import make_update_step

import testutil  # the [16, 24] episodes / group batch with feedback spans

LOSS_TOL = 1e-5  # f32; packed and padded rows sum the same terms in another order
GRAD_TOL = 2e-5  # relative to the gradient's largest entry


WIDE = 48  # slots per unpacked row: the fixtures' 24 plus right padding, as a token budget leaves


def _widen(x):
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[1] != testutil.S:
    return x
  return np.pad(x, ((0, 0), (0, WIDE - testutil.S)))


def _episodes():
  ep = testutil.episodes()
  return ep._replace(**{f: _widen(getattr(ep, f)) for f in ep._fields})


def _close_trees(test, a, b, tol=GRAD_TOL):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(float(np.abs(y).max()), 1e-6)
    test.assertLess(float(np.abs(x - y).max()) / scale, tol, jax.tree_util.keystr(path))


class PlanTest(absltest.TestCase):

  def test_round_trip_and_counts(self):
    valid = _widen(testutil.fixture_masks(None)[0])
    x = np.where(valid, np.arange(valid.size).reshape(valid.shape), 0)
    p = packing.plan(valid, 48, num_mini_batches=2, shards=2)
    self.assertEqual(p.real_tokens, valid.sum())
    self.assertEqual(p.num_rows % 4, 0)
    self.assertLess(p.positions, valid.size)
    np.testing.assert_array_equal(packing.unpack(packing.pack(x, p.index, p.segment_ids),
                                                 p.index, p.shape), x)
    # mini-batch k packs only sequences of the k-th half
    first = p.seq[:p.rows_per_mini_batch]
    self.assertTrue(((first < 8)).all())
    self.assertTrue((p.seq[p.rows_per_mini_batch:][p.seq[p.rows_per_mini_batch:] >= 0] >= 8).all())

  def test_bucket_rows(self):
    self.assertEqual([packing.bucket_rows(n) for n in (1, 7, 8, 9, 17, 100)],
                     [1, 7, 8, 10, 20, 112])
    self.assertEqual(packing.bucket_rows(9, 4), 12)
    # beyond the padded micro-batch's rows: whole micro-batches of that many rows
    self.assertEqual(packing.mini_batch_rows(5, micro_rows=8, shards=2), (6, 1))
    self.assertEqual(packing.mini_batch_rows(73, micro_rows=8), (80, 10))

  def test_non_contiguous_rows_are_an_error(self):
    valid = np.array([[1, 0, 1, 0]], bool)
    with self.assertRaisesRegex(ValueError, "row 0"):
      packing.plan(valid, 4)


class PackedModelTest(absltest.TestCase):

  def test_segments_compute_what_each_sequence_computes_alone(self):
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.2)
    rng = np.random.RandomState(0)
    lengths = (5, 9, 3)
    seqs = [rng.randint(1, 64, n).astype(np.int32) for n in lengths]
    row = np.zeros((1, 20), np.int32)
    seg = np.zeros((1, 20), np.int32)
    at = 0
    for i, s in enumerate(seqs):
      row[0, at:at + len(s)], seg[0, at:at + len(s)] = s, i + 1
      at += len(s)
    packed = np.asarray(M.forward(config, params, jnp.asarray(row), segment_ids=seg))
    at = 0
    for s in seqs:
      alone = np.asarray(M.forward(config, params, jnp.asarray(s[None])))
      np.testing.assert_allclose(packed[0, at:at + len(s)], alone[0], atol=1e-5, rtol=1e-5)
      at += len(s)
    np.testing.assert_array_equal(M.segment_positions(jnp.asarray(seg))[0, :at],
                                  np.concatenate([np.arange(n) for n in lengths]))


def _group_batch(config, params):
  batch = {k: _widen(v) for k, v in testutil.group_batch().items()}
  lp = jax.jit(lambda p, t, v: grpo.scoring.token_logprobs(config, p, t, v))
  logp = np.asarray(lp(params, batch["tokens"], batch["valid"]))
  rng = np.random.RandomState(3)
  batch["old_logp"] = np.where(batch["action_mask"], logp + 0.1 * rng.normal(size=logp.shape),
                               0).astype(np.float32)
  return batch


class GroupLossTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("grpo", dict(), False),
      ("drgrpo", dict(estimator="drgrpo", agg="seq_mean_token_sum_norm"), False),
      ("seq_mean", dict(agg="seq_mean_token_mean"), False),
      ("lte_hinted", dict(entropy_coef=0.001), True),
      ("lte_separate_norm", dict(separate_norm=True), True),
  )
  def test_packed_loss_and_gradient_equal_padded(self, over, hinted):
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.2)
    batch = _group_batch(config, params)
    if not hinted:
      batch["hinted"] = np.zeros_like(batch["hinted"])
    hp = grpo.GRPOHparams(logprob_chunk=8, **over)
    opt = optim.make_optimizer(1e-3, 10)
    learner = grpo.GRPOLearner(config, hp, opt, response_len=16, pack_len=48)
    packed, counts = learner.pack_batch(batch, 1)
    self.assertEqual(counts["train/real_tokens"], batch["valid"].sum())
    self.assertLess(counts["train/padded_positions"], batch["valid"].size)
    loss_fn = grpo.actor_loss_fn(config, hp, 16)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss_a, m_a), g_a = grad(params, {k: jnp.asarray(v) for k, v in batch.items()})
    (loss_b, m_b), g_b = grad(params, {k: jnp.asarray(v) for k, v in packed.items()})
    np.testing.assert_allclose(loss_b, loss_a, rtol=LOSS_TOL, atol=LOSS_TOL)
    for k in m_a:
      np.testing.assert_allclose(m_b[k], m_a[k], rtol=LOSS_TOL, atol=LOSS_TOL, err_msg=k)
    _close_trees(self, g_b, g_a)

  @parameterized.named_parameters(
      ("grpo", dict(), False, 1),
      ("lte_entropy_hinted", dict(entropy_coef=0.001), True, 1),
      ("micro_batches", dict(micro_batches=2), False, 1),
      ("two_mini_batches", dict(), False, 2),
  )
  def test_shared_prompts_loss_and_gradient_equal_padded(self, over, hinted, mini):
    """Groups of 4 with one prompt: packed once per row, each response attending to it."""
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.2)
    batch = _group_batch(config, params)
    for k in ("tokens", "valid"):  # members 4g..4g+3 share member 4g's prompt (slots < 8)
      batch[k][:, :8] = np.repeat(batch[k][::4, :8], 4, axis=0)
    batch["action_mask"][5] = False  # a member with nothing trained is left out
    if not hinted:
      batch["hinted"] = np.zeros_like(batch["hinted"])
    if mini > 1:
      del batch["old_logp"]
      lp = jax.jit(lambda p, t, v: grpo.scoring.token_logprobs(config, p, t, v))
      batch["old_logp"] = np.asarray(lp(params, batch["tokens"], batch["valid"]))
    hp = grpo.GRPOHparams(logprob_chunk=8, **over)
    learner = grpo.GRPOLearner(config, hp, optim.make_optimizer(1e-3, 10), response_len=16,
                               pack_len=48)
    packed, counts = learner.pack_batch(batch, mini)
    plain = packing.plan(batch["valid"], 48)
    prompts = batch["valid"][:, :8].sum(1)
    self.assertLess(counts["train/real_tokens"],  # member 5 left out, prompts shared
                    batch["valid"].sum() - prompts[5] - batch["valid"][5, 8:].sum())
    self.assertLess(counts["train/padded_positions"], plain.positions)
    self.assertTrue((packed["prefix_ids"] > 0).any())
    loss_fn = grpo.actor_loss_fn(config, hp, 16)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    rows = len(packed["tokens"]) // mini
    for k in range(mini):
      part = lambda b, n: {f: jnp.asarray(v[k * n:(k + 1) * n]) for f, v in b.items()}
      (loss_a, m_a), g_a = grad(params, part(batch, 16 // mini))
      micro = len(packed["tokens"]) // mini // counts["micro_rows"]
      step = jax.jit(make_update_step(loss_fn, _sgd(), micro_rows=counts["micro_rows"]))
      new, _, m_b = step(params, _sgd().init(params), part(packed, rows))
      g_b = jax.tree.map(lambda a, b: a - b, params, new)
      np.testing.assert_allclose(m_b["loss"], loss_a, rtol=LOSS_TOL, atol=LOSS_TOL)
      for name in m_a:
        if micro == 1 or name in ("loss",):
          np.testing.assert_allclose(m_b[name], m_a[name], rtol=LOSS_TOL, atol=LOSS_TOL,
                                     err_msg=name)
      _close_trees(self, g_b, g_a)

  def test_without_old_logp_pi_old_is_pi(self):
    """One on-policy mini-batch: the loss's own log-probs stand in for an old-logp pass."""
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.2)
    batch = _group_batch(config, params)
    lp = jax.jit(lambda p, t, v: grpo.scoring.token_logprobs(config, p, t, v, chunk=8))
    batch["old_logp"] = np.asarray(lp(params, batch["tokens"], batch["valid"]))
    hp = grpo.GRPOHparams(logprob_chunk=8)
    learner = grpo.GRPOLearner(config, hp, optim.make_optimizer(1e-3, 10), 16, pack_len=48)
    grad = jax.jit(jax.value_and_grad(grpo.actor_loss_fn(config, hp, 16), has_aux=True))
    results = []
    for b in (batch, {k: v for k, v in batch.items() if k != "old_logp"}):
      packed, _ = learner.pack_batch(b, 1)
      results.append(grad(params, {k: jnp.asarray(v) for k, v in packed.items()}))
    (la, ma), ga = results[0]
    (lb, mb), gb = results[1]
    np.testing.assert_allclose(lb, la, rtol=LOSS_TOL, atol=LOSS_TOL)
    self.assertEqual(float(mb["clipfrac"]), 0.0)
    _close_trees(self, gb, ga)

  @parameterized.named_parameters(("token_mean", "token_mean"),
                                  ("drgrpo", "seq_mean_token_sum_norm"))
  def test_packed_micro_batches_give_the_mini_batch_gradient(self, agg):
    """Micro-batches of a packed mini-batch hold unequal token counts; the shared
    normaliser still makes their accumulated gradient the whole mini-batch's."""
    config = testutil.tiny_model_config()
    params = models.init_params(config, jax.random.key(0), std=0.2)
    batch = _group_batch(config, params)
    grads = {}
    for mb in (1, 4):
      hp = grpo.GRPOHparams(logprob_chunk=8, micro_batches=mb, agg=agg)
      learner = grpo.GRPOLearner(config, hp, optim.make_optimizer(1e-3, 10), 16, pack_len=48)
      packed, counts = learner.pack_batch(batch, 1)
      rows = len(packed["tokens"])
      self.assertEqual(rows // counts["micro_rows"], 1 if mb == 1 else 2)  # unequal tokens
      # sgd(1): the update is minus the accumulated gradient
      step = jax.jit(make_update_step(grpo.actor_loss_fn(config, hp, 16), _sgd(),
                                      micro_rows=counts["micro_rows"]))
      new, _, _ = step(params, _sgd().init(params), {k: jnp.asarray(v) for k, v in packed.items()})
      grads[mb] = jax.tree.map(lambda a, b: a - b, params, new)
    _close_trees(self, grads[4], grads[1])


def _sgd():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.sgd(1.0)


class PPOPackedTest(absltest.TestCase):

  def test_scores_losses_and_gradients_equal_padded(self):
    """Feedback spans: GAE runs per original sequence, so the advantages match too."""
    config = testutil.tiny_model_config()
    init = lambda k: models.init_params(config, jax.random.key(k), std=0.2)
    params, ref = init(0), init(4)
    critic = {"backbone": init(1), "value_head": models.init_value_head(config, jax.random.key(2))}
    ep = _episodes()
    hp = ppo.PPOHparams(logprob_chunk=8)
    opt = optim.make_optimizer(1e-3, 10)
    plain = ppo.PPOLearner(config, hp, opt, opt)
    packed_l = ppo.PPOLearner(config, hp, opt, opt, pack_len=48)
    a = plain.score(params, ref, critic, ppo.scored_fields(ep))
    p = packed_l.plan(np.asarray(ep.valid), 1)
    b = packed_l.score(params, ref, critic, ppo.scored_fields(ep), p.index, p.segment_ids)
    for k in ("old_logp", "ref_logp", "old_values", "advantages", "returns"):
      np.testing.assert_allclose(packing.unpack(np.asarray(b[k]), p.index, p.shape),
                                 np.asarray(a[k]), atol=LOSS_TOL, rtol=LOSS_TOL, err_msg=k)
    for fn, par in ((ppo.actor_loss_fn, params), (ppo.critic_loss_fn, critic)):
      grad = jax.jit(jax.value_and_grad(fn(config, hp), has_aux=True))
      (la, _), ga = grad(par, a)
      (lb, _), gb = grad(par, b)
      np.testing.assert_allclose(lb, la, rtol=LOSS_TOL, atol=LOSS_TOL)
      _close_trees(self, gb, ga)

  def test_step_reports_counts(self):
    config = testutil.tiny_model_config()
    init = lambda k: models.init_params(config, jax.random.key(k), std=0.2)
    params, ref = init(0), init(0)  # the updates donate their inputs: separate buffers
    critic = {"backbone": init(1), "value_head": models.init_value_head(config, jax.random.key(2))}
    opt = optim.make_optimizer(1e-3, 10)
    learner = ppo.PPOLearner(config, ppo.PPOHparams(logprob_chunk=8, micro_batches=2), opt, opt,
                             pack_len=48)
    ep = _episodes()
    out = learner.step(params, opt.init(params), critic, opt.init(critic), ref, ep,
                       num_mini_batches=2)
    m = out[-1]
    self.assertEqual(m["train/real_tokens"], ep.valid.sum())
    self.assertLess(m["train/padded_positions"], ep.valid.size)
    self.assertTrue(np.isfinite(m["actor/loss"]))


if __name__ == "__main__":
  absltest.main()
