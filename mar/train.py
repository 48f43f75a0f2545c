"""The training loop: host batches -> rollout -> rewards/advantages (+ LTE hints) -> update.

Reads top to bottom:
  train()            set-up (model, tokenizer, data, verifier, learners), resume, the loop
  ppo_iteration()    multi-attempt (or single-turn, M = 1) PPO on one rollout batch
  group_iteration()  GRPO / LTE / "GRPO + extra rollouts" on one batch of prompt groups
Each step is deterministic given (seed, step, data position): the data order, the attempt
counts and the PRNG keys are all derived from them, and the position (how many examples of
the data order earlier steps used: a fixed count per step, except with DAPO's dynamic
sampling) is checkpointed, so a run resumed from a checkpoint reproduces the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
import numpy as np

from mar import checkpoint as ckpt_lib
from mar import config_utils
from mar import evaluate
from mar import export
from mar import metrics as metrics_lib
from mar import overlap
from mar import parallel
from mar import plots
from mar import setup
from mar.lte import hints
from mar.lte import step as lte_step
from mar.rollout import schedule
from mar.rollout.runner import select_rows


# ----- state -------------------------------------------------------------------------------


def init_state(config, run: setup.Run) -> dict:
  """The checkpointed pytree: policy, critic and their optimizer states."""
  state = {"policy": run.params, "actor_opt": run.actor_opt.init(run.params)}
  if config.method == "ppo":
    state["critic"] = run.critic
    state["critic_opt"] = run.critic_opt.init(run.critic)
  return state


def batch_indices(config, num_examples: int, step: int) -> np.ndarray:
  """Example indices of a step of prompts_per_step examples (`data_indices`)."""
  b = config.rollout.prompts_per_step
  return data_indices(config, num_examples, step * b, b)


def data_indices(config, num_examples: int, position: int, count: int) -> np.ndarray:
  """Indices of `count` examples from `position` of the data order: epoch-wise permutations
  of the data seeded by config.seed."""
  flat = np.arange(position, position + count)
  epochs = flat // num_examples
  out = np.empty(count, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([config.seed, int(e)]).permutation(num_examples)
    sel = epochs == e
    out[sel] = perm[flat[sel] % num_examples]
  return out


def step_key(config, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), step)


def park_state(run: setup.Run, state: dict, timer) -> dict:
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


def unpark_state(run: setup.Run, state: dict, timer) -> dict:
  """`park_state`'s inverse, before the learner runs."""
  if not run.offload:
    return state
  with timer("offload"):
    return parallel.to_device_memory(state)


# ----- PPO (multi-attempt and single-turn) --------------------------------------------------


def attempts_for_step(config, step: int) -> np.ndarray:
  """N per episode: Uniform{1..M} (training default) or fixed M."""
  m, b = config.rollout.max_attempts, config.rollout.prompts_per_step
  if config.rollout.attempts == "uniform":
    return np.random.default_rng([config.seed, step, 1]).integers(1, m + 1, size=b)
  return np.full(b, m)


def ppo_iteration(config, run: setup.Run, state: dict, examples, step: int):
  """One PPO step on the step's examples (on several hosts: this host's share of them)."""
  timer, started = metrics_lib.Timer(), time.perf_counter()
  rows = parallel.local_rows(len(examples))
  examples, n_attempts = examples[rows], attempts_for_step(config, step)[rows]
  prompts = [run.prompt_fn(ex.question, int(n)) for ex, n in zip(examples, n_attempts)]
  state = park_state(run, state, timer)
  with timer("sample"):
    episodes = run.runner.run(state["policy"], prompts, [ex.answer for ex in examples],
                              n_attempts, step_key(config, step))
    jax.block_until_ready(episodes.reward)
  state = unpark_state(run, state, timer)
  with timer("update"):
    out = run.timeline.call(run.learner.step, state["policy"], state["actor_opt"],
                            state["critic"], state["critic_opt"], run.ref, episodes,
                            num_mini_batches=config.ppo.mini_batches)
    state = dict(state, policy=out[0], actor_opt=out[1], critic=out[2], critic_opt=out[3])
    learn = jax.device_get(out[4])
  m = evaluate.episode_metrics(episodes, len(examples))
  m.update(learn)
  m.update(timer.metrics())
  m.update(_host_share(run, started))
  m["tokens_per_s"] = m["response_tokens_total"] / max(timer.seconds.get("sample", 1e-9), 1e-9)
  m["loss"] = learn.get("actor/loss", np.nan)
  m["time/step"] = time.perf_counter() - started
  return state, m


# ----- GRPO / LTE --------------------------------------------------------------------------


def _sample_groups(run, params, answers, user_texts, g, key):
  """Samples g single-turn responses per prompt (one queue of the rollout engine) -> HostEpisodes."""
  texts = [hints.chat_prompt(u) for u in user_texts for _ in range(g)]
  golds = [a for a in answers for _ in range(g)]
  return run.runner.run_host(params, texts, golds, key)


def examples_per_step(config) -> int:
  """Examples a step draws from the data order: with dynamic sampling, the prompts_per_step
  groups and up to max_oversample times as many to replace uninformative ones."""
  b, cfg = config.rollout.prompts_per_step, config.grpo
  dynamic = config.method != "ppo" and cfg.dynamic_sampling
  return b + (int(round(cfg.max_oversample * b)) if dynamic else 0)


def _dynamic_groups(config, run, params, answers, plain, g, key):
  """DAPO's dynamic sampling in one queue: (the chosen groups, as indices into the step's
  examples; their members' HostEpisodes; dapo/* metrics). See `rollout.schedule` (groups).

  The chosen groups are the first prompts_per_step informative ones in data order (LTE: a
  none-pass group is informative, it will be hinted); when the bound is hit first, the batch
  is filled with the first uninformative ones, which `lte.step.dapo_rewards` keeps out of
  the loss. dapo/groups_consumed: data positions this step used up (the decided prefix;
  speculative groups after it come again next step).
  """
  needed, keep_none_pass = config.rollout.prompts_per_step, config.method == "lte"
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


def group_iteration(config, run: setup.Run, state: dict, examples, step: int):
  """One GRPO / LTE step on the step's examples (on several hosts: this host's share)."""
  cfg, g = config.grpo, config.grpo.group_size
  timer, started = metrics_lib.Timer(), time.perf_counter()
  examples = examples[parallel.local_rows(len(examples))]
  questions = [ex.question for ex in examples]
  answers = [ex.answer for ex in examples]
  plain = [hints.plain_prompt(q) for q in questions]
  key_a, key_b = jax.random.split(step_key(config, step))
  state = park_state(run, state, timer)
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
  rows = np.flatnonzero(none_pass) if config.method in ("lte", "grpo_extra") else []
  # Sampling programs span all hosts: each samples as many extra groups as the busiest one.
  width = parallel.max_over_hosts(len(rows))
  extra, logp_hinted, hint_metrics = None, None, {}
  if config.method == "lte":
    extra_user, hint_metrics = lte_step.fitting_hints(config, run.runner, questions, first,
                                                      rows, g)
  else:
    extra_user = [plain[p] for p in rows]
  if width:
    pad = width - len(rows)  # idle groups, results dropped
    with timer("sample_extra"):
      extra = _sample_groups(run, state["policy"], [answers[p] for p in rows] + [""] * pad,
                             extra_user + [plain[0]] * pad, g, key_b)
  state = unpark_state(run, state, timer)
  if width:
    if config.method == "lte":
      texts = [hints.chat_prompt(u) for u in extra_user + [plain[0]] * pad for _ in range(g)]
      logp_hinted = lte_step.hinted_logprobs(run, state["policy"], texts,
                                             extra.responses)[:len(rows) * g]
    extra = lte_step.first_rows(extra, len(rows) * g) if len(rows) else None
  rng = np.random.default_rng([config.seed, step, 2, jax.process_index()])
  batch, plan_metrics = lte_step.refined_batch(config, run, state["policy"], first, extra,
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
      **_host_share(run, started),
  }
  m["loss"] = learn.get("loss", np.nan)
  m["tokens_per_s"] = sum(len(r) for r in first.responses) / max(timer.seconds["sample"], 1e-9)
  m["time/step"] = time.perf_counter() - started
  return state, m


def _host_share(run, started: float) -> dict:
  """time/verify and the share of the step the device spent waiting for the host."""
  verify_s, stalled = run.runner.verify_fn.take_seconds()
  busy = run.timeline.busy_seconds(since=started)
  run.timeline.forget_before(time.perf_counter())
  return {"time/verify": verify_s, "rollout/verify_stall_s": stalled,
          **run.runner.take_stats(),
          **overlap.host_critical(time.perf_counter() - started, busy, stalled)}


# ----- the loop ----------------------------------------------------------------------------


def _should_eval(config, done: int) -> bool:
  periodic = config.eval.every_steps and done % config.eval.every_steps == 0
  return bool(periodic or (done == config.train.num_steps and config.eval.at_end))


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last step's metrics."""
  os.makedirs(workdir, exist_ok=True)
  config_utils.save_config_json(config, workdir)
  run = setup.build_run(config, workdir)
  state = init_state(config, run)
  run.offload = setup.offload_state(config, run, state)
  ckpt = ckpt_lib.Checkpointer.from_config(workdir, config.checkpoint)
  writer = metrics_lib.MetricsWriter.from_config(workdir, config)
  start = position = 0
  restored = ckpt.restore(state)
  if restored is not None:
    start, state, extra = restored
    position = int(extra.get("data_position", start * config.rollout.prompts_per_step))
    logging.info("resumed from checkpoint at step %d (data position %d)", start, position)
    writer.truncate_after(start)
  elif config.eval.at_start:
    evaluate.run_eval(config, run, state["policy"], workdir, step=0)
  iteration = ppo_iteration if config.method == "ppo" else group_iteration
  last: dict = {}
  bar = metrics_lib.progress(config.train.num_steps, desc=f"train[{config.method}]",
                             initial=start)
  for step in range(start, config.train.num_steps):
    idx = data_indices(config, len(run.train_data), position, examples_per_step(config))
    state, last = iteration(config, run, state, [run.train_data[i] for i in idx], step)
    position += int(last.get("dapo/groups_consumed", len(idx)))
    last["data/skipped_long_prompts"] = float(run.skipped_long_prompts)
    last.update({f"rollout/reshard_{k}": v for k, v in run.runner.reshard_stats.items()})
    last = parallel.mean_over_hosts(last)
    done = step + 1
    writer.write(done, last)
    bar.update(1)
    bar.set_postfix(loss=last.get("loss"), reward=last.get("reward_mean"))
    ckpt.save(done, state, extra={"step": done, "data_position": position},
              force=done == config.train.num_steps)
    if _should_eval(config, done):
      evaluate.run_eval(config, run, state["policy"], workdir, step=done)
  bar.close()
  ckpt.wait()
  ckpt.close()
  if parallel.is_main_process():
    plots.plot_all(workdir)
  writer.close()  # after the plots: W&B gets the final ones
  export.export_at_end(config, workdir, state["policy"])
  run.close()
  return last
