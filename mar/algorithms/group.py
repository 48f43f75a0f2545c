"""The group family: GRPO and its variants, "GRPO + extra rollouts" and LTE.

One step (`iteration`): G single-turn samples per prompt in one queue of the rollout engine
(with DAPO's dynamic sampling: a queue that closes once enough groups are informative) ->
the none-pass groups re-sampled by the method's rule (`Method.resample`: nothing, G more
plain samples, or G samples under LTE's hint) -> `refined.refined_batch` (the learner's
batch, every member under its un-hinted prompt) -> `rl.grpo.GRPOLearner`.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from mar import methods
from mar import metrics as metrics_lib
from mar import parallel
from mar.algorithms import common
from mar.algorithms import refined
from mar.lte import hints
from mar.rl import grpo as grpo_lib
from mar.rollout import schedule
from mar.rollout.runner import select_rows


def make_learner(config, model_config, mesh=None, rules=None) -> grpo_lib.GRPOLearner:
  """The GRPO learner (every method of the family: they differ before the learner)."""
  g, r = config.grpo, config.rollout
  hp = grpo_lib.GRPOHparams(estimator=g.estimator, agg=g.agg, clip_low=g.clip_low,
                            clip_high=g.clip_high, kl_coef=g.kl_coef, kl_name=g.kl_name,
                            entropy_coef=g.entropy_coef, shaping_gamma=g.shaping_gamma,
                            separate_norm=g.separate_norm, temperature=r.temperature,
                            micro_batches=common.micro_batches(config), tis_cap=g.tis_cap)
  return grpo_lib.GRPOLearner(model_config, hp, common.optimizer(config, g.lr),
                              response_len=r.token_budget, mesh=mesh, rules=rules,
                              pack_len=config.train.pack_len,
                              score_rows=common.score_rows(config))


def optimizers(learner):
  """(policy optimizer, None: no critic)."""
  return learner.optimizer, None


def make_critic(config, model_config, params, learner):
  del config, model_config, params, learner
  return None  # group-relative advantages need no value function


def init_state(config, run) -> dict:
  """The checkpointed pytree: the policy and its optimizer state."""
  del config
  return {"policy": run.params, "actor_opt": run.actor_opt.init(run.params)}


def examples_per_step(config) -> int:
  """Examples a step draws from the data order: with dynamic sampling, the prompts_per_step
  groups and up to max_oversample times as many to replace uninformative ones."""
  b, cfg = config.rollout.prompts_per_step, config.grpo
  return b + (int(round(cfg.max_oversample * b)) if cfg.dynamic_sampling else 0)


def training_prompts(config, question: str) -> list[str]:
  """The first-turn text training builds for a question (LTE's hints come later)."""
  del config
  return [hints.chat_prompt(hints.plain_prompt(question))]


def _sample_groups(run, params, answers, user_texts, g, key):
  """Samples g single-turn responses per prompt (one queue of the rollout engine) -> HostEpisodes."""
  texts = [hints.chat_prompt(u) for u in user_texts for _ in range(g)]
  golds = [a for a in answers for _ in range(g)]
  return run.runner.run_host(params, texts, golds, key)


def _dynamic_groups(config, run, params, answers, plain, g, key):
  """DAPO's dynamic sampling in one queue: (the chosen groups, as indices into the step's
  examples; their members' HostEpisodes; dapo/* metrics). See `rollout.schedule` (groups).

  The chosen groups are the first prompts_per_step informative ones in data order (LTE: a
  none-pass group is informative, it will be hinted); when the bound is hit first, the batch
  is filled with the first uninformative ones, which `refined.dapo_rewards` keeps out of
  the loss. dapo/groups_consumed: data positions this step used up (the decided prefix;
  speculative groups after it come again next step).
  """
  needed = config.rollout.prompts_per_step
  keep_none_pass = methods.of(config).resample == "hints"
  texts = [hints.chat_prompt(u) for u in plain for _ in range(g)]
  golds = [a for a in answers for _ in range(g)]
  first, verified, admitted = run.runner.run_groups(
      params, texts, golds, key, group_size=g, needed=needed, keep_none_pass=keep_none_pass)
  done, informative = schedule.group_verdicts(verified, first.correct, g, keep_none_pass)
  closed, cutoff = (int(x) for x in schedule.decided_prefix(done, informative, needed))
  chosen = list(np.flatnonzero(informative[:cutoff])[:needed])
  fill = [i for i in np.flatnonzero(done) if i not in chosen][:needed - len(chosen)]
  groups = np.sort(np.asarray(chosen + fill, np.int64))
  metrics = {"dapo/groups_sampled": float(admitted.reshape(-1, g).any(1).sum()),
             "dapo/oversample_exhausted": float(not closed),
             "dapo/groups_consumed": float(cutoff),
             "dapo/informative_groups": float(len(chosen))}
  rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
  return groups, select_rows(first, rows), metrics


def _resample(config, run, params, questions, answers, plain, first, none_pass, key, timer):
  """The none-pass groups re-sampled by the method's rule: (their HostEpisodes, every host's
  sampled rows included, or None; the user texts they were sampled under; lte/hint_*
  metrics)."""
  g, rule = config.grpo.group_size, methods.of(config).resample
  rows = np.flatnonzero(none_pass) if rule != "none" else []
  # Sampling programs span all hosts: each samples as many extra groups as the busiest one.
  width = parallel.max_over_hosts(len(rows))
  hint_metrics = {}
  if rule == "hints":
    users, hint_metrics = refined.fitting_hints(config, run.runner, questions, first, rows, g)
  else:
    users = [plain[p] for p in rows]
  if not width:
    return None, users, hint_metrics
  users = users + [plain[0]] * (width - len(rows))  # idle groups, results dropped
  with timer("sample_extra"):
    extra = _sample_groups(run, params, [answers[p] for p in rows] + [""] * (width - len(rows)),
                           users, g, key)
  return extra, users, hint_metrics


def _hinted(config, run, params, extra, users, n: int):
  """The first n re-sampled members (None if none) and, for LTE's hints, their old
  log-probs under the hinted prompt (else None)."""
  if extra is None:
    return None, None
  logp_hinted = None
  if methods.of(config).resample == "hints":
    g = config.grpo.group_size
    texts = [hints.chat_prompt(u) for u in users for _ in range(g)]
    logp_hinted = refined.hinted_logprobs(run, params, texts, extra.responses)[:n]
  return (select_rows(extra, range(n)) if n else None), logp_hinted


def iteration(config, run, state: dict, examples, step: int):
  """One step of the group family on the step's examples (on several hosts: this host's)."""
  cfg, g = config.grpo, config.grpo.group_size
  timer, started = metrics_lib.Timer(), time.perf_counter()
  examples = examples[parallel.local_rows(len(examples))]
  questions = [ex.question for ex in examples]
  answers = [ex.answer for ex in examples]
  plain = [hints.plain_prompt(q) for q in questions]
  key_a, key_b = jax.random.split(common.step_key(config, step))
  state = common.park_state(run, state, timer)
  with timer("sample"):
    if cfg.dynamic_sampling:
      groups, first, dapo_metrics = _dynamic_groups(config, run, state["policy"], answers,
                                                    plain, g, key_a)
      questions, answers, plain = ([xs[i] for i in groups] for xs in (questions, answers, plain))
    else:
      first = _sample_groups(run, state["policy"], answers, plain, g, key_a)
      dapo_metrics = {"dapo/groups_sampled": float(len(plain)),
                      "dapo/oversample_exhausted": 0.0}
  rewards = first.correct.reshape(-1, g).astype(np.float32)
  none_pass = rewards.sum(1) == 0
  extra, users, hint_metrics = _resample(config, run, state["policy"], questions, answers,
                                         plain, first, none_pass, key_b, timer)
  state = common.unpark_state(run, state, timer)
  extra, logp_hinted = _hinted(config, run, state["policy"], extra, users,
                               int(none_pass.sum()) * g)
  rng = np.random.default_rng([config.seed, step, 2, jax.process_index()])
  batch, plan_metrics = refined.refined_batch(config, run, state["policy"], first, extra,
                                              logp_hinted, plain, rewards, none_pass, rng)
  with timer("update"):
    policy, opt_state, learn = run.timeline.call(
        run.learner.step, state["policy"], state["actor_opt"], batch, ref=run.ref,
        num_mini_batches=cfg.mini_batches)
    learn = jax.device_get(learn)
  state = dict(state, policy=policy, actor_opt=opt_state)
  m = {
      "reward_mean": float(rewards.mean()),
      "none_pass": float(none_pass.sum()),
      "some_pass": float(((rewards.sum(1) > 0) & (rewards.sum(1) < g)).sum()),
      "all_pass": float((rewards.sum(1) == g).sum()),
      "response_length": float(np.mean([len(r) for r in first.responses])),
      "truncated_frac": float(first.truncated.mean()),
      **plan_metrics, **hint_metrics, **dapo_metrics, **learn, **timer.metrics(),
      **common.host_share(run, started),
  }
  m["loss"] = learn.get("loss", np.nan)
  m["tokens_per_s"] = sum(len(r) for r in first.responses) / max(timer.seconds["sample"], 1e-9)
  m["time/step"] = time.perf_counter() - started
  return state, m
