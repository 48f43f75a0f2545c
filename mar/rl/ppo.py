"""Multi-attempt PPO: score a rollout (old/ref log-probs, values, GAE) and update actor and critic.

The path of one PPO step after the rollout:
  score_episodes   one jit (padded or packed rows): pi_old and pi_ref log-probs, critic
                   values in row chunks the size of an update micro-batch, token rewards,
                   GAE across feedback spans, advantage whitening over the batch
  actor update     jit: PPO-clip + kl_coef * k3, micro-batches accumulated by lax.scan
  critic update    jit: clipped value loss, same machinery
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mar import parallel
from mar.episodes import Episodes, token_rewards
from mar.models import sharding
from mar.models.config import QwenConfig
from mar.rl import advantages as adv_lib
from mar.rl import losses
from mar.rl import packing
from mar.rl import scoring
from mar.rl.update import (first_approx_kl, make_update_step, map_rows, mean_metrics,
                           mini_batches)


@dataclasses.dataclass(frozen=True)
class PPOHparams:
  gamma: float = 1.0
  lam: float = 0.99
  clip: float = 0.2
  value_clip: float = 0.2
  kl_coef: float = 0.01
  kl_name: str = "k3"
  kl_clamp: float = 10.0
  temperature: float = 1.0
  logprob_chunk: int = 512
  micro_batches: int = 1
  tis_cap: float = 0.0  # > 0: truncated importance weights on the actor loss (grpo.GRPOHparams)


def score_episodes(config: QwenConfig, hp: PPOHparams, policy, ref, critic, ep: Episodes,
                   index=None, segment_ids=None, max_rows: int = 0, shards: int = 1,
                   constrain=lambda t: t) -> dict:
  """Everything the PPO losses need, computed once before the update; the sampler's
  log-probs ride along as `sampler_logp` (TIS weights, rollout/* metrics) and pi_old's
  per-token entropy as `entropy` (train/entropy; no loss reads it).

  Padded (no `index`): the forwards run over the episodes' [B, S] rows and the batch keeps
  that layout (`valid`). Packed (a `rl.packing` plan's `index` and `segment_ids`): they run
  over the packed [R, L] rows and the batch is packed (`segment_ids`). Either way GAE and
  whitening run on the [B, S] layout, per original sequence, and the forwards (pi_old,
  pi_ref, critic) go through the rows in chunks of at most `max_rows` (`update.map_rows`;
  0: all at once), so scoring's activations are bounded like an update micro-batch's.
  `constrain` pins each chunk's rows to the mesh (identity without one).
  """
  if index is None:
    pk = unpk = lambda x: x
    rows = {"tokens": ep.tokens, "valid": ep.valid}
  else:
    pk = lambda x: packing.pack(x, index, segment_ids, jnp)
    unpk = lambda y: packing.unpack(y, index, ep.tokens.shape, jnp)
    rows = {"tokens": pk(ep.tokens), "segment_ids": segment_ids}

  def forwards(chunk):
    chunk = constrain(chunk)
    seg = chunk.get("segment_ids")
    valid = chunk["valid"] if seg is None else seg > 0
    lp = lambda p, **kw: scoring.token_logprobs(config, p, chunk["tokens"], valid,
                                                hp.temperature, hp.logprob_chunk,
                                                segment_ids=seg, **kw)
    old_logp, entropy = lp(policy, with_entropy=True)
    out = {"old_logp": old_logp, "entropy": entropy,
           "values": scoring.token_values(config, critic, chunk["tokens"], valid, seg)}
    if hp.kl_coef:
      out["ref_logp"] = lp(ref)
    return constrain(out)

  f = map_rows(forwards, rows, max_rows, shards)
  values = f["values"]
  advantages, returns = adv_lib.gae(token_rewards(ep), unpk(values), ep.action_mask,
                                    ep.feedback_mask, hp.gamma, hp.lam)
  advantages = adv_lib.normalize_advantages(advantages, ep.action_mask)
  action = pk(ep.action_mask)
  return {
      **rows,
      "action_mask": action,
      "old_logp": f["old_logp"],
      "ref_logp": f.get("ref_logp", jnp.zeros_like(f["old_logp"])),
      "old_values": jnp.where(action, values, 0.0),
      "advantages": pk(advantages),
      "returns": pk(returns),
      "sampler_logp": pk(ep.logprobs),
      "entropy": f["entropy"],
  }


def _valid(mb) -> jax.Array:
  return mb["valid"] if "segment_ids" not in mb else mb["segment_ids"] > 0


def actor_loss_fn(config: QwenConfig, hp: PPOHparams):
  def loss_fn(params, mb):
    logp = scoring.token_logprobs(config, params, mb["tokens"], _valid(mb), hp.temperature,
                                  hp.logprob_chunk, segment_ids=mb.get("segment_ids"))
    return losses.ppo_actor_loss(
        logp, mb["old_logp"], mb["advantages"], mb["action_mask"], mb["ref_logp"],
        clip_low=hp.clip, clip_high=hp.clip, kl_coef=hp.kl_coef, kl_name=hp.kl_name,
        kl_clamp=hp.kl_clamp, token_weight=_tis_weight(hp, mb))
  return loss_fn


def _tis_weight(hp: PPOHparams, mb):
  """min(pi_old / pi_sampler, tis_cap) per token, or None when off."""
  if not hp.tis_cap:
    return None
  return losses.rollout_correction(mb["old_logp"], mb["sampler_logp"], mb["action_mask"],
                                   hp.tis_cap)[0]


def critic_loss_fn(config: QwenConfig, hp: PPOHparams):
  def loss_fn(params, mb):
    values = scoring.token_values(config, params, mb["tokens"], _valid(mb),
                                  mb.get("segment_ids"))
    return losses.value_loss(values, mb["old_values"], mb["returns"], mb["action_mask"],
                             hp.value_clip)
  return loss_fn


# Episode fields the scoring reads; the rest ([M, B] per-turn flags) stay on the host side.
_SCORED = ("tokens", "valid", "action_mask", "feedback_mask", "reward", "last_action",
           "logprobs")


def scored_fields(ep: Episodes) -> Episodes:
  """`ep` with only the fields `score_episodes` reads (the others None)."""
  return ep._replace(**{f: None for f in Episodes._fields if f not in _SCORED})


@dataclasses.dataclass
class PPOLearner:
  """Jitted scoring and update programs for one (model config, hyper-parameters) pair.

  With a `mesh`, the programs keep policy, critic and optimizer states in their
  `parallel.TrainShardings` layout (out_shardings, so donated buffers are reused and the
  layout never drifts) and constrain every batch to rows over data x fsdp.
  """

  config: QwenConfig
  hp: PPOHparams
  actor_opt: Any
  critic_opt: Any
  mesh: Any = None
  rules: Any = None
  # Scoring and updates over packed rows (`rl.packing`) of pack_len slots (-1: the rollout's
  # own width); 0: the padded [B, S] layout.
  pack_len: int = 0
  # Rows per scoring chunk (`score_episodes`' max_rows): setup passes the update's
  # micro-batch rows, so scoring needs no more activation memory than an update; 0: one chunk.
  score_rows: int = 0

  def __post_init__(self):
    # Each layer all-gathers its FSDP-split weights; their gradients come back in the stored
    # layout (XLA reduces them with an all-reduce, bench/README.md: not a reduce-scatter yet).
    self.config = sharding.with_fsdp(self.config, self.mesh, self.rules)
    c, hp, mesh, rules = self.config, self.hp, self.mesh, self.rules
    constrain = lambda t: parallel.constrain_batch(t, mesh, rules)
    self.shardings = None
    self.shards = parallel.batch_shards(mesh, rules)
    actor_kw, critic_kw = {}, {}
    if mesh is not None:
      self.shardings = sh = parallel.TrainShardings.create(
          c, mesh, rules, actor_opt=self.actor_opt, critic_opt=self.critic_opt,
          with_critic=True)
      rep = parallel.replicated(mesh)
      actor_kw = dict(out_shardings=(sh.params, sh.actor_opt, rep))
      critic_kw = dict(out_shardings=(sh.critic, sh.critic_opt, rep))
    # One scorer, padded (index, seg None) or packed (a plan's index and segment ids).
    self.score = jax.jit(lambda pol, ref, cri, ep, index=None, seg=None: constrain(
        score_episodes(c, hp, pol, ref, cri, constrain(ep), *constrain((index, seg)),
                       max_rows=self.score_rows, shards=self.shards, constrain=constrain)))
    # Step metrics of the whole batch: rollout/* (the sampler's log-probs against pi_old)
    # and pi_old's entropy over the action tokens.
    self.correction = jax.jit(lambda b: {
        **losses.rollout_correction(b["old_logp"], b["sampler_logp"], b["action_mask"],
                                    hp.tis_cap)[1],
        "train/entropy": losses.aggregate("token_mean", b["entropy"], b["action_mask"])})
    self.split = jax.jit(lambda b, n: parallel.split_mini_batches(b, n, mesh, rules),
                         static_argnums=1)
    actor_loss = parallel.batch_constrained(actor_loss_fn(c, hp), mesh, rules)
    critic_loss = parallel.batch_constrained(critic_loss_fn(c, hp), mesh, rules)
    self.update_actor = jax.jit(
        make_update_step(actor_loss, self.actor_opt, hp.micro_batches),
        donate_argnums=(0, 1), **actor_kw)
    self.update_critic = jax.jit(
        make_update_step(critic_loss, self.critic_opt, hp.micro_batches),
        donate_argnums=(0, 1), **critic_kw)
    self._update_args, self._packed = (actor_loss, critic_loss, actor_kw, critic_kw), {}

  def step(self, policy, actor_state, critic, critic_state, ref, episodes: Episodes,
           num_mini_batches: int = 1):
    """One PPO epoch on a rollout batch: one optimizer step per mini-batch, in order.

    Returns new params/states and the metrics averaged over the mini-batches, plus the
    first mini-batch's approx-KL alone (`update.first_approx_kl`), the rollout/* gap and
    pi_old's entropy on the action tokens (train/entropy) of the whole batch.
    """
    size = episodes.tokens.shape[0]
    if size % num_mini_batches:
      raise ValueError(f"rollout batch {size} is not divisible into {num_mini_batches} "
                       "mini-batches (config.ppo.mini_batches)")
    valid = np.asarray(episodes.valid)
    counts = {"train/real_tokens": float(valid.sum()),
              "train/padded_positions": float(valid.size)}
    plan, update_actor, update_critic = None, self.update_actor, self.update_critic
    if self.pack_len:
      plan = self.plan(valid, num_mini_batches)
      counts["train/padded_positions"] = float(plan.positions)
      hosts_per_mb = max(jax.process_count() // num_mini_batches, 1)
      update_actor, update_critic = self.packed_updates(
          plan.rows_per_mini_batch * hosts_per_mb // plan.micro_batches)
    if self.mesh is not None:
      episodes = parallel.put_batch(scored_fields(episodes), self.mesh, self.rules)
    index = seg = None
    if plan is not None:
      index, seg = parallel.put_batch((plan.index, plan.segment_ids), self.mesh, self.rules)
    batch = self.score(policy, ref, critic, episodes, index, seg)
    correction = self.correction(batch)
    batch = {k: v for k, v in batch.items() if k != "entropy"}  # read by no update
    history = []
    for part in mini_batches(batch, num_mini_batches, self.split if self.mesh else None):
      critic, critic_state, c_metrics = update_critic(critic, critic_state, part)
      policy, actor_state, a_metrics = update_actor(policy, actor_state, part)
      history.append({**{f"actor/{k}": v for k, v in a_metrics.items()},
                      **{f"critic/{k}": v for k, v in c_metrics.items()}})
    metrics = {**mean_metrics(history), **counts,
               **{k: float(v) for k, v in jax.device_get(correction).items()},
               "train/first_minibatch_approx_kl": first_approx_kl(history, "actor/approx_kl")}
    return policy, actor_state, critic, critic_state, metrics

  def plan(self, valid: np.ndarray, num_mini_batches: int) -> packing.PackPlan:
    """This host's packing of its rollout rows, indexing the global [B, S] layout."""
    return packing.host_plan(valid, self.pack_len, num_mini_batches, self.hp.micro_batches,
                             self.shards, global_index=True)

  def packed_updates(self, micro_rows: int):
    """(actor, critic) update programs for packed batches of `micro_rows`-row micro-batches."""
    if micro_rows not in self._packed:
      actor_loss, critic_loss, actor_kw, critic_kw = self._update_args
      self._packed[micro_rows] = (
          jax.jit(make_update_step(actor_loss, self.actor_opt, micro_rows=micro_rows),
                  donate_argnums=(0, 1), **actor_kw),
          jax.jit(make_update_step(critic_loss, self.critic_opt, micro_rows=micro_rows),
                  donate_argnums=(0, 1), **critic_kw))
    return self._packed[micro_rows]
