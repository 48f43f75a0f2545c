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
from mar.episodes import GroupBatch
from mar.models import sharding
from mar.models.config import QwenConfig
from mar.rl import advantages as adv_lib
from mar.rl import losses
from mar.rl import packing
from mar.rl import scoring
from mar.rl.update import (first_approx_kl, make_update_step, map_rows, mean_metrics,
                           mini_batches)


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
  # > 0: token-level truncated importance weights min(pi_old / pi_sampler, tis_cap) on the
  # policy loss (`losses.rollout_correction`); needs `sampler_logp` in the batch.
  tis_cap: float = 0.0


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


def pack_response_values(values, prompt_len: int, response_len: int) -> np.ndarray:
  """Host: per-response-token values (e.g. the sampler's log-probs) in `pack_sequences`'
  layout [N, prompt_len + response_len] (0 on prompt and padding slots)."""
  out = np.zeros((len(values), prompt_len + response_len), np.float32)
  for i, v in enumerate(values):
    out[i, prompt_len:prompt_len + len(v)] = v
  return out


def member_advantages(hp: GRPOHparams, rewards: np.ndarray) -> jax.Array:
  """[P, G] refined rewards -> [P * G] per-sequence advantages."""
  return adv_lib.group_advantages(hp.estimator, jnp.asarray(rewards, jnp.float32)).reshape(-1)


def actor_loss_fn(config: QwenConfig, hp: GRPOHparams, max_len: int):
  """loss_fn(params, micro_batch) over an unpacked ([N, S], per-sequence advantages and
  `hinted`) or a packed (`segment_ids`, per-token fields, `seq_counts`, `loss_norm`) batch."""
  want_entropy = hp.entropy_coef != 0.0
  spec = losses.GroupLoss(
      clip_low=hp.clip_low, clip_high=hp.clip_high, shaping_gamma=hp.shaping_gamma,
      agg=hp.agg, max_len=max_len, separate_norm=hp.separate_norm, kl_coef=hp.kl_coef,
      kl_name=hp.kl_name, kl_clamp=hp.kl_clamp, entropy_coef=hp.entropy_coef,
      tis_cap=hp.tis_cap)

  def loss_fn(params, mb):
    seg = mb.get("segment_ids")
    valid = mb["valid"] if seg is None else seg > 0
    # The loss reads log-probs at action tokens only: score just those (`score_slots`).
    slots = (mb["score_src"], mb["score_tgt"]) if "score_tgt" in mb else None
    out = scoring.token_logprobs(config, params, mb["tokens"], valid, hp.temperature,
                                 hp.logprob_chunk, with_entropy=want_entropy, segment_ids=seg,
                                 score_slots=slots, positions=mb.get("positions"),
                                 prefix_ids=mb.get("prefix_ids"))
    logp, entropy = out if want_entropy else (out, None)
    # No old_logp: the batch is learned in one optimizer step from the policy that sampled
    # it, so pi_old is pi itself (what a separate forward would give, without its cost).
    old_logp = mb.get("old_logp", jax.lax.stop_gradient(logp))
    packed = {}
    if seg is not None:  # the mini-batch's normaliser, shared by its micro-batches
      packed = dict(seq_counts=mb["seq_counts"],
                    group_norm=None if hp.separate_norm else mb["loss_norm"][0])
    return losses.grpo_lte_loss(
        logp, old_logp, mb["old_logp_hinted"], mb["advantages"], mb["action_mask"],
        mb["hinted"], spec=spec, ref_logp=mb.get("ref_logp"), entropy=entropy,
        sampler_logp=mb.get("sampler_logp"), **packed)
  return loss_fn


# Fields of a group batch with one value per sequence.
_PER_SEQUENCE = ("advantages", "hinted")


def loss_norms(hp: GRPOHparams, batch: dict, num_seqs: int, micro_batches: int) -> float:
  """The count `hp.agg` divides by over one mini-batch (unpacked [n, S] arrays), / micro-batches.

  Micro-batches of a packed mini-batch hold unequal token counts; dividing each by the
  mini-batch's count / M makes the mean of their losses the mini-batch's loss.
  """
  mask = np.asarray(batch["action_mask"], bool)
  if hp.agg == "token_mean":
    count = mask.sum()
  elif hp.agg == "seq_mean_token_mean":
    count = mask.any(1).sum()
  else:  # seq_mean_token_sum_norm: every sequence, as the unpacked rows count
    count = num_seqs
  return float(count) / micro_batches


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
  # Packed batches (`rl.packing`): rows of pack_len slots (-1: the batch's own width); 0: off.
  pack_len: int = 0
  # Rows per log-prob chunk (`update.map_rows`): setup passes the update's micro-batch
  # rows, so scoring needs no more activation memory than an update; 0: one chunk.
  score_rows: int = 0

  def __post_init__(self):
    # Each layer all-gathers its FSDP-split weights; their gradients come back in the stored
    # layout (XLA reduces them with an all-reduce, bench/README.md: not a reduce-scatter yet).
    self.config = sharding.with_fsdp(self.config, self.mesh, self.rules)
    c, hp, mesh, rules = self.config, self.hp, self.mesh, self.rules
    if self.pack_len and hp.separate_norm and hp.agg == "seq_mean_token_sum_norm":
      raise ValueError("grpo: separate_norm with agg=seq_mean_token_sum_norm needs unpacked "
                       "batches (train.pack_len=0)")
    self.shards = parallel.batch_shards(mesh, rules)
    constrain = lambda t: parallel.constrain_batch(t, mesh, rules)
    self.shardings, kw = None, {}
    if mesh is not None:
      self.shardings = sh = parallel.TrainShardings.create(c, mesh, rules,
                                                           actor_opt=self.optimizer)
      kw = dict(out_shardings=(sh.params, sh.actor_opt, parallel.replicated(mesh)))

    def logprobs(p, rows):  # in row chunks of at most score_rows (`update.map_rows`)
      def chunk(r):
        r = constrain(r)
        seg = r.get("segment_ids")
        return constrain(scoring.token_logprobs(
            c, p, r["tokens"], r["valid"] if seg is None else seg > 0, hp.temperature,
            hp.logprob_chunk, segment_ids=seg))
      return map_rows(chunk, rows, self.score_rows, self.shards)

    self.logprobs = jax.jit(lambda p, tokens, valid: logprobs(
        p, {"tokens": tokens, "valid": valid}))
    self.packed_logprobs = jax.jit(lambda p, tokens, seg: logprobs(
        p, {"tokens": tokens, "segment_ids": seg}))
    self.split = jax.jit(lambda b, n: parallel.split_mini_batches(b, n, mesh, rules),
                         static_argnums=1)
    loss = parallel.batch_constrained(actor_loss_fn(c, hp, self.response_len), mesh, rules)
    self.update = jax.jit(
        make_update_step(loss, self.optimizer, hp.micro_batches),
        donate_argnums=(0, 1), **kw)
    self._loss, self._update_kw, self._packed_updates = loss, kw, {}

  def plan(self, valid, num_mini_batches: int = 1, micro_batches: int | None = None):
    """This host's packing of an [n, S] batch (the same row count on every host)."""
    return packing.host_plan(valid, self.pack_len, num_mini_batches, micro_batches,
                             self.shards)

  def packed_update(self, micro_rows: int):
    """The update program for packed batches of `micro_rows` rows per micro-batch."""
    if micro_rows not in self._packed_updates:
      self._packed_updates[micro_rows] = jax.jit(
          make_update_step(self._loss, self.optimizer, micro_rows=micro_rows),
          donate_argnums=(0, 1), **self._update_kw)
    return self._packed_updates[micro_rows]

  def logprobs_host(self, params, tokens, valid) -> np.ndarray:
    """log-probs [n, S] (numpy) of this host's rows, through the packed program if packing."""
    if not self.pack_len:
      batch = parallel.put_batch((tokens, valid), self.mesh, self.rules)
      return parallel.host_local(self.logprobs(params, *batch))
    p = self.plan(valid)
    tokens_p = packing.pack(np.asarray(tokens), p.index, p.segment_ids)
    batch = parallel.put_batch((tokens_p, p.segment_ids), self.mesh, self.rules)
    out = parallel.host_local(self.packed_logprobs(params, *batch))
    return packing.unpack(out, p.index, p.shape)

  def pack_batch(self, batch: dict, num_mini_batches: int) -> tuple[dict, dict]:
    """Host: an unpacked group batch -> (packed batch, counts for the metrics).

    counts also carries `micro_rows`, the packed update's micro-batch row count."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    # A group's members share their prompt: packed once per row, each response attending
    # to it (`packing.plan`, prompts). The KL reference pass scores plain packed rows.
    shared = None if self.hp.kl_coef else (batch["tokens"], batch["action_mask"])
    p = packing.host_plan(batch["valid"], self.pack_len, num_mini_batches,
                          self.hp.micro_batches, self.shards, shared=shared)
    mb = p.micro_batches
    out = packing.pack_host(batch, p, _PER_SEQUENCE)
    out["seq_counts"] = packing.sequence_counts(out["action_mask"], p.seq)
    out["score_src"], out["score_tgt"] = scoring.score_slots_host(out["action_mask"], p.prev)
    if p.prefix_ids is not None:
      out.update(prefix_ids=p.prefix_ids, positions=p.rope_positions)
    # The normaliser of the (global) mini-batch each row belongs to.
    n, local_mb = len(batch["valid"]), len(p.index) // p.rows_per_mini_batch
    per = n // local_mb
    norms = np.asarray([loss_norms(self.hp, {k: v[i * per:(i + 1) * per]
                                             for k, v in batch.items()}, per, mb)
                        for i in range(local_mb)])
    hosts_per_mb = max(jax.process_count() // num_mini_batches, 1)
    if hosts_per_mb > 1:  # a mini-batch spans several hosts' rows
      norms = parallel.sum_over_host_groups(norms, hosts_per_mb)
    out["loss_norm"] = np.repeat(norms, p.rows_per_mini_batch).astype(np.float32)
    del out["valid"]
    return out, {"train/real_tokens": float(p.real_tokens),
                 "train/padded_positions": float(p.positions),
                 "micro_rows": p.rows_per_mini_batch * hosts_per_mb // mb}

  def step(self, policy, opt_state, batch: GroupBatch, ref=None, num_mini_batches: int = 1):
    """One epoch over the batch, one optimizer step per mini-batch; metrics averaged over
    them, and the first mini-batch's approx-KL alone (`update.first_approx_kl`). Without
    old_logp (one mini-batch only) the policy's own log-probs stand in for pi_old.

    With `pack_len` the batch is packed here (`pack_batch`); metrics then include the
    update's real tokens and computed positions (this host's)."""
    batch = batch.as_dict()
    size = batch["tokens"].shape[0]
    if size % num_mini_batches:
      raise ValueError(f"group batch {size} is not divisible into {num_mini_batches} "
                       "mini-batches (config.grpo.mini_batches)")
    if "old_logp" not in batch and num_mini_batches > 1:
      raise ValueError("group batch without old_logp: only one mini-batch is on-policy")
    counts = {"train/real_tokens": float(np.asarray(batch["valid"]).sum()),
              "train/padded_positions": float(np.size(batch["valid"]))}
    update = self.update
    if self.pack_len:
      batch, counts = self.pack_batch(batch, num_mini_batches)
      update = self.packed_update(counts.pop("micro_rows"))
    else:
      batch = dict(batch)
      batch["score_src"], batch["score_tgt"] = scoring.score_slots_host(batch["action_mask"])
    if self.mesh is not None:
      batch = parallel.put_batch(batch, self.mesh, self.rules)
    if self.hp.kl_coef:
      ref_logp = (self.packed_logprobs(ref, batch["tokens"], batch["segment_ids"])
                  if self.pack_len else self.logprobs(ref, batch["tokens"], batch["valid"]))
      batch = dict(batch, ref_logp=ref_logp)
    history = []
    for part in mini_batches(batch, num_mini_batches, self.split if self.mesh else None):
      policy, opt_state, metrics = update(policy, opt_state, part)
      history.append(metrics)
    return policy, opt_state, {**mean_metrics(history), **counts,
                               "train/first_minibatch_approx_kl": first_approx_kl(history)}
