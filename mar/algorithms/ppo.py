"""The PPO family: multi-attempt PPO, and single-turn PPO as its M = 1 case.

One step (`iteration`): the step's examples -> N ~ U{1..M} attempts per episode -> one queue
of dialogues in the rollout engine (feedback turns inside the program) -> `rl.ppo.PPOLearner`
(scores the `Episodes`: pi_old / pi_ref, values, GAE; then actor and critic updates).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mar import config_utils
from mar import evaluate
from mar import metrics as metrics_lib
from mar import parallel
from mar.algorithms import common
from mar.data import prompts
from mar.models import model as qwen
from mar.rl import ppo as ppo_lib


def prompt_function(config):
  """Initial dialogue text for (question, N) by the config's prompt style."""
  style = config.rollout.prompt
  if style == "multi_attempt":
    return prompts.multi_attempt_prompt
  if style == "single_turn":
    return lambda q, n: prompts.single_turn_prompt(q)
  raise config_utils.ConfigError(f"config.rollout.prompt: unknown style {style!r} "
                                 "(expected 'multi_attempt' or 'single_turn')")


def make_learner(config, model_config, mesh=None, rules=None) -> ppo_lib.PPOLearner:
  """The PPO learner with its actor and critic optimizers."""
  p, r = config.ppo, config.rollout
  hp = ppo_lib.PPOHparams(gamma=p.gamma, lam=p.lam, clip=p.clip, value_clip=p.value_clip,
                          kl_coef=p.kl_coef, kl_name=p.kl_name, kl_clamp=p.kl_clamp,
                          temperature=r.temperature,
                          micro_batches=common.micro_batches(config), tis_cap=p.tis_cap)
  return ppo_lib.PPOLearner(model_config, hp, common.optimizer(config, p.actor_lr),
                            common.optimizer(config, p.critic_lr), mesh=mesh, rules=rules,
                            pack_len=config.train.pack_len, score_rows=common.score_rows(config))


def optimizers(learner):
  """(actor, critic) optimizers of the learner."""
  return learner.actor_opt, learner.critic_opt


def make_critic(config, model_config, params, learner):
  """The critic: a copy of the policy's backbone (its own buffers: the policy's are donated)
  and a fresh value head, placed by the critic's sharding rules."""
  critic = {"backbone": jax.tree.map(jnp.copy, params),
            "value_head": qwen.init_value_head(model_config,
                                               jax.random.PRNGKey(config.seed + 1))}
  return parallel.shard_tree(critic, learner.shardings.critic)


def init_state(config, run) -> dict:
  """The checkpointed pytree: policy, critic and their optimizer states."""
  del config
  return {"policy": run.params, "actor_opt": run.actor_opt.init(run.params),
          "critic": run.critic, "critic_opt": run.critic_opt.init(run.critic)}


def examples_per_step(config) -> int:
  return int(config.rollout.prompts_per_step)


def training_prompts(config, question: str) -> list[str]:
  """Every first-turn text training may build for a question (one per N)."""
  fn = prompt_function(config)
  return [fn(question, n) for n in range(1, config.rollout.max_attempts + 1)]


def attempts_for_step(config, step: int) -> np.ndarray:
  """N per episode: Uniform{1..M} (training default) or fixed M."""
  m, b = config.rollout.max_attempts, config.rollout.prompts_per_step
  if config.rollout.attempts == "uniform":
    return np.random.default_rng([config.seed, step, 1]).integers(1, m + 1, size=b)
  return np.full(b, m)


def iteration(config, run, state: dict, examples, step: int):
  """One PPO step on the step's examples (on several hosts: this host's share of them)."""
  timer, started = metrics_lib.Timer(), time.perf_counter()
  rows = parallel.local_rows(len(examples))
  examples, n_attempts = examples[rows], attempts_for_step(config, step)[rows]
  prompt_fn = prompt_function(config)
  texts = [prompt_fn(ex.question, int(n)) for ex, n in zip(examples, n_attempts)]
  state = common.park_state(run, state, timer)
  with timer("sample"):
    episodes = run.runner.run(state["policy"], texts, [ex.answer for ex in examples],
                              n_attempts, common.step_key(config, step))
    jax.block_until_ready(episodes.reward)
  state = common.unpark_state(run, state, timer)
  with timer("update"):
    out = run.timeline.call(run.learner.step, state["policy"], state["actor_opt"],
                            state["critic"], state["critic_opt"], run.ref, episodes,
                            num_mini_batches=config.ppo.mini_batches)
    state = dict(state, policy=out[0], actor_opt=out[1], critic=out[2], critic_opt=out[3])
    learn = jax.device_get(out[4])
  m = evaluate.episode_metrics(episodes, len(examples))
  m.update(learn)
  m.update(timer.metrics())
  m.update(common.host_share(run, started))
  m["tokens_per_s"] = m["response_tokens_total"] / max(timer.seconds.get("sample", 1e-9), 1e-9)
  m["loss"] = learn.get("actor/loss", np.nan)
  m["time/step"] = time.perf_counter() - started
  return state, m
