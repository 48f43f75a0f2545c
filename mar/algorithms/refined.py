"""The group family's learner batch: LTE's hints that fit, hinted log-probs, refined groups.

`group.iteration` samples G responses per prompt; for the none-pass groups this module
builds the hinted prompts (`fitting_hints`), scores the hinted samples under their hinted
prompts (`hinted_logprobs`: LTE's old_logp_hinted) and packs the refined groups into the
learner's batch, every member under its UN-hinted prompt (`refined_batch`), with DAPO's
length rules (`dapo_rewards`). The pure hint and refine rules live in `mar.lte`.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np

from mar.lte import hints, refine
from mar.rl import advantages as adv_lib
from mar.rl import grpo
from mar import methods
from mar.episodes import GroupBatch
from mar.rollout.runner import HostEpisodes


def fitting_hint(fits, question: str, answers: Sequence[str | None],
                 truncated: Sequence[bool], max_chars: int = 0,
                 sep: str = ", ") -> tuple[str, str, bool]:
  """The LTE hint prompt of one all-fail group, made to fit the prompt bucket.

  Answers are quoted as extracted (cut to `max_chars` only when that is > 0). When the
  hinted prompt does not fit (`fits(chat text) -> bool`), answers are dropped from the end
  until it does; with none left the hint falls back to its no-answer case (Concise or
  plain). Returns (user text, hint kind, whether answers were dropped or cut).
  """
  cut = [a[:max_chars] if max_chars and a is not None and len(a) > max_chars else a
         for a in answers]
  shortened = cut != list(answers)
  while True:
    user = hints.hint_prompt(question, cut, truncated, sep=sep)
    if fits(hints.chat_prompt(user)) or not any(a for a in cut):
      return user, hints.hint_kind(cut, truncated), shortened
    last = max(i for i, a in enumerate(cut) if a)
    cut = cut[:last] + [None] + cut[last + 1:]
    shortened = True


def fitting_hints(config, runner, questions, first: HostEpisodes, rows, g: int):
  """Hinted user texts of the none-pass prompts `rows`, and their lte/hint_* metrics."""
  texts, kinds, shortened = [], collections.Counter(), 0
  for p in rows:
    user, kind, short = fitting_hint(
        runner.fits, questions[p], first.answers[p * g:(p + 1) * g],
        first.truncated[p * g:(p + 1) * g].tolist(), config.lte.hint_max_chars,
        config.lte.hint_sep)
    texts.append(user)
    kinds[kind] += 1
    shortened += short
  if shortened:
    logging.info("LTE: %d of %d hints dropped or cut answers to fit rollout.prompt_len=%d",
               shortened, len(rows), runner.prompt_len)
  metrics = {f"lte/hint_kind/{k}": float(kinds[k]) for k in hints.HINT_KINDS}
  metrics["lte/hint_shortened"] = float(shortened)
  return texts, metrics


def logprobs(run, params, tokens, valid) -> np.ndarray:
  """The learner's log-probs of this host's rows (a program over all hosts' rows; packed
  rows of real tokens unless train.pack_len is 0)."""
  return run.timeline.call(run.learner.logprobs_host, params, tokens, valid)


def hinted_logprobs(run, params, hinted_texts, responses) -> np.ndarray:
  """log-probs of hinted responses after their hinted prompts (LTE's old_logp_hinted).

  Rows are padded to a multiple of the runner's batch, so the program compiles for a few
  shapes, not once per count of none-pass groups.
  """
  pl, rl, tok = run.runner.prompt_len, run.runner.spec.token_budget, run.tokenizer
  n, per = len(hinted_texts), run.runner.local_batch
  pad = 0 if run.learner.pack_len else -n % per  # packed rows are bucketed already
  texts, responses = hinted_texts + hinted_texts[:1] * pad, responses + responses[:1] * pad
  tokens, valid, _ = grpo.pack_sequences([tok.encode(t) for t in texts], responses, pl, rl,
                                         tok.pad_id)
  return logprobs(run, params, tokens, valid)[:n]


def dapo_rewards(config, batch: dict, rewards: np.ndarray):
  """DAPO's length rules on the refined batch (in place) and its rewards [P, G].

  grpo.overlong_buffer > 0 adds the soft overlong penalty (`advantages.overlong_penalty`)
  of each member's response length to its reward; grpo.mask_truncated takes truncated
  responses out of the loss (action mask cleared: DAPO's overlong filtering). Pops the
  batch's per-member `truncated`. Returns (rewards, dapo/* metrics).
  """
  g = config.grpo
  truncated = batch.pop("truncated")
  action = np.asarray(batch["action_mask"])
  metrics = {}
  # Groups whose (refined) rewards are all equal teach nothing. With dynamic sampling they
  # are never trained on: only a batch the bound left short holds any (or an LTE group
  # whose hints all failed), and its members leave the loss. Decided on accuracy, before
  # the length penalty (as DAPO filters on accuracy).
  flat = rewards.min(1) == rewards.max(1)
  if g.overlong_buffer > 0:
    penalty = adv_lib.overlong_penalty(action.sum(1), config.rollout.token_budget,
                                       g.overlong_buffer, g.overlong_penalty)
    rewards = rewards + penalty.reshape(rewards.shape)
    metrics["dapo/overlong_penalty_mean"] = float(penalty.mean())
  if g.dynamic_sampling:
    action = action & ~np.repeat(flat, rewards.shape[1])[:, None]
  if g.mask_truncated:
    action = action & ~truncated[:, None]
    metrics["dapo/truncated_masked"] = float(truncated.sum())
  batch["action_mask"] = action
  trained = action.reshape(rewards.shape[0], -1).any(1)
  metrics["dapo/zero_variance_groups_trained"] = float((flat & trained).sum())
  return rewards, metrics


def refined_batch(config, run, policy, first, extra, logp_hinted, plain, rewards, none_pass,
                  rng):
  """The (refined) groups as the learner's `GroupBatch`: un-hinted prompts for everyone."""
  g, pl, rl = config.grpo.group_size, run.runner.prompt_len, config.rollout.token_budget
  tok = run.tokenizer
  prompt_ids = [tok.encode(hints.chat_prompt(u)) for u in plain for _ in range(g)]
  tokens, valid, action = grpo.pack_sequences(prompt_ids, first.responses, pl, rl, tok.pad_id)
  original = {"tokens": tokens, "valid": valid, "action_mask": action,
              "truncated": np.asarray(first.truncated, bool)}
  if first.logprobs:  # the sampler's log-probs: rollout/logp_gap_* and TIS in the loss
    original["sampler_logp"] = grpo.pack_response_values(first.logprobs, pl, rl)
  hinted: dict[str, Any] = {}
  method = methods.of(config)
  metrics = {"lte/num_none_pass": float(none_pass.sum())}
  if method.resample != "none":  # same keys every step, for the curves
    metrics.update({"lte/num_rescued": 0.0, "lte/num_cap_bound": 0.0, "lte/num_replaced": 0.0,
                    "lte/rescue_rate": 0.0})
  if extra is not None:
    hint_rewards = extra.correct.reshape(-1, g).astype(np.float32)
    cap = config.grpo.cap if config.grpo.cap >= 0 else None
    plan = refine.refine_groups(rewards, hint_rewards, none_pass, rng, cap=cap)
    metrics.update(plan.metrics())
    metrics["lte/rescue_rate"] = plan.num_rescued / max(plan.num_none_pass, 1)
    rows = np.flatnonzero(none_pass)
    un_ids = [tok.encode(hints.chat_prompt(plain[p])) for p in rows for _ in range(g)]
    h_tokens, h_valid, h_action = grpo.pack_sequences(un_ids, extra.responses, pl, rl, tok.pad_id)
    hinted = {"tokens": h_tokens, "valid": h_valid, "action_mask": h_action,
              "truncated": np.asarray(extra.truncated, bool)}
    if "sampler_logp" in original:  # sampled under the hinted prompt
      hinted["sampler_logp"] = grpo.pack_response_values(extra.logprobs, pl, rl)
    if logp_hinted is not None:
      hinted["logp_hinted"] = logp_hinted
    out = refine.apply_plan(plan, original, hinted, logp_key="logp_hinted",
                            as_hinted=method.resample == "hints")
    rewards = plan.rewards
  else:
    out = dict(original, hinted=np.zeros(len(tokens), bool))
  out.setdefault("old_logp_hinted", np.zeros(out["tokens"].shape, np.float32))
  if config.grpo.mini_batches > 1:  # one mini-batch is on-policy: the update's own pi_old
    out["old_logp"] = logprobs(run, policy, out["tokens"], out["valid"])
  rewards, dapo_metrics = dapo_rewards(config, out, rewards)
  metrics.update(dapo_metrics)
  out["advantages"] = np.asarray(grpo.member_advantages(run.learner.hp, rewards))
  batch = GroupBatch(**out)
  if run.learner.pack_len:  # packed on the host by the learner
    return batch, metrics
  return GroupBatch(*(None if v is None else jnp.asarray(v) for v in batch)), metrics
