"""Optimizer for the actor and the critic: Adam(W) with warm-up + cosine, clipping, and
skipping of non-finite steps.

A step whose gradient holds a NaN or an inf leaves the parameters and the optimizer state
(moments, step count, hence the schedule) unchanged and is counted in the state; one bad
batch then costs one step instead of the run.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def lr_schedule(
    lr: float, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1
) -> Callable[[Array | int], Array]:
  """Linear warm-up from 0 to lr over ceil(warmup_ratio * total_steps) steps, then cosine
  decay to min_lr_ratio * lr at total_steps (held there after).

  lr(s) = lr * s / W                                       for s < W
  lr(s) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))     p = min(1, (s - W) / (S - W))
  with W warm-up steps, S = total_steps, m = min_lr_ratio. Step 0 has lr 0, as in the
  HF "cosine_with_min_lr" scheduler the reference uses.
  """
  if total_steps <= 0:
    raise ValueError(f"optim.py: total_steps must be > 0, found {total_steps}")
  warmup = int(math.ceil(warmup_ratio * total_steps))
  decay = max(total_steps - warmup, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = lr * s / max(warmup, 1)
    progress = jnp.clip((s - warmup) / decay, 0.0, 1.0)
    cosine = lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(s < warmup, warm, cosine)

  return schedule


def tree_all_finite(tree: Any) -> Array:
  """True iff every leaf of the pytree is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class SkipNonFiniteState(NamedTuple):
  inner_state: Any
  num_skipped: Array  # int32 total steps skipped
  last_skipped: Array  # bool, whether the latest step was skipped


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps `inner` so non-finite gradients give zero updates and leave its state untouched.

  Unlike optax.apply_if_finite this never gives up and applies a bad step. The inner update
  runs under lax.cond, so a skipped step costs no optimizer work.
  """

  def init(params):
    return SkipNonFiniteState(inner.init(params), jnp.zeros([], jnp.int32), jnp.zeros([], bool))

  def update(grads, state, params=None):
    finite = tree_all_finite(grads)

    def apply(_):
      return inner.update(grads, state.inner_state, params)

    def skip(_):
      shapes = jax.eval_shape(apply, None)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0])
      return zeros, state.inner_state

    updates, inner_state = jax.lax.cond(finite, apply, skip, None)
    skipped = jnp.logical_not(finite)
    count = state.num_skipped + skipped.astype(jnp.int32)
    return updates, SkipNonFiniteState(inner_state, count, skipped)

  return optax.GradientTransformation(init, update)


def num_skipped(opt_state: Any) -> Array | None:
  """Total skipped steps recorded in an optimizer state from make_optimizer, else None."""
  return opt_state.num_skipped if isinstance(opt_state, SkipNonFiniteState) else None


def make_optimizer(
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    eps: float = 1e-8,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
  """skip_nonfinite(clip_by_global_norm(grad_clip) -> AdamW(lr_schedule, b1, b2, wd)).

  The clip sees the raw (accumulated) gradient; grad_clip=None disables it. Its state is a
  SkipNonFiniteState (see num_skipped).
  """
  schedule = lr_schedule(lr, total_steps, warmup_ratio, min_lr_ratio)
  parts = []
  if grad_clip is not None:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(
      optax.adamw(
          schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
      )
  )
  return skip_nonfinite(optax.chain(*parts))
