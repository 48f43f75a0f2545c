"""Advantage estimators: token-level GAE for PPO and group-relative ones for GRPO.

GAE runs over action tokens only. Multi-attempt episodes interleave model tokens with
feedback spans inserted by the environment; GAE runs as if those spans were removed: the
last token t of attempt i, followed by feedback t+1..t+k, bootstraps from the first token of
attempt i+1 with the usual gamma and lam,
  A_t = r_t + gamma * V_{t+k+1} - V_t + gamma * lam * A_{t+k+1}
(the multi-attempt reference's OpenRLHF fork; METHODS.md §1).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def gae(
    rewards: Array,
    values: Array,
    action_mask: Array,
    feedback_mask: Array,
    gamma: float | Array,
    lam: float | Array,
) -> tuple[Array, Array]:
  """Generalised advantage estimation over the action tokens of each row.

  Args:
    rewards: [B, T] reward received on token t (episode reward on the last action token).
      Rewards on non-action tokens are ignored.
    values: [B, T] critic value of the state before action t.
    action_mask: [B, T] True on tokens the policy generated and is trained on.
    feedback_mask: [B, T] True on environment-inserted feedback tokens. Must not overlap
      the action mask (an overlapping token counts as an action). Feedback tokens, like
      every non-action token, are skipped: the recursion links consecutive action tokens.
    gamma, lam: discount and trace parameters.

  Returns:
    (advantages, returns), both [B, T] float32, zero outside action tokens;
    returns = advantages + values on action tokens. The value after the last action
    token of a row is 0.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  act = jnp.asarray(action_mask).astype(bool)
  del feedback_mask  # kept in the signature: callers state the spans they skip
  gamma = jnp.asarray(gamma, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  batch = rewards.shape[0]

  def step(carry, x):
    next_value, next_adv = carry  # [B] each; "next" = next action token
    r, v, a = x
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (jnp.where(a, v, next_value), jnp.where(a, adv, next_adv))
    return carry, jnp.where(a, adv, 0.0)

  init = (jnp.zeros([batch], jnp.float32), jnp.zeros([batch], jnp.float32))
  xs = (rewards.T, values.T, act.T)  # scan over T
  _, adv_tb = jax.lax.scan(step, init, xs, reverse=True)
  advantages = adv_tb.T
  returns = jnp.where(act, advantages + values, 0.0)
  return advantages, returns


def normalize_advantages(adv: Array, mask: Array, eps: float = 1e-8) -> Array:
  """Whitens advantages over the mask tokens of the whole batch.

  (A - mean) * rsqrt(max(var, eps)) with the population variance, as OpenRLHF: the
  VARIANCE is clamped, so a batch of equal advantages maps to ~0 rather than +-1.
  """
  adv = jnp.asarray(adv, jnp.float32)
  m = jnp.asarray(mask).astype(bool)
  mf = m.astype(jnp.float32)
  n = jnp.maximum(mf.sum(), 1.0)
  mean = (adv * mf).sum() / n
  var = (jnp.square(adv - mean) * mf).sum() / n
  return jnp.where(m, (adv - mean) * jax.lax.rsqrt(jnp.maximum(var, eps)), 0.0)


# ---------------------------------------------------------------------------------------
# Group-relative estimators: rewards [P, G] (P prompts, G samples each) -> advantages.


def _check_group(rewards: Array, name: str, min_size: int) -> Array:
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 2:
    raise ValueError(f"advantages.py: {name} expects rewards [P, G], found shape {rewards.shape}")
  if rewards.shape[1] < min_size:
    raise ValueError(
        f"advantages.py: {name} needs group size G >= {min_size}, found G = {rewards.shape[1]}"
    )
  return rewards


def grpo_advantages(rewards: Array) -> Array:
  """(R - mean) / (std + 1e-6); std is the unbiased (ddof=1) one, as torch.std in verl."""
  r = _check_group(rewards, "grpo", 2)
  mean = r.mean(axis=1, keepdims=True)
  std = jnp.std(r, axis=1, ddof=1, keepdims=True)
  return (r - mean) / (std + 1e-6)


def grpo_no_std_advantages(rewards: Array) -> Array:
  """R - mean (Dr.GRPO): no division by the group std."""
  r = _check_group(rewards, "grpo_no_std", 1)
  return r - r.mean(axis=1, keepdims=True)


def rloo_advantages(rewards: Array) -> Array:
  """R minus the mean of the other G - 1 members (leave-one-out baseline)."""
  r = _check_group(rewards, "rloo", 2)
  g = r.shape[1]
  others_mean = (r.sum(axis=1, keepdims=True) - r) / (g - 1)
  return r - others_mean


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    "grpo": grpo_advantages,
    "grpo_no_std": grpo_no_std_advantages,
    "drgrpo": grpo_no_std_advantages,
    "rloo": rloo_advantages,
}


def group_advantages(name: str, rewards: Array) -> Array:
  """Looks up a group estimator by name and applies it to rewards [P, G] -> [P, G]."""
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(
        f"advantages.py: unknown estimator {name!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}"
    )
  return ADVANTAGE_ESTIMATORS[name](rewards)


def overlong_penalty(lengths, budget: int, buffer: int, factor: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to a response's reward.

  With L_max = `budget` and L_cache = `buffer`: 0 up to L_max - L_cache tokens, then falling
  linearly to -factor at L_max ((L_max - L_cache - |y|) / L_cache), -factor beyond. Lengths
  count every sampled token (the EOS included: it counts against the budget). Host-side
  (numpy); buffer 0: zeros.
  """
  lengths = np.asarray(lengths, np.float32)
  if buffer <= 0:
    return np.zeros_like(lengths)
  if buffer > budget:
    raise ValueError(f"grpo.overlong_buffer {buffer} exceeds rollout.token_budget {budget}")
  return -factor * np.clip((lengths - (budget - buffer)) / buffer, 0.0, 1.0)
