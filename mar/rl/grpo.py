"""GRPO family and LTE on the device: score packed groups and update the policy.

A group batch holds P * G members, each packed as [prompt (left-padded) | response
(right-padded)] with the UN-hinted prompt; hinted members (LTE) additionally carry
`old_logp_hinted`, their log-probs from a forward over the hinted prompt. Advantages are
per member (one scalar per sequence), from the refined group's rewards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mar import parallel
from mar.models.config import QwenConfig
from mar.rl import advantages as adv_lib
from mar.rl import losses
from mar.rl import scoring
from mar.rl.update import make_update_step, mean_metrics, mini_batches


@dataclasses.dataclass(frozen=True)
class GRPOHparams:
  estimator: str = "grpo"  # grpo | grpo_no_std | drgrpo | rloo
  agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
  clip_low: float = 0.2
  clip_high: float = 0.2  # DAPO clip-higher: 0.28
  kl_coef: float = 0.0  # 0: no reference model is kept
  kl_name: str = "k3"
  kl_clamp: float = 10.0
  entropy_coef: float = 0.0  # LTE-dagger: 0.001
  shaping_gamma: float = 0.1
  separate_norm: bool = False
  temperature: float = 1.0
  logprob_chunk: int = 512
  micro_batches: int = 1


def pack_sequences(prompts, responses, prompt_len: int, response_len: int, pad_id: int):
  """Host: lists of token lists -> tokens, valid, action_mask [N, prompt_len + response_len].

  Prompts are left-padded, responses follow immediately and are right-padded, so valid
  slots are contiguous (what `scoring.token_logprobs` expects).
  """
  n = len(prompts)
  tokens = np.full((n, prompt_len + response_len), pad_id, np.int32)
  valid = np.zeros(tokens.shape, bool)
  action = np.zeros(tokens.shape, bool)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    if len(p) > prompt_len or len(r) > response_len:
      raise ValueError(f"sequence {i}: prompt {len(p)} > {prompt_len} or response "
                       f"{len(r)} > {response_len} tokens")
    tokens[i, prompt_len - len(p):prompt_len] = p
    tokens[i, prompt_len:prompt_len + len(r)] = r
    valid[i, prompt_len - len(p):prompt_len + len(r)] = True
    action[i, prompt_len:prompt_len + len(r)] = True
  return tokens, valid, action


def member_advantages(hp: GRPOHparams, rewards: np.ndarray) -> jax.Array:
  """[P, G] refined rewards -> [P * G] per-sequence advantages."""
  return adv_lib.group_advantages(hp.estimator, jnp.asarray(rewards, jnp.float32)).reshape(-1)


def actor_loss_fn(config: QwenConfig, hp: GRPOHparams, max_len: int):
  want_entropy = hp.entropy_coef != 0.0

  def loss_fn(params, mb):
    out = scoring.token_logprobs(config, params, mb["tokens"], mb["valid"], hp.temperature,
                                 hp.logprob_chunk, with_entropy=want_entropy)
    logp, entropy = out if want_entropy else (out, None)
    return losses.grpo_lte_loss(
        logp, mb["old_logp"], mb["old_logp_hinted"], mb["advantages"], mb["action_mask"],
        mb["hinted"], clip_low=hp.clip_low, clip_high=hp.clip_high,
        shaping_gamma=hp.shaping_gamma, agg=hp.agg, max_len=max_len,
        separate_norm=hp.separate_norm, ref_logp=mb.get("ref_logp"), kl_coef=hp.kl_coef,
        kl_name=hp.kl_name, kl_clamp=hp.kl_clamp, entropy=entropy,
        entropy_coef=hp.entropy_coef)
  return loss_fn


@dataclasses.dataclass
class GRPOLearner:
  """Jitted log-prob scoring and the policy update for GRPO / LTE / Dr.GRPO / DAPO-style runs.

  With a `mesh`: params and optimizer state keep their `parallel.TrainShardings` layout
  across updates and batches are sharded by rows over data x fsdp (as in `PPOLearner`).
  """

  config: QwenConfig
  hp: GRPOHparams
  optimizer: Any
  response_len: int
  mesh: Any = None
  rules: Any = None

  def __post_init__(self):
    c, hp, mesh, rules = self.config, self.hp, self.mesh, self.rules
    constrain = lambda t: parallel.constrain_batch(t, mesh, rules)
    self.shardings, kw = None, {}
    if mesh is not None:
      self.shardings = sh = parallel.TrainShardings.create(c, mesh, rules,
                                                           actor_opt=self.optimizer)
      kw = dict(out_shardings=(sh.params, sh.actor_opt, parallel.replicated(mesh)))
    self.logprobs = jax.jit(lambda p, tokens, valid: constrain(scoring.token_logprobs(
        c, p, *constrain((tokens, valid)), hp.temperature, hp.logprob_chunk)))
    self.split = jax.jit(lambda b, n: parallel.split_mini_batches(b, n, mesh, rules),
                         static_argnums=1)
    loss = parallel.batch_constrained(actor_loss_fn(c, hp, self.response_len), mesh, rules)
    self.update = jax.jit(
        make_update_step(loss, self.optimizer, hp.micro_batches),
        donate_argnums=(0, 1), **kw)

  def step(self, policy, opt_state, batch: dict, ref=None, num_mini_batches: int = 1):
    """One epoch over the batch (tokens/valid/action_mask/old_logp/old_logp_hinted/hinted/
    advantages), one optimizer step per mini-batch; metrics averaged over them."""
    size = batch["tokens"].shape[0]
    if size % num_mini_batches:
      raise ValueError(f"group batch {size} is not divisible into {num_mini_batches} "
                       "mini-batches (config.grpo.mini_batches)")
    if self.mesh is not None:
      batch = parallel.put_batch(batch, self.mesh, self.rules)
    if self.hp.kl_coef:
      batch = dict(batch, ref_logp=self.logprobs(ref, batch["tokens"], batch["valid"]))
    history = []
    for part in mini_batches(batch, num_mini_batches, self.split if self.mesh else None):
      policy, opt_state, metrics = self.update(policy, opt_state, part)
      history.append(metrics)
    return policy, opt_state, mean_metrics(history)
