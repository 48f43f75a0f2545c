"""What both families share: optimizers, micro-batch and scoring sizes, the step's PRNG key,
the training state parked in host memory during the rollout, the host's share of a step."""

from __future__ import annotations

import time

import jax

from mar import config_utils
from mar import methods
from mar import overlap
from mar import parallel
from mar.rl import optim
from mar.rollout import shape as rollout_shape


def step_key(config, step: int) -> jax.Array:
  """The step's PRNG key: a function of (seed, step) only, so a resumed run samples alike."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), step)


def host_share(run, started: float) -> dict:
  """time/verify and the share of the step the device spent waiting for the host."""
  verify_s, stalled = run.runner.verify_fn.take_seconds()
  busy = run.timeline.busy_seconds(since=started)
  run.timeline.forget_before(time.perf_counter())
  return {"time/verify": verify_s, "rollout/verify_stall_s": stalled,
          **run.runner.take_stats(),
          **overlap.host_critical(time.perf_counter() - started, busy, stalled)}


def updates_per_step(config) -> int:
  """Optimizer updates one training step makes: one per mini-batch (PPO: actor and critic)."""
  return int(methods.of(config).hparams(config).mini_batches)


def optimizer(config, lr: float):
  """Adam + clip + warmup-cosine over the run's updates (`rl.optim`)."""
  o = config.optim
  return optim.make_optimizer(lr, config.train.num_steps * updates_per_step(config),
                              warmup_ratio=o.warmup_ratio, min_lr_ratio=o.min_lr_ratio,
                              b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                              grad_clip=o.grad_clip)


def micro_batches(config) -> int:
  """The family's micro-batch count; -1 (fit to memory) must be resolved before training."""
  key = methods.of(config).hparams_key
  micro = int(config[key].micro_batches)
  if micro < 1:
    raise config_utils.ConfigError(
        f"config.{key}.micro_batches={micro}: -1 (fit to device memory) must be resolved "
        "first (python -m mar.tools.plan_memory --fit prints the count)")
  return micro


def score_rows(config) -> int:
  """Rows per scoring chunk: the update's micro-batch rows, so scoring's activations are
  bounded as the update's are."""
  hp = methods.of(config).hparams(config)
  return max(rollout_shape.step_episodes(config) // hp.mini_batches // micro_batches(config), 1)


def park_state(run, state: dict, timer) -> dict:
  """train.offload_state: the training state in host memory while the rollout runs
  (time/offload). The policy's sampling copy is made first; the runner then samples from it
  given the parked policy. On several processes the runner gathers the policy itself, so it
  stays. Identity when offload is off.
  """
  if not run.offload:
    return state
  with timer("offload"):
    one = jax.process_count() == 1
    keep = run.runner.sampling_copy(state["policy"]) if one else state["policy"]
    parked = parallel.to_host_memory(state, keep=keep)
    if one:
      run.runner.serve_sampling_copy(parked["policy"])
  return parked


def unpark_state(run, state: dict, timer) -> dict:
  """`park_state`'s inverse, before the learner runs."""
  if not run.offload:
    return state
  with timer("offload"):
    return parallel.to_device_memory(state)
