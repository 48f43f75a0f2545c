"""Policy and value losses for PPO, GRPO and LTE as small pure functions.

Conventions: per-token arrays are [B, T]; `mask` is [B, T] bool or 0/1 and marks the tokens
a loss is taken over (response tokens, never feedback or padding). Scalar losses return
`(loss, metrics)` with metrics a dict of scalars computed without gradient. Log-ratios are
zeroed outside the mask before `exp`, so garbage (even NaN) log-probs on masked tokens give
exactly zero gradient. Coefficients that switch terms on or off (`kl_coef`,
`entropy_coef`) are Python floats, i.e. static under jit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

# Bound on |log ratio| before exp: keeps exp finite for stale or garbage log-probs.
LOG_RATIO_CLAMP = 20.0

# ---------------------------------------------------------------------------------------
# KL estimators of KL(pi || ref) from samples of pi; d = logp - ref_logp.


def _kl_k1(d: Array) -> Array:
  return d


def _kl_k2(d: Array) -> Array:
  return 0.5 * jnp.square(d)


def _kl_k3(d: Array) -> Array:
  return jnp.exp(-d) - 1.0 + d


KL_ESTIMATORS: dict[str, Callable[[Array], Array]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(
    name: str, logp: Array, ref_logp: Array, clamp: float | None = 10.0, mask: Array | None = None
) -> Array:
  """Per-token KL estimate; d = logp - ref_logp is clamped to [-clamp, clamp] first.

  With `mask`, d is set to 0 outside it (value 0, zero gradient even for NaN inputs).
  """
  if name not in KL_ESTIMATORS:
    raise ValueError(
        f"losses.py: unknown KL estimator {name!r}; expected one of {sorted(KL_ESTIMATORS)}"
    )
  d = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
  if mask is not None:
    d = jnp.where(jnp.asarray(mask).astype(bool), d, 0.0)
  if clamp is not None:
    d = jnp.clip(d, -clamp, clamp)
  return KL_ESTIMATORS[name](d)


# ---------------------------------------------------------------------------------------
# Aggregation of per-token values into a scalar.


def _token_mean(values, mask, max_len, group_norm, seq_counts):
  del max_len, seq_counts
  norm = mask.sum() if group_norm is None else group_norm
  return values.sum() / jnp.maximum(norm, 1e-8)


def _seq_mean_token_mean(values, mask, max_len, group_norm, seq_counts):
  del max_len
  if seq_counts is not None:  # packed rows: a row holds several sequences
    share = mask / jnp.maximum(seq_counts, 1.0)  # sums to 1 over each sequence's tokens
    norm = share.sum() if group_norm is None else group_norm
    return (values * share).sum() / jnp.maximum(norm, 1e-8)
  tokens = mask.sum(axis=-1)
  seq_mean = values.sum(axis=-1) / jnp.maximum(tokens, 1.0)
  norm = (tokens > 0).sum() if group_norm is None else group_norm
  return seq_mean.sum() / jnp.maximum(norm, 1e-8)


def _seq_mean_token_sum_norm(values, mask, max_len, group_norm, seq_counts):
  del seq_counts  # packed rows pass the sequence count as group_norm
  max_len = values.shape[-1] if max_len is None else max_len
  num_seqs = values.shape[0] if group_norm is None else group_norm
  return values.sum() / (num_seqs * max_len)


AGGREGATIONS = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(
    name: str,
    values: Array,
    mask: Array,
    *,
    max_len: int | None = None,
    group_norm: float | Array | None = None,
    seq_counts: Array | None = None,
) -> Array:
  """Reduces per-token values [B, T] over `mask` to a scalar.

  Modes:
    token_mean: sum over mask tokens / number of mask tokens in the batch.
    seq_mean_token_mean: mean over sequences (rows with >= 1 mask token) of per-row token means.
    seq_mean_token_sum_norm: sum over mask tokens / (num_seqs * max_len), Dr.GRPO's constant
      normaliser; num_seqs = B (all rows), max_len a static constant (default T).

  `group_norm` replaces the count in the denominator (tokens, sequences, or num_seqs
  respectively). Use it when a mini-batch is split into M micro-batches whose gradients are
  averaged (rl/update.py): pass (count over the whole mini-batch) / M, so the average of the
  micro-batch losses equals the mini-batch loss even when token counts differ between them.

  Packed rows (`rl.packing`, several sequences per row): `seq_counts` [B, T] gives at each
  token the mask-token count of its own sequence, so seq_mean_token_mean averages per
  sequence, not per row; seq_mean_token_sum_norm then needs group_norm = the sequence count.
  """
  if name not in AGGREGATIONS:
    raise ValueError(
        f"losses.py: unknown aggregation {name!r}; expected one of {sorted(AGGREGATIONS)}"
    )
  mask = jnp.asarray(mask).astype(bool)
  values = jnp.where(mask, jnp.asarray(values, jnp.float32), 0.0)
  return AGGREGATIONS[name](values, mask.astype(jnp.float32), max_len, group_norm, seq_counts)


def _masked_mean(values: Array, mask: Array) -> Array:
  m = jnp.asarray(mask).astype(jnp.float32)
  return jax.lax.stop_gradient((values * m).sum() / jnp.maximum(m.sum(), 1.0))


def _per_token(adv: Array, mask: Array) -> Array:
  """Advantages [B, T] (or per-sequence [B], broadcast) zeroed outside the mask."""
  adv = jnp.asarray(adv, jnp.float32)
  m = jnp.asarray(mask).astype(bool)
  adv = jnp.broadcast_to(adv[:, None], m.shape) if adv.ndim == 1 else adv
  return jnp.where(m, adv, 0.0)


def _log_ratio(logp: Array, old_logp: Array, mask: Array) -> Array:
  d = jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32)
  d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.where(jnp.asarray(mask).astype(bool), d, 0.0)


# ---------------------------------------------------------------------------------------
# Per-token loss terms.


def ppo_clip_token_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Array, Array, Array]:
  """Per-token -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A).

  Returns (loss [B, T], clipped [B, T] bool: the clipped term was the active one,
  log_ratio [B, T]); all zero outside the mask.
  """
  log_ratio = _log_ratio(logp, old_logp, mask)
  adv = _per_token(advantages, mask)
  ratio = jnp.exp(log_ratio)
  unclipped = -ratio * adv
  clipped = -jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
  m = jnp.asarray(mask).astype(bool)
  loss = jnp.where(m, jnp.maximum(unclipped, clipped), 0.0)
  return loss, m & (clipped > unclipped), log_ratio


def lte_shaping_token_loss(
    logp: Array, old_logp_hinted: Array, advantages: Array, mask: Array, gamma: float = 0.1
) -> tuple[Array, Array]:
  """Per-token -f(r_hat) A, f(x) = x / (x + gamma), r_hat = pi(o|q) / pi_old(o|hint, q).

  f(r_hat) is computed as sigmoid(logp - old_logp_hinted - log gamma), exact and stable.
  Returns (loss [B, T], weight f(r_hat) [B, T]); zero outside the mask.
  """
  m = jnp.asarray(mask).astype(bool)
  d = jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp_hinted, jnp.float32)
  weight = jnp.where(m, jax.nn.sigmoid(jnp.where(m, d, 0.0) - math.log(gamma)), 0.0)
  adv = _per_token(advantages, m)
  return jnp.where(m, -weight * adv, 0.0), weight


def entropy_from_logits(logits: Array) -> Array:
  """Per-token entropy [B, T] of the softmax over the last axis, computed in float32."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -(jnp.exp(logp) * logp).sum(axis=-1)


def rollout_correction(old_logp: Array, sampler_logp: Array, mask: Array,
                       tis_cap: float = 0.0) -> tuple[Array, Metrics]:
  """Truncated importance weights of the learner's pi_old over the sampler's distribution.

  The rollout samples from its own numerics (bf16 weights, a cached decode) while the
  learner scores the same tokens in its own: w = min(exp(old_logp - sampler_logp), tis_cap)
  per token (token-level TIS, as verl and TRL apply it), 1 where tis_cap == 0 (off), 0
  outside the mask. Metrics (no gradient) say how far apart the two are on the mask:
  rollout/logp_gap_max and _mean (|old - sampler|), rollout/k3_kl (k3 estimate of
  KL(sampler || learner) from the sampler's tokens), rollout/tis_weight_mean and
  rollout/tis_clipped_frac (share of tokens whose weight hit the cap).
  """
  m = jnp.asarray(mask).astype(bool)
  old = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
  d = jnp.where(m, old - jnp.asarray(sampler_logp, jnp.float32), 0.0)
  ratio = jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
  if tis_cap > 0:
    weight = jnp.minimum(ratio, tis_cap)
    clipped = m & (ratio > tis_cap)
  else:
    weight, clipped = jnp.ones_like(ratio), jnp.zeros_like(m)
  weight = jnp.where(m, weight, 0.0)
  metrics = {
      "rollout/logp_gap_max": jnp.max(jnp.where(m, jnp.abs(d), 0.0)),
      "rollout/logp_gap_mean": _masked_mean(jnp.abs(d), m),
      "rollout/k3_kl": _masked_mean(kl_penalty("k3", -d, 0.0, None, m), m),
      "rollout/tis_weight_mean": _masked_mean(weight, m),
      "rollout/tis_clipped_frac": _masked_mean(clipped.astype(jnp.float32), m),
  }
  return weight, metrics


# ---------------------------------------------------------------------------------------
# Scalar losses.


def ppo_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    *,
    max_len: int | None = None,
    group_norm: float | Array | None = None,
    token_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """PPO clipped surrogate; advantages [B, T] or per-sequence [B].

  `token_weight` [B, T] (no gradient) multiplies each token's loss: the truncated
  importance weights of `rollout_correction`.
  Metrics: clipfrac (share of mask tokens where the clipped term is active) and approx_kl,
  the token mean of (r - 1) - log r, an estimate of KL(pi_old || pi).
  """
  loss_bt, clipped, log_ratio = ppo_clip_token_loss(
      logp, old_logp, advantages, mask, clip_low, clip_high
  )
  if token_weight is not None:
    loss_bt = loss_bt * jax.lax.stop_gradient(token_weight)
  loss = aggregate(agg, loss_bt, mask, max_len=max_len, group_norm=group_norm)
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "clipfrac": _masked_mean(clipped.astype(jnp.float32), mask),
      "approx_kl": _masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
  }
  return loss, metrics


def value_loss(
    values: Array, old_values: Array, returns: Array, mask: Array, clip: float | None = 0.2
) -> tuple[Array, Metrics]:
  """Clipped value loss 0.5 max((V_clip - R)^2, (V - R)^2), token mean over the mask.

  V_clip = old_values + clip(values - old_values, -clip, clip); clip=None disables clipping.
  """
  m = jnp.asarray(mask).astype(bool)
  v = jnp.where(m, jnp.asarray(values, jnp.float32), 0.0)
  old = jnp.where(m, jnp.asarray(old_values, jnp.float32), 0.0)
  ret = jnp.where(m, jnp.asarray(returns, jnp.float32), 0.0)
  err = jnp.square(v - ret)
  if clip is None:
    per_token = err
    clipfrac = jnp.zeros([], jnp.float32)
  else:
    v_clip = old + jnp.clip(v - old, -clip, clip)
    err_clip = jnp.square(v_clip - ret)
    per_token = jnp.maximum(err_clip, err)
    clipfrac = _masked_mean((err_clip > err).astype(jnp.float32), m)
  per_token = jnp.where(m, 0.5 * per_token, 0.0)
  loss = aggregate("token_mean", per_token, m)
  metrics = {
      "vf_loss": jax.lax.stop_gradient(loss),
      "vf_clipfrac": clipfrac,
      "values_mean": _masked_mean(v, m),
  }
  return loss, metrics


def lte_offpolicy_loss(
    logp: Array,
    old_logp_hinted: Array,
    advantages: Array,
    mask: Array,
    gamma: float = 0.1,
    agg: str = "token_mean",
    *,
    max_len: int | None = None,
    group_norm: float | Array | None = None,
) -> tuple[Array, Metrics]:
  """LTE's shaped off-policy term -f(r_hat) A over hinted samples, no clipping."""
  loss_bt, weight = lte_shaping_token_loss(logp, old_logp_hinted, advantages, mask, gamma)
  loss = aggregate(agg, loss_bt, mask, max_len=max_len, group_norm=group_norm)
  metrics = {
      "offpolicy_loss": jax.lax.stop_gradient(loss),
      "shaping_weight": _masked_mean(weight, mask),
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class GroupLoss:
  """Static settings of the group family's actor loss (Python values: static under jit).

  clip_low / clip_high: the PPO clip of on-policy tokens; shaping_gamma: LTE's f(r) = r / (r
  + gamma) on hinted tokens; agg / max_len: `aggregate`; separate_norm: on-policy and hinted
  tokens normalised apart; kl_coef, kl_name, kl_clamp: the KL term to the reference;
  entropy_coef: the entropy bonus; tis_cap > 0: truncated importance weights.
  """

  clip_low: float = 0.2
  clip_high: float = 0.2
  shaping_gamma: float = 0.1
  agg: str = "token_mean"
  max_len: int | None = None
  separate_norm: bool = False
  kl_coef: float = 0.0
  kl_name: str = "k3"
  kl_clamp: float | None = 10.0
  entropy_coef: float = 0.0
  tis_cap: float = 0.0


def grpo_lte_loss(
    logp: Array,
    old_logp: Array,
    old_logp_hinted: Array | None,
    advantages: Array,
    mask: Array,
    hinted: Array | None = None,
    *,
    spec: GroupLoss = GroupLoss(),
    group_norm: float | Array | None = None,
    seq_counts: Array | None = None,
    ref_logp: Array | None = None,
    entropy: Array | None = None,
    sampler_logp: Array | None = None,
) -> tuple[Array, Metrics]:
  """GRPO / LTE actor loss over a batch mixing on-policy and hinted rows.

  Rows with hinted[b] False use the PPO clip on r = pi / pi_old; rows with hinted[b] True
  use -f(r_hat) A with r_hat = pi(o|q) / pi_old(o|hint, q) (old_logp_hinted). Both kinds of
  tokens are aggregated together by `spec.agg` (METHODS §2: token mean over the mini-batch);
  spec.separate_norm instead sums the on-policy and the hinted aggregates, each normalised
  over its own tokens (group_norm must then be None). old_logp is ignored on hinted rows and
  old_logp_hinted on on-policy rows; hinted=None (plain GRPO) means no hinted rows and
  old_logp_hinted may be None.

  Packed rows (`rl.packing`): `hinted` and `advantages` are per token [B, T] and
  `seq_counts` is passed to `aggregate`.

  `sampler_logp` [B, T]: the rollout's own log-probs of the tokens; adds the
  `rollout_correction` metrics against pi_old (old_logp_hinted on hinted tokens, whose
  sampler saw the hinted prompt) and, with spec.tis_cap > 0, weights each token's policy
  loss by min(pi_old / pi_sampler, tis_cap).

  Optional terms (off when their coef is 0):
    + kl_coef * agg(k_name(logp, ref_logp)), ref_logp required only then;
    - entropy_coef * agg(entropy), entropy the per-token [B, T] entropy of pi.
  """
  m, hinted_bt, old_logp_hinted = _group_token_masks(mask, hinted, old_logp, old_logp_hinted)
  agg = functools.partial(aggregate, spec.agg, max_len=spec.max_len, seq_counts=seq_counts)
  pg_loss, metrics = _group_policy_loss(spec, agg, logp, old_logp, old_logp_hinted,
                                        advantages, m, hinted_bt, sampler_logp, group_norm)
  loss, reg_metrics = _with_regularizers(spec, agg, pg_loss, logp, ref_logp, entropy, m,
                                         group_norm)
  return loss, {**metrics, **reg_metrics, "loss": jax.lax.stop_gradient(loss)}


def _group_token_masks(mask, hinted, old_logp, old_logp_hinted):
  """(loss mask, hinted tokens, the hinted old log-probs: old_logp when nothing is hinted)."""
  m = jnp.asarray(mask).astype(bool)
  if hinted is None:
    return m, jnp.zeros_like(m), old_logp
  if old_logp_hinted is None:
    raise ValueError("losses.py: grpo_lte_loss got `hinted` rows but old_logp_hinted=None")
  hinted = jnp.asarray(hinted).astype(bool)
  return m, (hinted if hinted.ndim == 2 else hinted[:, None]) & m, old_logp_hinted


def _group_policy_loss(spec: GroupLoss, agg, logp, old_logp, old_logp_hinted, advantages, m,
                       hinted_bt, sampler_logp, group_norm):
  """The policy-gradient part: PPO clip on on-policy tokens, LTE shaping on hinted ones
  (disjoint supports), TIS-weighted when asked; (aggregated loss, its metrics)."""
  onpolicy_bt = m & ~hinted_bt
  clip_bt, clipped, log_ratio = ppo_clip_token_loss(
      logp, old_logp, advantages, onpolicy_bt, spec.clip_low, spec.clip_high)
  shape_bt, weight = lte_shaping_token_loss(
      logp, old_logp_hinted, advantages, hinted_bt, spec.shaping_gamma)
  correction = {}
  if sampler_logp is not None:
    old_any = jnp.where(hinted_bt, jnp.asarray(old_logp_hinted, jnp.float32),
                        jnp.asarray(old_logp, jnp.float32))
    tis, correction = rollout_correction(old_any, sampler_logp, m, spec.tis_cap)
    if spec.tis_cap > 0:
      clip_bt, shape_bt = clip_bt * tis, shape_bt * tis
  if spec.separate_norm:
    if group_norm is not None:
      raise ValueError(
          "losses.py: grpo_lte_loss separate_norm=True cannot be combined with group_norm")
    pg_loss = agg(clip_bt, onpolicy_bt) + agg(shape_bt, hinted_bt)
  else:
    pg_loss = agg(clip_bt + shape_bt, m, group_norm=group_norm)
  return pg_loss, {
      "pg_loss": jax.lax.stop_gradient(pg_loss),
      "clipfrac": _masked_mean(clipped.astype(jnp.float32), onpolicy_bt),
      "approx_kl": _masked_mean(jnp.expm1(log_ratio) - log_ratio, onpolicy_bt),
      "hinted_token_frac": _masked_mean(hinted_bt.astype(jnp.float32), m),
      "shaping_weight": _masked_mean(weight, hinted_bt),
      **correction,
  }


def _with_regularizers(spec: GroupLoss, agg, loss, logp, ref_logp, entropy, m, group_norm):
  """loss + kl_coef * KL to the reference - entropy_coef * entropy (each when its coef is
  set); (that loss, metrics: the entropy is reported whenever it was computed)."""
  total, metrics = loss, {}
  if spec.kl_coef != 0.0:
    if ref_logp is None:
      raise ValueError("losses.py: grpo_lte_loss kl_coef != 0 needs ref_logp, found None")
    kl = agg(kl_penalty(spec.kl_name, logp, ref_logp, spec.kl_clamp, m), m,
             group_norm=group_norm)
    total, metrics["kl"] = total + spec.kl_coef * kl, jax.lax.stop_gradient(kl)
  if spec.entropy_coef != 0.0:
    if entropy is None:
      raise ValueError(
          "losses.py: grpo_lte_loss entropy_coef != 0 needs per-token entropy, found None")
    ent = agg(entropy, m, group_norm=group_norm)
    total, metrics["entropy"] = total - spec.entropy_coef * ent, jax.lax.stop_gradient(ent)
  elif entropy is not None:
    metrics["entropy"] = _masked_mean(jnp.asarray(entropy, jnp.float32), m)
  return total, metrics


def ppo_actor_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    ref_logp: Array | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.01,
    kl_name: str = "k3",
    kl_clamp: float | None = 10.0,
    token_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """Multi-attempt PPO actor loss: clip surrogate + kl_coef * KL, both token means.

  The KL to the frozen reference is added to the loss, not to the reward (METHODS §1).
  ref_logp may be None only when kl_coef == 0. `token_weight`: see `ppo_policy_loss`.
  """
  loss, metrics = ppo_policy_loss(
      logp, old_logp, advantages, mask, clip_low, clip_high, "token_mean",
      token_weight=token_weight,
  )
  if kl_coef != 0.0:
    if ref_logp is None:
      raise ValueError("losses.py: ppo_actor_loss kl_coef != 0 needs ref_logp, found None")
    kl = aggregate("token_mean", kl_penalty(kl_name, logp, ref_logp, kl_clamp, mask), mask)
    loss = loss + kl_coef * kl
    metrics["kl"] = jax.lax.stop_gradient(kl)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics
