"""Optimizer schedule, non-finite skipping, and the micro-batched update step."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mar.rl import optim
from mar.rl import update as update_lib


def linear_loss(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  err = pred - batch["y"]
  loss = jnp.mean(jnp.square(err))
  return loss, {"abs_err": jnp.mean(jnp.abs(err))}


def linear_problem(n=16, d=3, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(d,)), jnp.float32), "b": jnp.zeros([], jnp.float32)}
  batch = {
      "x": rng.normal(size=(n, d)).astype(np.float32),
      "y": rng.normal(size=(n,)).astype(np.float32),
  }
  return params, batch


def expected_lr(step, lr, total, warmup_ratio, min_ratio):
  w = math.ceil(warmup_ratio * total)
  if step < w:
    return lr * step / w
  p = min(1.0, (step - w) / (total - w))
  return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class ScheduleTest(parameterized.TestCase):

  @parameterized.parameters((1e-6, 500, 0.03, 0.1), (5e-7, 1280, 0.03, 0.1), (2.0, 10, 0.0, 0.5))
  def test_formula(self, lr, total, ratio, min_ratio):
    sched = optim.lr_schedule(lr, total, ratio, min_ratio)
    w = math.ceil(ratio * total)
    np.testing.assert_allclose(sched(w), lr, rtol=1e-6)  # warm-up end = peak
    np.testing.assert_allclose(sched(total), min_ratio * lr, rtol=1e-5)  # end = min
    np.testing.assert_allclose(sched(total + 7), min_ratio * lr, rtol=1e-5)
    for s in (0, max(w - 1, 0), w + 1, (w + total) // 2, total - 1):
      want = expected_lr(s, lr, total, ratio, min_ratio)
      np.testing.assert_allclose(sched(s), want, rtol=1e-5, atol=1e-12)

  def test_optimizer_applies_schedule(self):
    # Constant gradient 1: Adam's step is lr_t * 1 / (1 + eps), so the parameter moves by lr_t.
    lr, total = 0.5, 40
    opt = optim.make_optimizer(lr, total, warmup_ratio=0.1, min_lr_ratio=0.1)
    params = jnp.zeros([], jnp.float32)
    state = opt.init(params)
    sched = optim.lr_schedule(lr, total, 0.1, 0.1)
    for step in range(total):
      updates, state = opt.update(jnp.ones([], jnp.float32), state, params)
      np.testing.assert_allclose(-updates, sched(step), rtol=1e-5, atol=1e-7)


class SkipNonFiniteTest(absltest.TestCase):

  def test_nan_gradient_leaves_state(self):
    opt = optim.make_optimizer(0.1, 10, warmup_ratio=0.0)
    params = {"w": jnp.ones([3])}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones([3])}, state, params)
    updates, new_state = opt.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state)):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(int(optim.num_skipped(new_state)), 1)
    self.assertTrue(bool(new_state.last_skipped))


class UpdateStepTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4, 8)
  def test_micro_batches_equal_full_batch_gradient(self, m):
    params, batch = linear_problem()
    full_grad = jax.grad(lambda p: linear_loss(p, batch)[0])(params)
    update = jax.jit(update_lib.make_update_step(linear_loss, optax.sgd(1.0), m))
    new_params, _, metrics = update(params, optax.sgd(1.0).init(params), batch)
    for k in params:
      np.testing.assert_allclose(params[k] - new_params[k], full_grad[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], linear_loss(params, batch)[0], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(full_grad), rtol=1e-5)
    self.assertEqual(float(metrics["skipped"]), 0.0)

  def test_donated_update_and_nan_skip(self):
    params, batch = linear_problem(seed=1)
    opt = optim.make_optimizer(1e-2, 100, warmup_ratio=0.0)
    update = jax.jit(update_lib.make_update_step(linear_loss, opt, 4), donate_argnums=(0, 1))
    opt_state = opt.init(params)
    params, opt_state, metrics = update(params, opt_state, batch)
    self.assertEqual(float(metrics["skipped"]), 0.0)
    before = jax.tree.map(np.array, (params, opt_state))

    bad = dict(batch, y=batch["y"].copy())
    bad["y"][5] = np.nan
    params, opt_state, metrics = update(params, opt_state, bad)
    self.assertEqual(float(metrics["skipped"]), 1.0)
    self.assertEqual(float(metrics["num_skipped"]), 1.0)
    for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before[1].inner_state), jax.tree.leaves(opt_state.inner_state)):
      np.testing.assert_array_equal(a, b)

    params, opt_state, metrics = update(params, opt_state, batch)  # training resumes
    self.assertEqual(float(metrics["skipped"]), 0.0)
    self.assertFalse(np.allclose(before[0]["w"], params["w"]))

  def test_extra_args_and_indivisible_batch(self):
    params, batch = linear_problem(n=6)

    def scaled(p, mb, scale):
      loss, met = linear_loss(p, mb)
      return scale * loss, met

    update = update_lib.make_update_step(scaled, optax.sgd(1.0), 3)
    new, _, _ = update(params, optax.sgd(1.0).init(params), batch, 2.0)
    g = jax.grad(lambda p: 2.0 * linear_loss(p, batch)[0])(params)
    np.testing.assert_allclose(params["w"] - new["w"], g["w"], rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "multiple of num_micro_batches=4"):
      bad_update = update_lib.make_update_step(linear_loss, optax.sgd(1.0), 4)
      bad_update(params, optax.sgd(1.0).init(params), batch)


if __name__ == "__main__":
  absltest.main()
